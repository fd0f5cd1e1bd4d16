//! The phi3 architecture (Phi-3 / 3.5 / 4-mini): llama's blocks with q, k and v fused in
//! `attn_qkv` and the gate and up projections in `ffn_up` (read as row ranges of those
//! tensors: no split op), RoPE on the halves of each head (NeoX), q scaled before
//! attention. LongRoPE (the 128k models' long/short factors) is refused for now.
//! Follows llama.cpp's `llama_model_phi3` (src/models/phi3.cpp).

use realm_compute::{Activation, Compute, RopeMode, RopeParams};
use realm_gguf::{Hparams, RopeScalingType};

use super::block::{Decoder, Layer, OutputWeight, QScale, Spec};
use super::{Architecture, Loader, Output, Scratch, rope_params};
use crate::{Error, Result};

/// Files without a chat template get this one.
pub const TEMPLATE: realm_tokenizer::Builtin = realm_tokenizer::Builtin::ChatMl;

struct Phi3<C: Compute> {
    d: Decoder<C::Weight>,
    rope: RopeParams,
}

pub fn load<C: Compute>(l: &Loader<'_, C>, hp: Hparams) -> Result<Box<dyn Architecture<C>>> {
    if hp.n_rot != hp.head_dim {
        return Err(Error::InvalidModel(format!(
            "phi3.rope.dimension_count is {}, but phi3 rotates whole heads of {}",
            hp.n_rot, hp.head_dim
        )));
    }
    if hp.rope_scaling.kind == RopeScalingType::LongRope {
        return Err(Error::Unsupported(
            "RoPE scaling 'longrope' (Phi-3's long/short factors, the 128k models) is not \
             supported yet"
                .into(),
        ));
    }
    let spec = Spec {
        fused: true,
        ..Spec::default()
    };
    Ok(Box::new(Phi3::<C> {
        rope: rope_params(&hp, RopeMode::Neox, hp.rope_freq_base, &hp.rope_scaling),
        d: Decoder::load(l, hp, spec, OutputWeight::Optional)?,
    }))
}

impl<C: Compute> Architecture<C> for Phi3<C> {
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
            q_scale: QScale::OnQ(1.0 / (self.d.hp.head_dim as f32).sqrt()),
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
