//! The architectures Realm runs. Adding one is a module here (its weights and what its
//! blocks do differently, on top of [`block`]) and a line in the registry below.

pub mod block;
mod gemma2;
mod gemma3;
mod llama;
mod mistral3;
mod phi3;
mod plain;
mod qwen2;
mod qwen3;
mod smollm3;

use std::cell::RefCell;
use std::collections::BTreeSet;

use realm_compute::{Compute, GgmlType, RopeMode, RopeParams};
use realm_gguf::{GgufFile, Hparams, RopeScaling, TensorInfo};
use realm_tokenizer::Builtin;

use crate::{Error, Result};

/// The registry: `general.architecture` → the module whose `load` builds it.
macro_rules! registry {
    ($($name:literal => $module:ident),* $(,)?) => {
        /// Names of the architectures Realm runs.
        pub const KNOWN: &[&str] = &[$($name),*];

        /// The chat template for files of `arch` that carry none (each module's `TEMPLATE`;
        /// ChatML for architectures Realm does not know).
        pub fn default_template(arch: &str) -> Builtin {
            match arch {
                $($name => $module::TEMPLATE,)*
                _ => Builtin::ChatMl,
            }
        }

        /// The loader of `arch`, if Realm runs it.
        fn loader_for<C: Compute>(arch: &str) -> Option<LoadFn<C>> {
            match arch {
                $($name => Some($module::load::<C>),)*
                _ => None,
            }
        }
    };
}

registry! {
    "llama" => llama,
    "gemma2" => gemma2,
    "gemma3" => gemma3,
    "phi3" => phi3,
    "qwen2" => qwen2,
    "qwen3" => qwen3,
    "smollm3" => smollm3,
    "mistral3" => mistral3,
}

/// What each architecture module's `load` is.
type LoadFn<C> = fn(&Loader<'_, C>, Hparams) -> Result<Box<dyn Architecture<C>>>;

/// A loaded model's forward pass.
pub trait Architecture<C: Compute> {
    /// The stack of blocks: hyper-parameters, weights, what the blocks have.
    fn decoder(&self) -> &block::Decoder<C::Weight>;

    fn hparams(&self) -> &Hparams {
        &self.decoder().hp
    }

    /// Activation buffers for one session of `n_ctx` positions, sized for this model.
    fn scratch(&self, c: &C, n_ctx: u32) -> Scratch<C> {
        self.decoder().scratch(c, n_ctx)
    }

    /// Run `ids` at positions `pos…` (appending to `cache`); `out` says what to return:
    /// the logits of the last position, or the pooled final hidden states.
    fn forward(
        &self,
        c: &C,
        s: &Scratch<C>,
        cache: &C::Cache,
        ids: &[u32],
        pos: u32,
        out: Output,
    ) -> Result<Vec<f32>>;
}

/// What a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Logits of the last position (generation).
    Logits,
    /// The mean over positions of the final (output-normed) hidden states, scaled to unit
    /// length (embeddings).
    MeanPooled,
}

/// A session's activation tensors, reused for every token (nothing allocated per token).
pub struct Scratch<C: Compute> {
    /// (n, n_embd) the residual stream.
    pub x: C::Tensor,
    /// (n, n_embd) normalized input to the next matmul, and matmul outputs.
    pub xb: C::Tensor,
    /// (n, n_head · head_dim), (n, n_head_kv · head_dim) ×2.
    pub q: C::Tensor,
    pub k: C::Tensor,
    pub v: C::Tensor,
    /// (n, n_head · head_dim) attention output.
    pub att: C::Tensor,
    /// (n, n_ff) ×2 feed-forward gate and up projections.
    pub gate: C::Tensor,
    pub up: C::Tensor,
    /// (1, n_vocab).
    pub logits: C::Tensor,
    /// q and k after per-head norms, for blocks that have them.
    pub qk_norm: Option<(C::Tensor, C::Tensor)>,
    /// (n, n_embd) a block output's post-norm, for blocks that have them.
    pub post_norm: Option<C::Tensor>,
    /// (n, n_head_kv · head_dim) the k and v biases' rows, for blocks that have them.
    pub kv_bias: Option<C::Tensor>,
    /// The session's context (Phi-3's LongRoPE picks its factors by it, as llama.cpp).
    pub n_ctx: u32,
}

impl<C: Compute> Scratch<C> {
    /// Buffers for `hp` and blocks shaped as `spec`.
    pub fn new(c: &C, hp: &Hparams, n_vocab: u32, spec: block::Spec, n_ctx: u32) -> Self {
        let q_dim = hp.n_head * hp.head_dim;
        let kv_dim = hp.n_head_kv * hp.head_dim;
        Scratch {
            x: c.tensor(hp.n_embd),
            xb: c.tensor(hp.n_embd),
            q: c.tensor(q_dim),
            k: c.tensor(kv_dim),
            v: c.tensor(kv_dim),
            att: c.tensor(q_dim),
            gate: c.tensor(hp.n_ff),
            up: c.tensor(hp.n_ff),
            logits: c.tensor(n_vocab),
            qk_norm: spec.qk_norm.then(|| (c.tensor(q_dim), c.tensor(kv_dim))),
            post_norm: spec.post_norms.then(|| c.tensor(hp.n_embd)),
            kv_bias: spec.qkv_bias.then(|| c.tensor(kv_dim)),
            n_ctx,
        }
    }
}

/// Loads the model in `file` (whose header is `gguf`) with the architecture it names.
pub fn load<C: Compute>(
    c: &C,
    file: &C::File,
    gguf: &GgufFile,
) -> Result<Box<dyn Architecture<C>>> {
    let arch = gguf
        .architecture()
        .map_err(|e| Error::InvalidModel(e.to_string()))?;
    // Checked before the hyper-parameters: an unknown architecture's keys say nothing.
    let load = loader_for::<C>(arch).ok_or_else(|| {
        Error::Unsupported(format!(
            "architecture '{arch}' is not supported (known: {})",
            KNOWN.join(", ")
        ))
    })?;
    let hp = Hparams::from_gguf(gguf).map_err(|e| Error::InvalidModel(e.to_string()))?;
    let loader = Loader {
        c,
        file,
        gguf,
        used: RefCell::default(),
    };
    let model = load(&loader, hp)?;
    loader.check_all_used(arch)?;
    Ok(model)
}

/// The RoPE parameters of `hp` at base `freq_base` with `scaling` (architectures with
/// per-layer bases or scalings pass their own).
pub fn rope_params(
    hp: &Hparams,
    mode: RopeMode,
    freq_base: f32,
    scaling: &RopeScaling,
) -> RopeParams {
    RopeParams {
        head_dim: hp.head_dim,
        n_rot: hp.n_rot,
        mode,
        freq_base,
        freq_scale: scaling.freq_scale,
        ext_factor: scaling.ext_factor,
        attn_factor: scaling.attn_factor,
        beta_fast: scaling.beta_fast,
        beta_slow: scaling.beta_slow,
        n_ctx_orig: scaling.n_ctx_orig,
    }
}

/// Whether a tensor name is one llama.cpp's graphs use (blocks, embeddings, output, RoPE
/// factors): such a tensor left unused changes the results. Other names (padding, extra
/// data a converter kept) are ignored.
fn in_the_graph(name: &str) -> bool {
    ["blk.", "token_", "output", "rope_", "pos_embd", "cls"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Creates weights from the file's tensors, checking their shapes, and remembers which it
/// used: a tensor the architecture does not use (a bias, RoPE factors, experts) would
/// change llama.cpp's results, so such a file is refused instead of run wrong.
pub struct Loader<'a, C: Compute> {
    c: &'a C,
    file: &'a C::File,
    gguf: &'a GgufFile,
    used: RefCell<BTreeSet<String>>,
}

impl<C: Compute> Loader<'_, C> {
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.gguf.tensor(name)
    }

    /// Vocabulary size: the row count of `token_embd.weight`.
    pub fn n_vocab(&self) -> Result<u64> {
        self.tensor("token_embd.weight")
            .and_then(|t| t.dims.get(1).copied())
            .ok_or_else(|| {
                Error::InvalidModel("tensor 'token_embd.weight' is missing or 1-D".into())
            })
    }

    /// Errors unless every tensor of the file was loaded.
    fn check_all_used(&self, arch: &str) -> Result<()> {
        let used = self.used.borrow();
        let unused: Vec<&str> = self
            .gguf
            .tensors
            .iter()
            .map(|t| t.name.as_str())
            .filter(|n| !used.contains(*n) && in_the_graph(n))
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = unused.iter().take(5).copied().collect();
        Err(Error::Unsupported(format!(
            "the file has {} tensor(s) Realm's '{arch}' architecture does not use ({}{}); \
             running without them would give wrong results",
            unused.len(),
            shown.join(", "),
            if unused.len() > shown.len() {
                ", …"
            } else {
                ""
            }
        )))
    }

    /// The weight `name`, which must have exactly `dims` (ggml order).
    pub fn weight(&self, name: &str, dims: &[u64]) -> Result<C::Weight> {
        let t = self.checked(name, dims)?;
        Ok(self.c.weight(self.file, t.offset, t.ty, &t.dims)?)
    }

    /// The tensor `name`, marked used, if it has exactly `dims` and a type Realm computes.
    fn checked(&self, name: &str, dims: &[u64]) -> Result<&TensorInfo> {
        let t = self
            .tensor(name)
            .ok_or_else(|| Error::InvalidModel(format!("tensor '{name}' is missing")))?;
        self.used.borrow_mut().insert(name.to_string());
        if t.dims != dims {
            return Err(Error::InvalidModel(format!(
                "tensor '{name}' has shape {:?}, expected {dims:?}",
                t.dims
            )));
        }
        t.check_supported()
            .map_err(|e| Error::Unsupported(e.to_string()))?;
        if !computable(t.ty) {
            return Err(Error::Unsupported(format!(
                "tensor '{name}' has type {}, which Realm does not support yet",
                t.ty
            )));
        }
        Ok(t)
    }

    /// Rows `rows` of the 2-D weight `name` (which must have exactly `dims`) as a weight
    /// of its own: a fused projection's parts (Phi-3's `attn_qkv`, its gate-up `ffn_up`).
    pub fn weight_rows(
        &self,
        name: &str,
        dims: &[u64],
        rows: std::ops::Range<u64>,
    ) -> Result<C::Weight> {
        // The whole tensor's checks (shape, type), then the part's place in the file.
        let t = self.checked(name, dims)?;
        let (&[row_len, n_rows], true) = (dims, rows.start < rows.end) else {
            return Err(Error::InvalidModel(format!(
                "tensor '{name}': rows {rows:?} of {dims:?}"
            )));
        };
        if rows.end > n_rows {
            return Err(Error::InvalidModel(format!(
                "tensor '{name}' has {n_rows} rows, not {}",
                rows.end
            )));
        }
        let row_bytes = t.ty.row_bytes(row_len).ok_or_else(|| {
            Error::InvalidModel(format!("tensor '{name}': rows of {row_len} {}", t.ty))
        })?;
        let offset = t.offset + rows.start * row_bytes;
        Ok(self
            .c
            .weight(self.file, offset, t.ty, &[row_len, rows.end - rows.start])?)
    }

    /// An optional integer hyper-parameter.
    pub fn metadata_u32(&self, key: &str) -> Result<Option<u32>> {
        self.gguf
            .metadata
            .opt_u32(key)
            .map_err(|e| Error::InvalidModel(e.to_string()))
    }

    /// An optional float hyper-parameter.
    pub fn metadata_f32(&self, key: &str) -> Result<Option<f32>> {
        self.gguf
            .metadata
            .opt_f32(key)
            .map_err(|e| Error::InvalidModel(e.to_string()))
    }

    pub fn optional(&self, name: &str, dims: &[u64]) -> Result<Option<C::Weight>> {
        if self.tensor(name).is_some() {
            self.weight(name, dims).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// The tensor types `realm:compute` has a dtype for.
pub fn computable(ty: GgmlType) -> bool {
    realm_compute::DTYPES.contains(&ty)
}
