//! Gemma 2: Gemma's blocks (embeddings scaled by √d_model, RMS norms before and after
//! attention and the feed-forward, GeGLU, NeoX RoPE) with attention logit soft-capping,
//! sliding-window attention on every other layer (the even ones), q scaled before
//! attention, and the final logits soft-capped too.
//! Follows llama.cpp's `llama_model_gemma2` (src/models/gemma2.cpp).

use realm_compute::{Compute, RopeMode, RopeParams};
use realm_gguf::Hparams;

use super::block::{Decoder, Layer, OutputWeight, Spec};
use super::{Architecture, Loader, Output, Scratch, rope_params};
use crate::{Error, Result};

/// Files without a chat template get this one.
pub const TEMPLATE: realm_tokenizer::Builtin = realm_tokenizer::Builtin::Gemma;

/// llama.cpp's defaults when the file does not say.
const SLIDING_WINDOW: u32 = 4096;
const ATTN_SOFTCAP: f32 = 50.0;
const FINAL_SOFTCAP: f32 = 30.0;
/// Every this-many layers, the last attends globally; the others (the even ones) see
/// the last `sliding_window` positions.
const SWA_PATTERN: u32 = 2;

struct Gemma2<C: Compute> {
    d: Decoder<C::Weight>,
    sliding_window: u32,
    swa_pattern: u32,
    rope_global: RopeParams,
    rope_local: RopeParams,
    q_scale: f32,
    attn_softcap: f32,
    final_softcap: f32,
}

pub fn load<C: Compute>(l: &Loader<'_, C>, hp: Hparams) -> Result<Box<dyn Architecture<C>>> {
    let positive = |key: &str, default: f32| -> Result<f32> {
        let v = l.metadata_f32(key)?.unwrap_or(default);
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(Error::InvalidModel(format!(
                "{key} is {v}, not a positive number"
            )))
        }
    };
    let attn_softcap = positive("gemma2.attn_logit_softcapping", ATTN_SOFTCAP)?;
    let final_softcap = positive("gemma2.final_logit_softcapping", FINAL_SOFTCAP)?;
    let swa_base = positive("gemma2.rope.freq_base_swa", hp.rope_freq_base)?;
    let sliding_window = l
        .metadata_u32("gemma2.attention.sliding_window")?
        .unwrap_or(SLIDING_WINDOW);
    let swa_pattern = l
        .metadata_u32("gemma2.attention.sliding_window_pattern")?
        .unwrap_or(SWA_PATTERN)
        .max(1);
    // As llama.cpp: 1/√(n_embd / n_head) for the 27B model (46 layers), else 1/√head_dim.
    let q_scale = if hp.n_layer == 46 {
        1.0 / ((hp.n_embd / hp.n_head) as f32).sqrt()
    } else {
        1.0 / (hp.head_dim as f32).sqrt()
    };
    let spec = Spec {
        post_norms: true,
        ..Spec::default()
    };
    Ok(Box::new(Gemma2::<C> {
        rope_global: rope_params(&hp, RopeMode::Neox, hp.rope_freq_base, &hp.rope_scaling),
        rope_local: rope_params(&hp, RopeMode::Neox, swa_base, &hp.rope_scaling),
        d: Decoder::load(l, hp, spec, OutputWeight::Tied)?,
        sliding_window,
        swa_pattern,
        q_scale,
        attn_softcap,
        final_softcap,
    }))
}

impl<C: Compute> Architecture<C> for Gemma2<C> {
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
        let hp = &self.d.hp;
        self.d.embed(c, s, ids, (hp.n_embd as f32).sqrt())?;
        for il in 0..self.d.blocks.len() {
            // llama.cpp's swa pattern: layer il slides when il % pattern < pattern - 1.
            let sliding = (il as u32) % self.swa_pattern < self.swa_pattern - 1;
            let layer = Layer::gemma(
                (self.rope_local, self.rope_global),
                sliding.then_some(self.sliding_window),
                self.q_scale,
                self.attn_softcap,
                ids.len(),
                self.d.last_row_only(il, out),
            );
            self.d.block(c, s, cache, il, pos, &layer)?;
        }
        let mut v = self.d.finish(c, s, ids.len(), out)?;
        if out == Output::Logits {
            // Final soft-capping as ggml: × (1/cap), tanh, × cap.
            let inv = 1.0 / self.final_softcap;
            for x in &mut v {
                *x = (*x * inv).tanh() * self.final_softcap;
            }
        }
        Ok(v)
    }
}
