//! `realm:compute` in WebAssembly.
//!
//! The native host provider keeps weights in a memory map outside the guest and runs SIMD
//! kernels on many threads. This component implements the same interface inside
//! WebAssembly, so that the Realm component plugged with it needs nothing but WASI: a stock
//! `wasmtime run`, Python's `wasmtime` or Node through `jco` can run it.
//!
//! - `open-model(name)` reads the file `name` through WASI (a path under a preopened
//!   directory) into this component's linear memory. A 32-bit component has 4 GiB at
//!   most, so larger files are refused with an error that says so.
//! - Every op is the native provider's: the same checks (`realm-compute`) and the same
//!   backend (`realm-kernels`' CPU backend, its portable and SIMD128 code): quantized
//!   matmuls with ggml's numerics, ggml's flash attention, RMS norm, RoPE, GLU. Results are
//!   the native host's bit for bit where the C library's math functions agree (they are
//!   the same routines in glibc and wasi-libc); the greedy test checks the text. This file
//!   is only the WIT glue.
//! - One thread; no weight budget (the weights are already in memory).

wit_bindgen::generate!({
    path: "wit",
    world: "provider",
    generate_all,
});

use std::sync::Arc;

use exports::realm::compute::store::{self, GuestModelFile, GuestWeight, WeightBorrow};
use exports::realm::compute::tensors::{self, GuestKvCache, GuestTensor, TensorBorrow};
use exports::realm::compute::types::{Activation, Dtype, Error, RopeParams};
use realm_compute::{Backend, Compute, ModelBytes, checked};
use realm_kernels::cpu::{CpuBackend, CpuCache, CpuTensor, CpuWeight};
use realm_kernels::pool::SpinPool;

/// Largest model file this component loads: what a 32-bit linear memory can hold with
/// room left for the activations, the KV cache and the guest's own state.
pub const MAX_MODEL_BYTES: u64 = 3 << 30;
/// Largest KV cache (f16 values, keys and values together) in this memory.
pub const MAX_KV_ELEMENTS: u64 = 1 << 28;

type Res<T> = Result<T, Error>;

thread_local! {
    static CPU: CpuBackend = CpuBackend::new(Arc::new(SpinPool::single()), MAX_KV_ELEMENTS);
}

use exports::realm::compute::types as wit;
realm_compute::wit_conversions!(wit);

/// Runs `f` on this component's backend, with its error as the WIT one.
fn cpu<T>(f: impl FnOnce(&CpuBackend) -> realm_compute::Result<T>) -> Res<T> {
    CPU.with(f).map_err(to_wit_error)
}

/// A model file's bytes, read once, shared by its weights.
pub struct ModelFile(ModelBytes);

pub struct Weight(CpuWeight);

pub struct Tensor(CpuTensor);

pub struct KvCache(CpuCache);

struct Provider;

impl store::Guest for Provider {
    type ModelFile = ModelFile;
    type Weight = Weight;

    fn open_model(name: String) -> Res<store::ModelFile> {
        let size = std::fs::metadata(&name)
            .map_err(|e| Error::NotFound(format!("cannot open model file '{name}': {e}")))?
            .len();
        if size > MAX_MODEL_BYTES {
            return Err(Error::ResourceExhausted(format!(
                "'{name}' is {:.1} GiB: the self-contained component keeps the weights in its \
                 own 32-bit memory, which holds models up to {} GiB; run larger models with \
                 the native host (`realm run`)",
                size as f64 / f64::from(1u32 << 30),
                MAX_MODEL_BYTES >> 30
            )));
        }
        let bytes =
            std::fs::read(&name).map_err(|e| Error::Io(format!("cannot read '{name}': {e}")))?;
        Ok(store::ModelFile::new(ModelFile(ModelBytes::new(Arc::new(
            bytes,
        )))))
    }

    /// The weights are in this component's memory already: nothing to budget.
    fn set_max_resident(_bytes: u64) {}

    fn prefetch(_w: WeightBorrow<'_>) {}
}

impl GuestModelFile for ModelFile {
    fn size(&self) -> u64 {
        self.0.bytes().len() as u64
    }

    fn read(&self, offset: u64, len: u32) -> Res<Vec<u8>> {
        let size = self.0.bytes().len() as u64;
        let end = offset
            .checked_add(u64::from(len))
            .filter(|&e| e <= size)
            .ok_or_else(|| {
                Error::OutOfBounds(format!(
                    "read of {len} bytes at {offset} passes the end of the file ({size} bytes)"
                ))
            })?;
        Ok(self.0.bytes()[offset as usize..end as usize].to_vec())
    }

    fn weight(&self, offset: u64, dtype: Dtype, dims: Vec<u64>) -> Res<store::Weight> {
        let w = cpu(|b| Compute::weight(b, &self.0, offset, from_wit_dtype(dtype), &dims))?;
        Ok(store::Weight::new(Weight(w)))
    }
}

impl GuestWeight for Weight {
    fn dims(&self) -> Vec<u64> {
        CPU.with(|b| b.weight_meta(&self.0).dims.clone())
    }
}

impl GuestTensor for Tensor {
    fn new(cols: u32) -> Self {
        Tensor(CPU.with(|b| Backend::tensor(b, cols as usize)))
    }

    fn rows(&self) -> u32 {
        CPU.with(|b| b.shape(&self.0).rows as u32)
    }

    fn cols(&self) -> u32 {
        CPU.with(|b| b.shape(&self.0).cols as u32)
    }

    fn read_row(&self, row: u32) -> Res<Vec<f32>> {
        cpu(|b| Compute::read_row(b, &self.0, row))
    }

    fn write(&self, rows: u32, data: Vec<f32>) -> Res<()> {
        cpu(|b| checked::write_tensor(b, &self.0, rows as usize, data))
    }
}

impl GuestKvCache for KvCache {
    fn new(n_layer: u32, n_ctx: u32, n_head_kv: u32, head_dim: u32) -> Self {
        KvCache(CPU.with(|b| Compute::cache(b, n_layer, n_ctx, n_head_kv, head_dim)))
    }

    fn capacity(&self) -> u32 {
        CPU.with(|b| b.cache_shape(&self.0).n_ctx as u32)
    }
}

fn t<'a>(t: &'a TensorBorrow<'_>) -> &'a CpuTensor {
    &t.get::<Tensor>().0
}

fn w<'a>(w: &'a WeightBorrow<'_>) -> &'a CpuWeight {
    &w.get::<Weight>().0
}

impl tensors::Guest for Provider {
    type Tensor = Tensor;
    type KvCache = KvCache;

    fn embed(table: WeightBorrow<'_>, ids: Vec<u32>, scale: f32, out: TensorBorrow<'_>) -> Res<()> {
        cpu(|b| Compute::embed(b, w(&table), &ids, scale, t(&out)))
    }

    fn matmul(x: TensorBorrow<'_>, wt: WeightBorrow<'_>, out: TensorBorrow<'_>) -> Res<()> {
        cpu(|b| Compute::matmul(b, t(&x), w(&wt), t(&out)))
    }

    fn rms_norm(
        x: TensorBorrow<'_>,
        wt: WeightBorrow<'_>,
        eps: f32,
        out: TensorBorrow<'_>,
    ) -> Res<()> {
        cpu(|b| Compute::rms_norm(b, t(&x), w(&wt), eps, t(&out)))
    }

    fn rope(
        x: TensorBorrow<'_>,
        pos: u32,
        p: RopeParams,
        factors: Option<WeightBorrow<'_>>,
    ) -> Res<()> {
        let p = from_wit_rope(&p);
        cpu(|b| Compute::rope(b, t(&x), pos, &p, factors.as_ref().map(w)))
    }

    #[allow(clippy::too_many_arguments, reason = "mirrors the WIT signature")]
    fn attention(
        q: TensorBorrow<'_>,
        k: TensorBorrow<'_>,
        v: TensorBorrow<'_>,
        cache: tensors::KvCacheBorrow<'_>,
        layer: u32,
        pos: u32,
        n_head: u32,
        scale: f32,
        window: u32,
        softcap: f32,
        out: TensorBorrow<'_>,
    ) -> Res<()> {
        let c = &cache.get::<KvCache>().0;
        cpu(|b| {
            Compute::attention(
                b,
                t(&q),
                t(&k),
                t(&v),
                c,
                layer,
                pos,
                n_head,
                scale,
                window,
                softcap,
                t(&out),
            )
        })
    }

    fn glu(gate: TensorBorrow<'_>, up: TensorBorrow<'_>, act: Activation) -> Res<()> {
        cpu(|b| Compute::glu(b, t(&gate), t(&up), from_wit_activation(act)))
    }

    fn add(acc: TensorBorrow<'_>, x: TensorBorrow<'_>) -> Res<()> {
        cpu(|b| Compute::add(b, t(&acc), t(&x)))
    }

    fn scale(x: TensorBorrow<'_>, s: f32) -> Res<()> {
        cpu(|b| Compute::scale(b, t(&x), s))
    }

    fn scale_rows(x: TensorBorrow<'_>, s: Vec<f32>) -> Res<()> {
        cpu(|b| Compute::scale_rows(b, t(&x), &s))
    }

    fn softmax(x: TensorBorrow<'_>) -> Res<()> {
        cpu(|b| checked::softmax_rows(b, t(&x)))
    }

    fn keep_last_row(x: TensorBorrow<'_>) -> Res<()> {
        cpu(|b| Compute::keep_last_row(b, t(&x)))
    }
}

export!(Provider);
