//! One compute interface, several backends.
//!
//! - [`Backend`] is what a device implements: its own tensor, weight and KV-cache types
//!   (host memory, device memory, WebAssembly linear memory) and the kernels, for
//!   arguments that have already been checked.
//! - [`Compute`] is what the architectures call (`realm-model`). Every [`Backend`] is a
//!   [`Compute`]: the blanket implementation in [`checked`] checks each op's arguments (shapes,
//!   bounds, handles used twice) once, for every backend, then runs the backend's kernel.
//!   The guest component implements [`Compute`] a second way, over the `realm:compute`
//!   imports, where the host's provider does those same checks.
//!
//! The vocabulary follows the WIT interface `realm:compute` (`wit/compute/compute.wit`).

pub mod checked;
mod erased;
pub mod rounded;
mod wit;

pub use erased::{AnyCache, AnyTensor, AnyWeight, Erased};
pub use wit::DTYPES;

use std::sync::Arc;

pub use realm_gguf::GgmlType;

/// Why an op or a handle was refused; mirrors the WIT `realm:compute/types.error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// An argument is wrong: a shape mismatch, a zero size, a tensor used twice.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No model of that name.
    #[error("not found: {0}")]
    NotFound(String),
    /// An offset or length outside the file or a tensor.
    #[error("out of bounds: {0}")]
    OutOfBounds(String),
    /// No kernel for this type or op.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A memory or context limit would be passed.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// Reading the model file failed.
    #[error("i/o: {0}")]
    Io(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn invalid(m: impl Into<String>) -> Error {
    Error::InvalidArgument(m.into())
}

/// How RoPE pairs dimensions: (2i, 2i+1) for llama, (i, i + d/2) for NeoX-style models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeMode {
    Normal,
    Neox,
}

/// ggml's `rope_ext` parameters (see the WIT `rope-params`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeParams {
    pub head_dim: u32,
    pub n_rot: u32,
    pub mode: RopeMode,
    pub freq_base: f32,
    pub freq_scale: f32,
    pub ext_factor: f32,
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
    pub n_ctx_orig: u32,
}

impl RopeParams {
    /// ggml's `ggml_rope_yarn_corr_dims`: the first and last pair index of YaRN's ramp
    /// (every backend's RoPE reads it).
    pub fn yarn_corr_dims(&self) -> [f32; 2] {
        let n_dims = self.n_rot as f32;
        let corr_dim = |beta: f32| {
            let pi = std::f32::consts::PI;
            n_dims * (self.n_ctx_orig as f32 / (beta * 2.0 * pi)).ln() / (2.0 * self.freq_base.ln())
        };
        let start = corr_dim(self.beta_fast).floor();
        let end = corr_dim(self.beta_slow).ceil();
        [start.max(0.0), end.min(n_dims - 1.0)]
    }

    /// Appends to `out` the (cos, sin) pairs, magnitude scale applied, of position `pos`'s
    /// `n_rot / 2` angles, as ggml's `rope_ext`: `pos · base^(-2i/n_rot)` by repeated
    /// products, divided by the per-pair `factors` when given (Llama 3's `rope_freqs`),
    /// then scaled (linear or YaRN). The CPU backend rotates with these and the GPU backend
    /// uploads them. `powf`, `logf`, `cosf` and `sinf` are the C library's, as ggml-cpu's
    /// (unlike [`rounded`]'s functions: RoPE's angles feed every layer of every token, and
    /// matching llama.cpp on the same host keeps random-weight models' greedy runs equal).
    pub fn angles(&self, factors: Option<&[f32]>, pos: u32, out: &mut Vec<(f32, f32)>) {
        let theta_scale = self.freq_base.powf(-2.0 / self.n_rot as f32);
        // YaRN's ramp is only read when it mixes (`ext_factor` ≠ 0).
        let corr = if self.ext_factor != 0.0 {
            self.yarn_corr_dims()
        } else {
            [0.0; 2]
        };
        let mut theta = pos as f32;
        for i in 0..self.n_rot as usize / 2 {
            let ff = factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0);
            out.push(self.yarn(theta / ff, corr, 2 * i));
            theta *= theta_scale;
        }
    }

    /// ggml's `rope_yarn`: cos and sin of one pair's angle, with interpolation, YaRN's ramp
    /// and magnitude scale applied as ggml-cpu computes them (GCC contracts `a·b + c` into
    /// FMAs).
    fn yarn(&self, theta_extrap: f32, corr: [f32; 2], i0: usize) -> (f32, f32) {
        let theta_interp = self.freq_scale * theta_extrap;
        let mut theta = theta_interp;
        let mut mscale = self.attn_factor;
        if self.ext_factor != 0.0 {
            let y = ((i0 / 2) as f32 - corr[0]) / (corr[1] - corr[0]).max(0.001);
            let ramp_mix = (1.0 - y.clamp(0.0, 1.0)) * self.ext_factor;
            theta = theta_interp.mul_add(1.0 - ramp_mix, theta_extrap * ramp_mix);
            mscale *= 0.1f32.mul_add((1.0 / self.freq_scale).ln(), 1.0);
        }
        (theta.cos() * mscale, theta.sin() * mscale)
    }
}

/// The gate activation of a gated feed-forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    GeluTanh,
}

/// A tensor's size: `rows` × `cols` f32 values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub rows: usize,
    pub cols: usize,
}

/// A KV cache's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    pub n_layer: usize,
    pub n_ctx: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
}

/// A model file's bytes, shared by its weights: a memory map, or a file read into memory.
#[derive(Clone)]
pub struct ModelBytes(Arc<dyn AsRef<[u8]> + Send + Sync>);

impl ModelBytes {
    pub fn new(bytes: Arc<dyn AsRef<[u8]> + Send + Sync>) -> Self {
        Self(bytes)
    }

    pub fn bytes(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}

impl std::fmt::Debug for ModelBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ModelBytes({} bytes)", self.bytes().len())
    }
}

impl realm_gguf::Source for ModelBytes {
    fn size(&self) -> u64 {
        self.bytes().len() as u64
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> realm_gguf::Result<()> {
        self.bytes().read_exact_at(offset, buf)
    }
}

/// What every backend keeps of a weight host-side: its type and shape, and for f32, f16
/// and bf16 weights their values decoded once (norms, RoPE factors: small).
#[derive(Debug, Clone)]
pub struct WeightMeta {
    pub ty: GgmlType,
    /// ggml order: row length first.
    pub dims: Vec<u64>,
    pub values: Option<Vec<f32>>,
}

impl WeightMeta {
    pub fn row_len(&self) -> usize {
        self.dims.first().map_or(0, |&d| d as usize)
    }

    pub fn n_rows(&self) -> usize {
        self.dims
            .get(1..)
            .map_or(0, |d| d.iter().product::<u64>() as usize)
    }
}

/// A checked weight, as a backend receives it: `len` bytes at `offset` of `file`.
#[derive(Debug, Clone)]
pub struct WeightData {
    pub file: ModelBytes,
    pub offset: usize,
    pub len: usize,
    pub meta: WeightMeta,
}

impl WeightData {
    pub fn bytes(&self) -> &[u8] {
        &self.file.bytes()[self.offset..self.offset + self.len]
    }
}

/// The attention op's arguments, checked (see [`Compute::attention`]).
pub struct Attention<'a, B: Backend + ?Sized> {
    pub q: &'a B::Tensor,
    pub k: &'a B::Tensor,
    pub v: &'a B::Tensor,
    pub cache: &'a B::Cache,
    pub layer: usize,
    pub pos: usize,
    pub n_head: usize,
    pub scale: f32,
    pub window: usize,
    /// Scores capped as softcap · tanh(score / softcap) when non-zero (Gemma 2).
    pub softcap: f32,
}

/// A device: where tensors live and kernels run. Implement this (and nothing else) to add
/// a backend; [`Compute`] comes with it. Every method may assume its arguments passed the
/// checks in [`checked`] (shapes agree, outputs are distinct from inputs, positions are
/// inside the cache); a kernel sets its output's row count.
pub trait Backend: 'static {
    type Tensor: Send + 'static;
    type Weight: Send + 'static;
    type Cache: Send + 'static;

    /// A short name for logs and statistics (`cpu`, `cuda`, …).
    fn name(&self) -> &'static str;
    /// Largest KV cache (keys and values together, in values) this backend holds.
    fn max_kv_elements(&self) -> u64;

    /// An empty tensor `cols` wide (zero rows).
    fn tensor(&self, cols: usize) -> Self::Tensor;
    fn shape(&self, t: &Self::Tensor) -> Shape;
    /// Row `row` (< rows) into host memory. A backend that defers ops runs them first
    /// (an op's error surfaces here).
    fn read_row(&self, t: &Self::Tensor, row: usize) -> Result<Vec<f32>>;
    /// Replace the contents: `rows` × cols values.
    fn write(&self, t: &Self::Tensor, rows: usize, data: Vec<f32>) -> Result<()>;

    fn weight(&self, w: WeightData) -> Result<Self::Weight>;
    fn weight_meta<'a>(&self, w: &'a Self::Weight) -> &'a WeightMeta;

    /// A cache of this geometry; it may allocate lazily, as positions are written.
    fn cache(&self, shape: CacheShape) -> Self::Cache;
    fn cache_shape(&self, c: &Self::Cache) -> CacheShape;
    /// Positions of `layer` holding keys and values.
    fn cache_filled(&self, c: &Self::Cache, layer: usize) -> usize;

    /// out[i] = scale × row `ids[i]` of `table` (ids are in range).
    fn embed(
        &self,
        table: &Self::Weight,
        ids: &[u32],
        scale: f32,
        out: &Self::Tensor,
    ) -> Result<()>;
    /// out = x · wᵀ.
    fn matmul(&self, x: &Self::Tensor, w: &Self::Weight, out: &Self::Tensor) -> Result<()>;
    /// RMS norm by `w`'s decoded values (per group of `len(w)` values).
    fn rms_norm(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        eps: f32,
        out: &Self::Tensor,
    ) -> Result<()>;
    /// RoPE in place; row i at position `pos + i`; `factors` are checked and decoded.
    fn rope(
        &self,
        x: &Self::Tensor,
        pos: u32,
        p: &RopeParams,
        factors: Option<&[f32]>,
    ) -> Result<()>;
    /// Store k and v at positions `pos…` of `layer`, then causal attention.
    fn attention(&self, a: Attention<'_, Self>, out: &Self::Tensor) -> Result<()>;
    /// up = act(gate) × up.
    fn glu(&self, gate: &Self::Tensor, up: &Self::Tensor, act: Activation) -> Result<()>;
    /// acc += x.
    fn add(&self, acc: &Self::Tensor, x: &Self::Tensor) -> Result<()>;
    /// x ×= s.
    fn scale(&self, x: &Self::Tensor, s: f32) -> Result<()>;
    /// Row r of x ×= s[r] (`s` has one value per row: checked before the backend sees it).
    fn scale_rows(&self, x: &Self::Tensor, s: &[f32]) -> Result<()>;
    fn softmax(&self, x: &Self::Tensor) -> Result<()>;
    fn keep_last_row(&self, x: &Self::Tensor) -> Result<()>;

    /// The tenant has no step coming (its request ended): a backend that runs tenants'
    /// steps together stops waiting for this one until its next op.
    fn rest(&self) {}
}

/// The ops an architecture calls: `realm:compute` as a Rust trait. Every [`Backend`] is one
/// (checked once, in [`checked`]); the guest component is another, over the WIT imports.
#[allow(clippy::too_many_arguments, reason = "the WIT ops' arguments")]
pub trait Compute: 'static {
    type Tensor: 'static;
    type Weight: 'static;
    type Cache: 'static;
    /// An open model file: its header is read through [`realm_gguf::Source`], its weights
    /// made with [`Compute::weight`].
    type File: realm_gguf::Source;

    fn tensor(&self, cols: u32) -> Self::Tensor;
    fn cache(&self, n_layer: u32, n_ctx: u32, n_head_kv: u32, head_dim: u32) -> Self::Cache;
    fn read_row(&self, t: &Self::Tensor, row: u32) -> Result<Vec<f32>>;
    /// A weight: `dims` elements of `ty` at absolute offset `offset` of `file`.
    fn weight(
        &self,
        file: &Self::File,
        offset: u64,
        ty: GgmlType,
        dims: &[u64],
    ) -> Result<Self::Weight>;

    fn embed(
        &self,
        table: &Self::Weight,
        ids: &[u32],
        scale: f32,
        out: &Self::Tensor,
    ) -> Result<()>;
    fn matmul(&self, x: &Self::Tensor, w: &Self::Weight, out: &Self::Tensor) -> Result<()>;
    fn rms_norm(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        eps: f32,
        out: &Self::Tensor,
    ) -> Result<()>;
    fn rope(
        &self,
        x: &Self::Tensor,
        pos: u32,
        p: &RopeParams,
        factors: Option<&Self::Weight>,
    ) -> Result<()>;
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        cache: &Self::Cache,
        layer: u32,
        pos: u32,
        n_head: u32,
        scale: f32,
        window: u32,
        softcap: f32,
        out: &Self::Tensor,
    ) -> Result<()>;
    fn glu(&self, gate: &Self::Tensor, up: &Self::Tensor, act: Activation) -> Result<()>;
    fn add(&self, acc: &Self::Tensor, x: &Self::Tensor) -> Result<()>;
    fn scale(&self, x: &Self::Tensor, s: f32) -> Result<()>;
    /// Row r of x ×= s[r], one value per row.
    fn scale_rows(&self, x: &Self::Tensor, s: &[f32]) -> Result<()>;
    fn keep_last_row(&self, x: &Self::Tensor) -> Result<()>;
}
