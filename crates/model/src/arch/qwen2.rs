//! The qwen2 architecture (Qwen 2 / 2.5, DeepSeek-R1-Distill-Qwen): llama's blocks with
//! biases on the q, k and v projections, RoPE on the halves of each head (NeoX), SwiGLU
//! feed-forward, optionally tied output embeddings.
//! Follows llama.cpp's `llama_model_qwen2` (src/models/qwen2.cpp).

use realm_compute::{Activation, Compute, RopeMode, RopeParams};
use realm_gguf::{Hparams, RopeScalingType};

use super::block::{Decoder, Layer, OutputWeight, QScale, Spec};
use super::{Architecture, Loader, Output, Scratch, rope_params};
use crate::{Error, Result};

/// Files without a chat template get this one (Qwen's ChatML).
pub const TEMPLATE: realm_tokenizer::Builtin = realm_tokenizer::Builtin::ChatMl;

struct Qwen2<C: Compute> {
    d: Decoder<C::Weight>,
    rope: RopeParams,
}

pub fn load<C: Compute>(l: &Loader<'_, C>, hp: Hparams) -> Result<Box<dyn Architecture<C>>> {
    if hp.n_rot != hp.head_dim {
        return Err(Error::InvalidModel(format!(
            "qwen2.rope.dimension_count is {}, but qwen2 rotates whole heads of {}",
            hp.n_rot, hp.head_dim
        )));
    }
    if hp.rope_scaling.kind == RopeScalingType::LongRope {
        return Err(Error::Unsupported(
            "RoPE scaling 'longrope' is not supported for qwen2".into(),
        ));
    }
    let spec = Spec {
        qkv_bias: true,
        ..Spec::default()
    };
    Ok(Box::new(Qwen2::<C> {
        rope: rope_params(&hp, RopeMode::Neox, hp.rope_freq_base, &hp.rope_scaling),
        d: Decoder::load(l, hp, spec, OutputWeight::Optional)?,
    }))
}

impl<C: Compute> Architecture<C> for Qwen2<C> {
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
            rope_factors: None,
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
