//! WIT glue: the generated bindings for the guest world, with `realm:compute` resources
//! mapped onto the host's own types.

wasmtime::component::bindgen!({
    path: ["../wit/compute", "../wit/inference"],
    world: "realm:inference/guest",
    with: {
        "realm:compute/store.model-file": crate::compute::ModelFileRes,
        "realm:compute/store.weight": crate::compute::WeightRes,
        "realm:compute/tensors.tensor": crate::compute::TensorRes,
        "realm:compute/tensors.kv-cache": crate::compute::KvCacheRes,
    },
});

pub use exports::realm::inference::runtime;
pub use exports::realm::inference::types as inference;
pub use realm::compute::types::{Activation, Dtype, Error as ComputeError, RopeMode, RopeParams};
