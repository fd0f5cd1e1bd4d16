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
    pub rms_eps: f32,
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
            rms_eps,
        })
    }
}
