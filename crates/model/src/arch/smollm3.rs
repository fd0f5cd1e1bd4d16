//! The smollm3 architecture (SmolLM3): llama's blocks, with no RoPE on every fourth block
//! (NoPE layers) and the attention scale from `attention.scale` when the file has it.
//! Follows llama.cpp's `llama_model_smollm3` (src/models/smollm3.cpp).

use realm_compute::{Activation, Compute, RopeMode, RopeParams};
use realm_gguf::{Hparams, RopeScalingType};

use super::block::{Decoder, Layer, OutputWeight, QScale, Spec};
use super::{Architecture, Loader, Output, Scratch, rope_params};
use crate::{Error, Result};

/// Files without a chat template get this one.
pub const TEMPLATE: realm_tokenizer::Builtin = realm_tokenizer::Builtin::ChatMl;

/// Every this-many-th block has no RoPE (llama.cpp's `n_no_rope_layer_step`).
const NO_ROPE_EVERY: usize = 4;

struct SmolLm3<C: Compute> {
    d: Decoder<C::Weight>,
    rope: RopeParams,
    kq_scale: f32,
}

pub fn load<C: Compute>(l: &Loader<'_, C>, hp: Hparams) -> Result<Box<dyn Architecture<C>>> {
    if hp.n_rot != hp.head_dim {
        return Err(Error::InvalidModel(format!(
            "smollm3.rope.dimension_count is {}, but smollm3 rotates whole heads of {}",
            hp.n_rot, hp.head_dim
        )));
    }
    if hp.rope_scaling.kind == RopeScalingType::LongRope {
        return Err(Error::Unsupported(
            "RoPE scaling 'longrope' is not supported for smollm3".into(),
        ));
    }
    // `attention.scale` when set (and not 0), else 1/sqrt(head_dim), as llama.cpp.
    let kq_scale = match l.metadata_f32("smollm3.attention.scale")? {
        Some(s) if s != 0.0 => s,
        _ => 1.0 / (hp.head_dim as f32).sqrt(),
    };
    Ok(Box::new(SmolLm3::<C> {
        rope: rope_params(&hp, RopeMode::Normal, hp.rope_freq_base, &hp.rope_scaling),
        kq_scale,
        d: Decoder::load(l, hp, Spec::default(), OutputWeight::Optional)?,
    }))
}

impl<C: Compute> Architecture<C> for SmolLm3<C> {
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
        self.d.embed(c, s, ids, 1.0)?;
        for il in 0..self.d.blocks.len() {
            let layer = Layer {
                rope: self.rope,
                rope_factors: None,
                window: 0,
                q_scale: QScale::InAttention(self.kq_scale),
                activation: Activation::Silu,
                rows: ids.len(),
                use_rope: (il + 1) % NO_ROPE_EVERY != 0,
                softcap: 0.0,
            };
            self.d.block(c, s, cache, il, pos, &layer)?;
        }
        self.d.finish(c, s, ids.len(), out)
    }
}
