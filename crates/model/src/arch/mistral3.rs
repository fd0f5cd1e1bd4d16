//! The mistral3 architecture (Ministral 3, Mistral Small 3.x text models as llama.cpp
//! converts them): llama's blocks, plus Llama 4's attention temperature (q scaled after
//! RoPE by ln(⌊pos / n_ctx_orig⌋ + 1) · `attention.temperature_scale` + 1) and YaRN's β
//! and log multiplier read from the file. Follows llama.cpp's `llama_model_mistral3`
//! (src/models/mistral3.cpp); the mixture-of-experts variant is refused by name.

use realm_compute::{Compute, RopeMode};
use realm_gguf::Hparams;

use super::block::Spec;
use super::plain::{self, Plain};
use super::{Architecture, Loader};
use crate::{Error, Result};

/// Files without a chat template get this one.
pub const TEMPLATE: realm_tokenizer::Builtin = realm_tokenizer::Builtin::ChatMl;

pub fn load<C: Compute>(l: &Loader<'_, C>, hp: Hparams) -> Result<Box<dyn Architecture<C>>> {
    if let Some(n) = l.metadata_u32("mistral3.expert_count")?
        && n > 0
    {
        return Err(Error::Unsupported(format!(
            "mistral3 with {n} experts (mixture of experts) is not supported yet"
        )));
    }
    plain::load(
        l,
        hp,
        Plain {
            name: "mistral3",
            spec: Spec::default(),
            rope_mode: RopeMode::Normal,
            scale_q: false,
            no_rope_every: None,
            attention_scale_key: false,
            rope_freqs: true,
            attention_temperature: true,
            long_rope: false,
        },
    )
}
