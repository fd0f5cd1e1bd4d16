//! The phi3 architecture (Phi-3 / 3.5 / 4-mini): llama's blocks with q, k and v fused in
//! `attn_qkv` and the gate and up projections in `ffn_up` (read as row ranges of those
//! tensors: no split op), RoPE on the halves of each head (NeoX), q scaled before
//! attention. LongRoPE (the 128k models' long/short factors) is refused for now.
//! Follows llama.cpp's `llama_model_phi3` (src/models/phi3.cpp).

use realm_compute::{Compute, RopeMode};
use realm_gguf::Hparams;

use super::block::Spec;
use super::plain::{self, Plain};
use super::{Architecture, Loader};
use crate::Result;

/// Files without a chat template get this one.
pub const TEMPLATE: realm_tokenizer::Builtin = realm_tokenizer::Builtin::ChatMl;

pub fn load<C: Compute>(l: &Loader<'_, C>, hp: Hparams) -> Result<Box<dyn Architecture<C>>> {
    let spec = Spec {
        fused: true,
        ..Spec::default()
    };
    plain::load(
        l,
        hp,
        Plain {
            name: "phi3",
            spec,
            rope_mode: RopeMode::Neox,
            scale_q: true,
            no_rope_every: None,
            attention_scale_key: false,
            rope_freqs: false,
            attention_temperature: false,
            long_rope: true,
        },
    )
}
