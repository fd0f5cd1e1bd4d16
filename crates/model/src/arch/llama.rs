//! The llama architecture (Llama 2/3, SmolLM, Mistral-style): RMSNorm, GQA attention with
//! RoPE (adjacent pairs; Llama 3's per-pair frequency factors, linear or YaRN scaling),
//! SwiGLU feed-forward, optionally tied output embeddings.
//! Follows llama.cpp's `llm_build_llama` (src/models/llama.cpp).

use realm_compute::{Activation, Compute, RopeMode, RopeParams};
use realm_gguf::{Hparams, RopeScalingType};

use super::block::{Decoder, Layer, OutputWeight, QScale, Spec};
use super::{Architecture, Loader, Output, Scratch, rope_params};
use crate::{Error, Result};

/// Files without a chat template get this one.
pub const TEMPLATE: realm_tokenizer::Builtin = realm_tokenizer::Builtin::ChatMl;

struct Llama<C: Compute> {
    d: Decoder<C::Weight>,
    /// (n_rot / 2) Llama 3's RoPE frequency divisors (`rope_freqs`), shared by all layers.
    rope_freqs: Option<C::Weight>,
    rope: RopeParams,
}

pub fn load<C: Compute>(l: &Loader<'_, C>, hp: Hparams) -> Result<Box<dyn Architecture<C>>> {
    // llama.cpp requires the full head to rotate for llama files, and reads Phi-3's
    // long/short factor tensors for `longrope`, which Realm does not implement.
    if hp.n_rot != hp.head_dim {
        return Err(Error::InvalidModel(format!(
            "llama.rope.dimension_count is {}, but llama rotates whole heads of {}",
            hp.n_rot, hp.head_dim
        )));
    }
    if hp.rope_scaling.kind == RopeScalingType::LongRope {
        return Err(Error::Unsupported(
            "RoPE scaling 'longrope' (long/short factor tensors) is not supported yet; \
             supported: none, linear, yarn, and Llama 3's rope_freqs"
                .into(),
        ));
    }
    Ok(Box::new(Llama::<C> {
        rope_freqs: l.optional("rope_freqs.weight", &[u64::from(hp.n_rot / 2)])?,
        rope: rope_params(&hp, RopeMode::Normal, hp.rope_freq_base, &hp.rope_scaling),
        d: Decoder::load(l, hp, Spec::default(), OutputWeight::Optional)?,
    }))
}

impl<C: Compute> Architecture<C> for Llama<C> {
    fn decoder(&self) -> &Decoder<C::Weight> {
        &self.d
    }

    fn forward(
        &self,
        c: &C,
        s: &Scratch<C>,
        cache: &C::Cache,
        ids: &[u32],
        pos: u32,
        out: Output,
    ) -> Result<Vec<f32>> {
        let layer = Layer {
            rope: self.rope,
            rope_factors: self.rope_freqs.as_ref(),
            window: 0,
            q_scale: QScale::InAttention(1.0 / (self.d.hp.head_dim as f32).sqrt()),
            activation: Activation::Silu,
            rows: ids.len(),
            use_rope: true,
            softcap: 0.0,
        };
        self.d.embed(c, s, ids, 1.0)?;
        for il in 0..self.d.blocks.len() {
            self.d.block(c, s, cache, il, pos, &layer)?;
        }
        self.d.finish(c, s, ids.len(), out)
    }
}
