//! Gemma 3: embeddings scaled by √d_model, RMS norms before *and* after attention and the
//! feed-forward, per-head RMS norms on q and k, GeGLU (tanh GELU), and interleaved
//! sliding-window / global attention layers with their own RoPE bases (NeoX pairing).
//! Follows llama.cpp's `llm_build_gemma3_iswa` (src/models/gemma3-iswa.cpp).

use realm_compute::{Compute, RopeMode, RopeParams};
use realm_gguf::Hparams;

use super::block::{Decoder, Layer, OutputWeight, Spec};
use super::{Architecture, Loader, Output, Scratch, rope_params};
use crate::{Error, Result};

/// Files without a chat template get this one.
pub const TEMPLATE: realm_tokenizer::Builtin = realm_tokenizer::Builtin::Gemma;

/// Every sixth layer attends globally; the others see the last `sliding_window` positions.
const GLOBAL_EVERY: usize = 6;
/// RoPE base of the sliding-window layers when the file has no `rope.freq_base_swa`.
const SWA_FREQ_BASE: f32 = 10_000.0;

struct Gemma3<C: Compute> {
    d: Decoder<C::Weight>,
    sliding_window: u32,
    /// RoPE of the global layers (the file's base and scaling) and of the sliding-window
    /// ones (their own base, never interpolated), as llama.cpp's Gemma 3 graph.
    rope_global: RopeParams,
    rope_local: RopeParams,
}

pub fn load<C: Compute>(l: &Loader<'_, C>, hp: Hparams) -> Result<Box<dyn Architecture<C>>> {
    let sliding_window = l
        .metadata_u32("gemma3.attention.sliding_window")?
        .unwrap_or(0);
    let swa_base = l
        .metadata_f32("gemma3.rope.freq_base_swa")?
        .unwrap_or(SWA_FREQ_BASE);
    if !(swa_base.is_finite() && swa_base > 0.0) {
        return Err(Error::InvalidModel(format!(
            "gemma3.rope.freq_base_swa is {swa_base}, not a positive number"
        )));
    }
    let mut local_scaling = hp.rope_scaling;
    local_scaling.freq_scale = 1.0;
    let spec = Spec {
        qk_norm: true,
        post_norms: true,
        ..Spec::default()
    };
    Ok(Box::new(Gemma3::<C> {
        rope_global: rope_params(&hp, RopeMode::Neox, hp.rope_freq_base, &hp.rope_scaling),
        rope_local: rope_params(&hp, RopeMode::Neox, swa_base, &local_scaling),
        d: Decoder::load(l, hp, spec, OutputWeight::Tied)?,
        sliding_window,
    }))
}

impl<C: Compute> Architecture<C> for Gemma3<C> {
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
            // Without a window every layer is global (llama.cpp's LLAMA_SWA_TYPE_NONE).
            let global = self.sliding_window == 0 || (il + 1) % GLOBAL_EVERY == 0;
            let layer = Layer::gemma(
                (self.rope_local, self.rope_global),
                (!global).then_some(self.sliding_window),
                1.0 / (hp.head_dim as f32).sqrt(),
                0.0,
                ids.len(),
                self.d.last_row_only(il, out),
            );
            self.d.block(c, s, cache, il, pos, &layer)?;
        }
        self.d.finish(c, s, ids.len(), out)
    }
}
