//! The architectures Realm runs, behind one trait: adding one is a new module here and a
//! line in [`load`]; nothing outside the guest changes.

mod gemma3;
mod llama;

use std::cell::RefCell;
use std::collections::BTreeSet;

use realm_gguf::{GgufFile, Hparams, RopeScaling, TensorInfo};

use crate::compute::{self, KvCache, ModelFile, RopeMode, RopeParams, Tensor, Weight};
use crate::exports::realm::inference::types::Error;

type LoadFn = fn(&Loader<'_>, Hparams) -> Result<Box<dyn Architecture>, Error>;

/// The registry: `general.architecture` → loader. One line per architecture.
const ARCHITECTURES: &[(&str, LoadFn)] = &[
    ("llama", |l, hp| Ok(Box::new(llama::Llama::load(l, hp)?))),
    ("gemma3", |l, hp| Ok(Box::new(gemma3::Gemma3::load(l, hp)?))),
];

/// Names of the architectures Realm runs.
pub fn known() -> Vec<&'static str> {
    ARCHITECTURES.iter().map(|(name, _)| *name).collect()
}

/// A loaded model's forward pass.
pub trait Architecture {
    fn hparams(&self) -> &Hparams;
    /// Activation buffers for one session, sized for this model.
    fn scratch(&self) -> Scratch;
    /// Run `ids` at positions `pos…` (appending to `cache`); `out` says what to return:
    /// the logits of the last position, or the pooled final hidden states.
    fn forward(
        &self,
        s: &Scratch,
        cache: &KvCache,
        ids: &[u32],
        pos: u32,
        out: Output,
    ) -> Result<Vec<f32>, Error>;
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

/// The mean of the `n` rows of `h`, L2-normalized.
pub fn mean_pooled(h: &Tensor, n: usize) -> Result<Vec<f32>, Error> {
    let mut sum: Vec<f64> = Vec::new();
    for i in 0..n {
        let row = h.read_row(i as u32)?;
        if sum.is_empty() {
            sum = vec![0.0; row.len()];
        }
        for (s, v) in sum.iter_mut().zip(row) {
            *s += f64::from(v);
        }
    }
    let norm = sum.iter().map(|v| v * v).sum::<f64>().sqrt();
    let scale = if norm > 0.0 { 1.0 / norm } else { 0.0 };
    Ok(sum.iter().map(|v| (v * scale) as f32).collect())
}

/// A session's activation tensors, reused for every token (nothing allocated per token).
pub struct Scratch {
    /// (n, n_embd) the residual stream.
    pub x: Tensor,
    /// (n, n_embd) normalized input to the next matmul, and matmul outputs.
    pub xb: Tensor,
    /// (n, n_embd) a second buffer for post-norms (Gemma).
    pub xb2: Tensor,
    /// (n, n_head · head_dim), (n, n_head_kv · head_dim) ×2.
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// q and k after per-head norms (Gemma), same shapes as q and k.
    pub qn: Tensor,
    pub kn: Tensor,
    /// (n, n_head · head_dim) attention output.
    pub att: Tensor,
    /// (n, n_ff) ×2 feed-forward gate and up projections.
    pub gate: Tensor,
    pub up: Tensor,
    /// (1, n_vocab).
    pub logits: Tensor,
}

impl Scratch {
    /// Buffers for `hp`; `post_norms` adds the extra ones Gemma-style blocks need.
    pub fn new(hp: &Hparams, n_vocab: u32, post_norms: bool) -> Self {
        let q_dim = hp.n_head * hp.head_dim;
        let kv_dim = hp.n_head_kv * hp.head_dim;
        let extra = |n: u32| Tensor::new(if post_norms { n } else { 0 });
        Scratch {
            x: Tensor::new(hp.n_embd),
            xb: Tensor::new(hp.n_embd),
            xb2: extra(hp.n_embd),
            q: Tensor::new(q_dim),
            k: Tensor::new(kv_dim),
            v: Tensor::new(kv_dim),
            qn: extra(q_dim),
            kn: extra(kv_dim),
            att: Tensor::new(q_dim),
            gate: Tensor::new(hp.n_ff),
            up: Tensor::new(hp.n_ff),
            logits: Tensor::new(n_vocab),
        }
    }
}

pub fn load(file: &ModelFile, gguf: &GgufFile) -> Result<Box<dyn Architecture>, Error> {
    let arch = gguf
        .architecture()
        .map_err(|e| Error::InvalidModel(e.to_string()))?;
    let Some((_, load)) = ARCHITECTURES.iter().find(|(name, _)| *name == arch) else {
        return Err(Error::Unsupported(format!(
            "architecture '{arch}' is not supported (known: {})",
            known().join(", ")
        )));
    };
    let hp = Hparams::from_gguf(gguf).map_err(|e| Error::InvalidModel(e.to_string()))?;
    let loader = Loader {
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

/// Creates host weights from the file's tensors, checking their shapes, and remembers
/// which it used: a tensor the architecture does not use (a bias, RoPE factors, experts)
/// would change llama.cpp's results, so such a file is refused instead of run wrong.
pub struct Loader<'a> {
    file: &'a ModelFile,
    gguf: &'a GgufFile,
    used: RefCell<BTreeSet<String>>,
}

impl Loader<'_> {
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.gguf.tensor(name)
    }

    /// Vocabulary size: the row count of `token_embd.weight`.
    pub fn n_vocab(&self) -> Result<u64, Error> {
        self.tensor("token_embd.weight")
            .and_then(|t| t.dims.get(1).copied())
            .ok_or_else(|| {
                Error::InvalidModel("tensor 'token_embd.weight' is missing or 1-D".into())
            })
    }

    /// Errors unless every tensor of the file was loaded.
    fn check_all_used(&self, arch: &str) -> Result<(), Error> {
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
    pub fn weight(&self, name: &str, dims: &[u64]) -> Result<Weight, Error> {
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
        let dtype = compute::dtype(t.ty).ok_or_else(|| {
            Error::Unsupported(format!(
                "tensor '{name}' has type {}, which Realm does not support yet",
                t.ty
            ))
        })?;
        Ok(self.file.weight(t.offset, dtype, &t.dims)?)
    }

    /// An optional integer hyper-parameter.
    pub fn metadata_u32(&self, key: &str) -> Result<Option<u32>, Error> {
        self.gguf
            .metadata
            .opt_u32(key)
            .map_err(|e| Error::InvalidModel(e.to_string()))
    }

    /// An optional float hyper-parameter.
    pub fn metadata_f32(&self, key: &str) -> Result<Option<f32>, Error> {
        self.gguf
            .metadata
            .opt_f32(key)
            .map_err(|e| Error::InvalidModel(e.to_string()))
    }

    pub fn optional(&self, name: &str, dims: &[u64]) -> Result<Option<Weight>, Error> {
        if self.tensor(name).is_some() {
            self.weight(name, dims).map(Some)
        } else {
            Ok(None)
        }
    }
}
