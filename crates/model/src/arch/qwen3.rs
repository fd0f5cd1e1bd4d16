//! The qwen3 architecture (Qwen 3 dense): llama's blocks with a per-head RMS norm of q and
//! k before RoPE (`attn_q_norm`, `attn_k_norm`) and RoPE on the halves of each head (NeoX).
//! Follows llama.cpp's `llama_model_qwen3` (src/models/qwen3.cpp).

use realm_compute::{Compute, RopeMode};
use realm_gguf::Hparams;

use super::block::Spec;
use super::plain::{self, Plain};
use super::{Architecture, Loader};
use crate::Result;

/// Files without a chat template get this one (Qwen's ChatML).
pub const TEMPLATE: realm_tokenizer::Builtin = realm_tokenizer::Builtin::ChatMl;

pub fn load<C: Compute>(l: &Loader<'_, C>, hp: Hparams) -> Result<Box<dyn Architecture<C>>> {
    let spec = Spec {
        qk_norm: true,
        ..Spec::default()
    };
    plain::load(
        l,
        hp,
        Plain {
            name: "qwen3",
            spec,
            rope_mode: RopeMode::Neox,
            scale_q: false,
            no_rope_every: None,
            attention_scale_key: false,
            rope_freqs: false,
            attention_temperature: false,
            long_rope: false,
        },
    )
}
