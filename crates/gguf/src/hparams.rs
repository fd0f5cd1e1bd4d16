//! The transformer hyper-parameters every architecture shares, read from `{arch}.*` keys and
//! checked against each other and against the tensors before anything is sized from them.

use crate::{GgufError, GgufFile, Result};

/// Most transformer blocks accepted (the largest open models have ~130).
pub const MAX_LAYERS: u32 = 4096;
/// Largest trained context accepted; the runtime context is chosen separately.
pub const MAX_CONTEXT: u32 = 1 << 24;
/// Largest embedding / feed-forward width accepted.
pub const MAX_WIDTH: u32 = 1 << 20;

/// Shape of a decoder-only transformer, named as in llama2.c and the GGUF keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Hparams {
    pub arch: String,
    pub n_layer: u32,
    pub n_embd: u32,
    pub n_ff: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    /// Per-head width of queries and keys (`attention.key_length`, else `n_embd / n_head`).
    pub head_dim: u32,
    pub n_ctx_train: u32,
    pub rope_freq_base: f32,
    /// Leading values of each head that RoPE rotates (`rope.dimension_count`, else head_dim).
    pub n_rot: u32,
    pub rope_scaling: RopeScaling,
    pub rms_eps: f32,
}

/// `rope.scaling.type`, as llama.cpp names the kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeScalingType {
    None,
    Linear,
    Yarn,
    /// Phi-3's long/short factor tensors.
    LongRope,
}

impl RopeScalingType {
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Linear => "linear",
            Self::Yarn => "yarn",
            Self::LongRope => "longrope",
        }
    }
}

/// RoPE scaling as llama.cpp applies it to a file (its `llama_context` defaults, with no
/// user overrides): the parameters of ggml's `rope_ext` besides the base and the optional
/// per-pair frequency factors (a tensor, which the architecture loads).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeScaling {
    pub kind: RopeScalingType,
    /// 1 / `rope.scaling.factor` (1 when the file gives none, or for `none`).
    pub freq_scale: f32,
    /// 1 for YaRN, else 0.
    pub ext_factor: f32,
    /// cos/sin magnitude: `rope.scaling.attn_factor`, times YaRN's correction.
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
    /// `rope.scaling.original_context_length`, else the training context.
    pub n_ctx_orig: u32,
}

impl RopeScaling {
    /// No scaling at all.
    pub fn none(n_ctx_orig: u32) -> Self {
        Self {
            kind: RopeScalingType::None,
            freq_scale: 1.0,
            ext_factor: 0.0,
            attn_factor: 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            n_ctx_orig,
        }
    }

    /// Read `{arch}.rope.scaling.*` (and the older `rope.scale_linear`) with llama.cpp's
    /// defaults: type `linear`, factor 1, attention factor 1, β 32 / 1.
    fn from_metadata(md: &crate::Metadata, arch: &str, n_ctx_train: u32) -> Result<Self> {
        let key = |k: &str| format!("{arch}.{k}");
        let bad = |k: &str, reason: String| GgufError::BadHparam {
            key: key(k),
            reason,
        };
        let kind = match md.opt_str(&key("rope.scaling.type"))?.unwrap_or("linear") {
            "none" => RopeScalingType::None,
            "linear" => RopeScalingType::Linear,
            "yarn" => RopeScalingType::Yarn,
            "longrope" => RopeScalingType::LongRope,
            other => {
                return Err(bad(
                    "rope.scaling.type",
                    format!(
                        "'{other}' is not a RoPE scaling llama.cpp knows (none, linear, yarn, longrope)"
                    ),
                ));
            }
        };
        let factor_key = if md.get(&key("rope.scaling.factor")).is_some() {
            "rope.scaling.factor"
        } else {
            "rope.scale_linear"
        };
        let factor = md.opt_f32(&key(factor_key))?.unwrap_or(0.0);
        if !(factor.is_finite() && factor >= 0.0) {
            return Err(bad(
                factor_key,
                format!("{factor} is not a non-negative number"),
            ));
        }
        let attn = md.opt_f32(&key("rope.scaling.attn_factor"))?.unwrap_or(1.0);
        if !(attn.is_finite() && attn > 0.0) {
            return Err(bad(
                "rope.scaling.attn_factor",
                format!("{attn} is not a positive number"),
            ));
        }
        let n_ctx_orig = match md.opt_u32(&key("rope.scaling.original_context_length"))? {
            Some(0) | None => n_ctx_train,
            Some(v) if v > MAX_CONTEXT => {
                return Err(bad(
                    "rope.scaling.original_context_length",
                    format!("{v} is outside 1..={MAX_CONTEXT}"),
                ));
            }
            Some(v) => v,
        };
        let mut s = Self::none(n_ctx_orig);
        s.kind = kind;
        if kind != RopeScalingType::None && factor != 0.0 {
            s.freq_scale = 1.0 / factor;
        }
        // YaRN's β and log multiplier from the file: llama.cpp reads them for Mistral 3 only
        // (of the architectures Realm runs).
        let yarn_keys = arch == "mistral3";
        let opt = |k: &str| -> Result<Option<f32>> {
            match yarn_keys {
                true => match md.opt_f32(&key(k))? {
                    Some(v) if !v.is_finite() => Err(bad(k, format!("{v} is not a number"))),
                    v => Ok(v),
                },
                false => Ok(None),
            }
        };
        if let Some(v) = opt("rope.scaling.yarn_beta_fast")? {
            s.beta_fast = v;
        }
        if let Some(v) = opt("rope.scaling.yarn_beta_slow")? {
            s.beta_slow = v;
        }
        let log_mul = opt("rope.scaling.yarn_log_multiplier")?.unwrap_or(0.0);
        if kind == RopeScalingType::Yarn {
            // llama_context: YaRN's magnitude correction (over the one for the log
            // multiplier, where the file has one), cancelled against the one ggml's rope
            // applies again (llama.cpp PR 17945), computed with its float FMAs.
            s.ext_factor = 1.0;
            let factor = 1.0 / s.freq_scale;
            let mscale = |scale: f32, m: f32| {
                if scale <= 1.0 {
                    1.0
                } else {
                    (0.1f32 * m).mul_add(scale.ln(), 1.0)
                }
            };
            s.attn_factor = if log_mul != 0.0 {
                mscale(factor, 1.0) / mscale(factor, log_mul)
            } else {
                mscale(factor, 1.0)
            };
            s.attn_factor *= 1.0 / 0.1f32.mul_add(factor.ln(), 1.0);
        }
        s.attn_factor *= attn;
        Ok(s)
    }
}

impl Hparams {
    /// Read and validate; every error names the offending key and value.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let md = &file.metadata;
        let arch = file.architecture()?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let bad = |k: &str, reason: String| GgufError::BadHparam {
            key: key(k),
            reason,
        };
        let bounded = |k: &str, lo: u32, hi: u32| -> Result<u32> {
            let v = md.u32(&key(k))?;
            if v < lo || v > hi {
                return Err(bad(k, format!("{v} is outside {lo}..={hi}")));
            }
            Ok(v)
        };

        let n_layer = bounded("block_count", 1, MAX_LAYERS)?;
        let n_embd = bounded("embedding_length", 1, MAX_WIDTH)?;
        let n_ff = bounded("feed_forward_length", 1, MAX_WIDTH)?;
        let n_head = bounded("attention.head_count", 1, n_embd.max(1))?;
        let n_head_kv = match md.opt_u32(&key("attention.head_count_kv"))? {
            None => n_head,
            Some(v) if v == 0 || n_head % v != 0 => {
                return Err(bad(
                    "attention.head_count_kv",
                    format!("{v} does not divide attention.head_count {n_head}"),
                ));
            }
            Some(v) => v,
        };
        let head_dim = match md.opt_u32(&key("attention.key_length"))? {
            Some(v) if v == 0 || v > MAX_WIDTH => {
                return Err(bad(
                    "attention.key_length",
                    format!("{v} is outside 1..={MAX_WIDTH}"),
                ));
            }
            Some(v) => v,
            None if n_embd % n_head != 0 => {
                return Err(bad(
                    "attention.head_count",
                    format!("{n_head} does not divide embedding_length {n_embd}"),
                ));
            }
            None => n_embd / n_head,
        };
        let n_ctx_train = bounded("context_length", 1, MAX_CONTEXT)?;
        let rope_freq_base = md.opt_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        if !(rope_freq_base.is_finite() && rope_freq_base > 0.0) {
            return Err(bad(
                "rope.freq_base",
                format!("{rope_freq_base} is not a positive number"),
            ));
        }
        let n_rot = match md.opt_u32(&key("rope.dimension_count"))? {
            None => head_dim,
            Some(v) if v == 0 || v % 2 != 0 || v > head_dim => {
                return Err(bad(
                    "rope.dimension_count",
                    format!("{v} is not an even number in 2..={head_dim} (the head width)"),
                ));
            }
            Some(v) => v,
        };
        let rope_scaling = RopeScaling::from_metadata(md, &arch, n_ctx_train)?;
        let rms_eps = md
            .opt_f32(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5);
        if !(rms_eps.is_finite() && rms_eps > 0.0 && rms_eps < 1.0) {
            return Err(bad(
                "attention.layer_norm_rms_epsilon",
                format!("{rms_eps} is not in (0, 1)"),
            ));
        }

        // The file must hold tensors for exactly the blocks it announces.
        let last = format!("blk.{}.", n_layer - 1);
        let beyond = format!("blk.{n_layer}.");
        if !file.tensors.iter().any(|t| t.name.starts_with(&last)) {
            return Err(bad(
                "block_count",
                format!(
                    "{n_layer}, but the file has no tensors for block {}",
                    n_layer - 1
                ),
            ));
        }
        if file.tensors.iter().any(|t| t.name.starts_with(&beyond)) {
            return Err(bad(
                "block_count",
                format!("{n_layer}, but the file has tensors for block {n_layer}"),
            ));
        }

        Ok(Self {
            arch,
            n_layer,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            n_ctx_train,
            rope_freq_base,
            n_rot,
            rope_scaling,
            rms_eps,
        })
    }
}
