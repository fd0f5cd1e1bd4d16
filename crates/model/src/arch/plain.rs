//! Llama and the llama-shaped architectures that differ from it only in data: which optional
//! tensors their blocks have ([`Spec`]), how RoPE pairs values, where the attention scale
//! is applied, and which blocks skip RoPE. Each such architecture's module is a
//! [`Plain`] description and a `load` that passes it here.

use realm_compute::{Activation, Compute, RopeMode, RopeParams};
use realm_gguf::{Hparams, RopeScalingType};

use super::block::{Decoder, Layer, OutputWeight, QScale, Spec};
use super::{Architecture, Loader, Output, Scratch, rope_params};
use crate::{Error, Result};

/// What a llama-shaped architecture does differently.
pub struct Plain {
    /// `general.architecture`, for messages and metadata keys.
    pub name: &'static str,
    pub spec: Spec,
    pub rope_mode: RopeMode,
    /// Scale q before attention (Phi-3) instead of the scores in it.
    pub scale_q: bool,
    /// Every this-many-th block skips RoPE (SmolLM3: 4).
    pub no_rope_every: Option<usize>,
    /// The file's `attention.scale` replaces 1/sqrt(head_dim) when set (SmolLM3; llama.cpp
    /// ignores the key for the others).
    pub attention_scale_key: bool,
    /// Llama 3's per-pair RoPE frequency divisors (`rope_freqs.weight`) where the file has
    /// them.
    pub rope_freqs: bool,
    /// Llama 4's attention temperature where the file sets `attention.temperature_scale`
    /// (Mistral 3): q times ln(⌊pos / n_ctx_orig⌋ + 1) · scale + 1 after RoPE.
    pub attention_temperature: bool,
    /// LongRoPE's per-pair factors where the file has them (Phi-3's 128k models:
    /// `rope_factors_long` when the session's context is larger than the original one,
    /// else `rope_factors_short`, as llama.cpp).
    pub long_rope: bool,
}

/// LongRoPE's two sets of per-pair RoPE frequency divisors.
struct LongRope<W> {
    long: W,
    short: W,
    n_ctx_orig: u32,
}

struct Model<C: Compute> {
    d: Decoder<C::Weight>,
    /// (n_rot / 2) RoPE frequency divisors, shared by all layers.
    rope_freqs: Option<C::Weight>,
    rope: RopeParams,
    q_scale: QScale,
    no_rope_every: Option<usize>,
    /// (`attention.temperature_scale`, RoPE's original context) where set.
    temperature: Option<(f32, u32)>,
    long_rope: Option<LongRope<C::Weight>>,
}

pub fn load<C: Compute>(
    l: &Loader<'_, C>,
    hp: Hparams,
    a: Plain,
) -> Result<Box<dyn Architecture<C>>> {
    let name = a.name;
    if hp.n_rot != hp.head_dim {
        return Err(Error::InvalidModel(format!(
            "{name}.rope.dimension_count is {}, but {name} rotates whole heads of {}",
            hp.n_rot, hp.head_dim
        )));
    }
    let long_rope = match a.long_rope {
        true => {
            let dims = [u64::from(hp.n_rot / 2)];
            match (
                l.optional("rope_factors_long.weight", &dims)?,
                l.optional("rope_factors_short.weight", &dims)?,
            ) {
                (Some(long), Some(short)) => Some(LongRope {
                    long,
                    short,
                    n_ctx_orig: hp.rope_scaling.n_ctx_orig,
                }),
                (None, None) => None,
                _ => {
                    return Err(Error::InvalidModel(format!(
                        "{name} has one of rope_factors_long.weight and \
                         rope_factors_short.weight but not the other"
                    )));
                }
            }
        }
        false => None,
    };
    if hp.rope_scaling.kind == RopeScalingType::LongRope && long_rope.is_none() {
        return Err(match a.long_rope {
            true => Error::InvalidModel(format!(
                "RoPE scaling 'longrope' needs rope_factors_long.weight and \
                 rope_factors_short.weight, which this {name} file lacks"
            )),
            false => Error::Unsupported(format!(
                "RoPE scaling 'longrope' (long/short factor tensors) is not supported for \
                 {name}; supported: none, linear, yarn{}",
                if a.rope_freqs {
                    ", and Llama 3's rope_freqs"
                } else {
                    ""
                }
            )),
        });
    }
    // `attention.scale` when read and set (and not 0), else 1/sqrt(head_dim).
    let key = format!("{name}.attention.scale");
    let scale = match a
        .attention_scale_key
        .then(|| l.metadata_f32(&key))
        .transpose()?
    {
        Some(Some(s)) if s != 0.0 => s,
        _ => 1.0 / (hp.head_dim as f32).sqrt(),
    };
    let temperature = match a.attention_temperature {
        true => match l.metadata_f32(&format!("{name}.attention.temperature_scale"))? {
            Some(t) if !t.is_finite() => {
                return Err(Error::InvalidModel(format!(
                    "{name}.attention.temperature_scale is {t}"
                )));
            }
            Some(t) if t != 0.0 => Some((t, hp.rope_scaling.n_ctx_orig.max(1))),
            _ => None,
        },
        false => None,
    };
    let rope_freqs = match a.rope_freqs {
        true => l.optional("rope_freqs.weight", &[u64::from(hp.n_rot / 2)])?,
        false => None,
    };
    Ok(Box::new(Model::<C> {
        rope_freqs,
        rope: rope_params(&hp, a.rope_mode, hp.rope_freq_base, &hp.rope_scaling),
        q_scale: if a.scale_q {
            QScale::OnQ(scale)
        } else {
            QScale::InAttention(scale)
        },
        no_rope_every: a.no_rope_every,
        temperature,
        long_rope,
        d: Decoder::load(l, hp, a.spec, OutputWeight::Optional)?,
    }))
}

impl<C: Compute> Architecture<C> for Model<C> {
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
        // Llama 4's temperature per row, where the file sets one and it is not 1 for every
        // row (ggml multiplies by 1 exactly, so leaving those out changes nothing).
        let temps: Option<Vec<f32>> = self.temperature.and_then(|(t, floor)| {
            let v: Vec<f32> = (0..ids.len() as u32)
                .map(|r| {
                    // llama.cpp: log(floor(pos / n) + 1.0) · scale + 1.0 in double, then
                    // float (llama.cpp's own code is built without FMA contraction).
                    let steps = ((pos + r) as f32 / floor as f32).floor();
                    ((f64::from(steps) + 1.0).ln() * f64::from(t) + 1.0) as f32
                })
                .collect();
            v.iter().any(|&f| f != 1.0).then_some(v)
        });
        self.d.embed(c, s, ids, 1.0)?;
        for il in 0..self.d.blocks.len() {
            let layer = Layer {
                rope: self.rope,
                rope_factors: match &self.long_rope {
                    Some(r) if s.n_ctx > r.n_ctx_orig => Some(&r.long),
                    Some(r) => Some(&r.short),
                    None => self.rope_freqs.as_ref(),
                },
                window: 0,
                q_scale: self.q_scale,
                activation: Activation::Silu,
                rows: ids.len(),
                use_rope: self.no_rope_every.is_none_or(|n| (il + 1) % n != 0),
                softcap: 0.0,
                q_temp: temps.as_deref(),
                last_row_only: self.d.last_row_only(il, out),
            };
            self.d.block(c, s, cache, il, pos, &layer)?;
        }
        self.d.finish(c, s, ids.len(), out)
    }
}
