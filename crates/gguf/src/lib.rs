//! Realm's GGUF reader: metadata, tensor infos and quantization formats, for the guest
//! (wasm32) and the host alike. Nothing in a file is trusted: see `reader` for the rules.

mod error;
mod ggml_type;
mod hparams;
pub mod quant;
mod reader;
mod source;
mod value;
mod writer;

pub use error::{GgufError, Result};
pub use ggml_type::GgmlType;
pub use hparams::{Hparams, RopeScaling, RopeScalingType};
pub use reader::{
    DEFAULT_ALIGNMENT, GgufFile, MAX_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_DIMS, MAX_ENTRIES,
    MAX_KEY_LEN, MAX_STRING_LEN, MAX_TENSOR_NAME, TensorInfo,
};
#[cfg(unix)]
pub use source::FileSource;
pub use source::Source;
pub use value::{Array, Metadata, Value, ValueType};
pub use writer::GgufWriter;

#[cfg(test)]
mod tests;
