//! The smollm3 architecture (SmolLM3): llama's blocks, with no RoPE on every fourth block
//! (NoPE layers) and the attention scale from `attention.scale` when the file has it.
//! Follows llama.cpp's `llama_model_smollm3` (src/models/smollm3.cpp).

use realm_compute::{Compute, RopeMode};
use realm_gguf::Hparams;

use super::block::Spec;
use super::plain::{self, Plain};
use super::{Architecture, Loader};
use crate::Result;

/// Files without a chat template get this one.
pub const TEMPLATE: realm_tokenizer::Builtin = realm_tokenizer::Builtin::ChatMl;

/// Every this-many-th block has no RoPE (llama.cpp's `n_no_rope_layer_step`).
const NO_ROPE_EVERY: usize = 4;

pub fn load<C: Compute>(l: &Loader<'_, C>, hp: Hparams) -> Result<Box<dyn Architecture<C>>> {
    plain::load(
        l,
        hp,
        Plain {
            name: "smollm3",
            spec: Spec::default(),
            rope_mode: RopeMode::Normal,
            scale_q: false,
            no_rope_every: Some(NO_ROPE_EVERY),
            attention_scale_key: true,
            rope_freqs: false,
            attention_temperature: false,
            long_rope: false,
        },
    )
}
