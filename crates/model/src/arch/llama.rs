//! The llama architecture (Llama 2/3, SmolLM, Mistral-style): RMSNorm, GQA attention with
//! RoPE (adjacent pairs; Llama 3's per-pair frequency factors, linear or YaRN scaling),
//! SwiGLU feed-forward, optionally tied output embeddings.
//! Follows llama.cpp's `llm_build_llama` (src/models/llama.cpp).

use realm_compute::{Compute, RopeMode};
use realm_gguf::Hparams;

use super::block::Spec;
use super::plain::{self, Plain};
use super::{Architecture, Loader};
use crate::Result;

/// Files without a chat template get this one.
pub const TEMPLATE: realm_tokenizer::Builtin = realm_tokenizer::Builtin::ChatMl;

pub fn load<C: Compute>(l: &Loader<'_, C>, hp: Hparams) -> Result<Box<dyn Architecture<C>>> {
    plain::load(
        l,
        hp,
        Plain {
            name: "llama",
            spec: Spec::default(),
            rope_mode: RopeMode::Normal,
            scale_q: false,
            no_rope_every: None,
            attention_scale_key: false,
            rope_freqs: true,
            attention_temperature: false,
            long_rope: false,
        },
    )
}
