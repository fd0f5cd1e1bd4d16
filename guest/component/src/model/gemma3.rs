//! Gemma 3: embeddings scaled by √d_model, RMS norms before *and* after attention and the
//! feed-forward, per-head RMS norms on q and k, GeGLU (tanh GELU), and interleaved
//! sliding-window / global attention layers with their own RoPE bases (NeoX pairing).
//! Follows llama.cpp's `llm_build_gemma3_iswa` (src/models/gemma3-iswa.cpp).

use realm_gguf::Hparams;

use super::{Architecture, Loader, Output, Scratch, mean_pooled, rope_params};
use crate::compute::{Activation, KvCache, RopeMode, RopeParams, Weight, ops};
use crate::exports::realm::inference::types::Error;

/// Every sixth layer attends globally; the others see the last `sliding_window` positions.
const GLOBAL_EVERY: usize = 6;
/// RoPE base of the sliding-window layers when the file has no `rope.freq_base_swa`.
const SWA_FREQ_BASE: f32 = 10_000.0;

struct Layer {
    attn_norm: Weight,           // (n_embd)
    attn_q: Weight,              // (n_embd → n_head · head_dim)
    attn_k: Weight,              // (n_embd → n_head_kv · head_dim)
    attn_v: Weight,              // (n_embd → n_head_kv · head_dim)
    attn_q_norm: Weight,         // (head_dim)
    attn_k_norm: Weight,         // (head_dim)
    attn_output: Weight,         // (n_head · head_dim → n_embd)
    post_attention_norm: Weight, // (n_embd)
    ffn_norm: Weight,            // (n_embd)
    ffn_gate: Weight,            // (n_embd → n_ff)
    ffn_up: Weight,              // (n_embd → n_ff)
    ffn_down: Weight,            // (n_ff → n_embd)
    post_ffw_norm: Weight,       // (n_embd)
}

pub struct Gemma3 {
    hp: Hparams,
    token_embd: Weight,  // (n_embd, n_vocab), also the output projection
    output_norm: Weight, // (n_embd)
    layers: Vec<Layer>,
    n_vocab: u64,
    sliding_window: u32,
    /// RoPE of the global layers (the file's base and scaling) and of the sliding-window
    /// ones (their own base, never interpolated), as llama.cpp's Gemma 3 graph.
    rope_global: RopeParams,
    rope_local: RopeParams,
}

impl Gemma3 {
    pub fn load(l: &Loader<'_>, hp: Hparams) -> Result<Self, Error> {
        let (e, ff, hd) = (
            u64::from(hp.n_embd),
            u64::from(hp.n_ff),
            u64::from(hp.head_dim),
        );
        let q_dim = u64::from(hp.n_head) * hd;
        let kv_dim = u64::from(hp.n_head_kv) * hd;
        let n_vocab = l.n_vocab()?;
        let sliding_window = l
            .metadata_u32("gemma3.attention.sliding_window")?
            .unwrap_or(0);
        let layers = (0..hp.n_layer)
            .map(|i| {
                let w =
                    |name: &str, dims: &[u64]| l.weight(&format!("blk.{i}.{name}.weight"), dims);
                Ok(Layer {
                    attn_norm: w("attn_norm", &[e])?,
                    attn_q: w("attn_q", &[e, q_dim])?,
                    attn_k: w("attn_k", &[e, kv_dim])?,
                    attn_v: w("attn_v", &[e, kv_dim])?,
                    attn_q_norm: w("attn_q_norm", &[hd])?,
                    attn_k_norm: w("attn_k_norm", &[hd])?,
                    attn_output: w("attn_output", &[q_dim, e])?,
                    post_attention_norm: w("post_attention_norm", &[e])?,
                    ffn_norm: w("ffn_norm", &[e])?,
                    ffn_gate: w("ffn_gate", &[e, ff])?,
                    ffn_up: w("ffn_up", &[e, ff])?,
                    ffn_down: w("ffn_down", &[ff, e])?,
                    post_ffw_norm: w("post_ffw_norm", &[e])?,
                })
            })
            .collect::<Result<_, Error>>()?;
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
        Ok(Self {
            token_embd: l.weight("token_embd.weight", &[e, n_vocab])?,
            output_norm: l.weight("output_norm.weight", &[e])?,
            layers,
            rope_global: rope_params(&hp, RopeMode::Neox, hp.rope_freq_base, &hp.rope_scaling),
            rope_local: rope_params(&hp, RopeMode::Neox, swa_base, &local_scaling),
            hp,
            n_vocab,
            sliding_window,
        })
    }
}

impl Architecture for Gemma3 {
    fn hparams(&self) -> &Hparams {
        &self.hp
    }

    fn scratch(&self) -> Scratch {
        Scratch::new(&self.hp, self.n_vocab as u32, true)
    }

    fn forward(
        &self,
        s: &Scratch,
        cache: &KvCache,
        ids: &[u32],
        pos: u32,
        out: Output,
    ) -> Result<Vec<f32>, Error> {
        let hp = &self.hp;
        let eps = hp.rms_eps;
        let q_scale = 1.0 / (hp.head_dim as f32).sqrt();
        ops::embed(&self.token_embd, ids, (hp.n_embd as f32).sqrt(), &s.x)?;
        for (il, l) in self.layers.iter().enumerate() {
            // Without a window every layer is global (llama.cpp's LLAMA_SWA_TYPE_NONE).
            let global = self.sliding_window == 0 || (il + 1) % GLOBAL_EVERY == 0;
            let (rope, window) = if global {
                (self.rope_global, 0)
            } else {
                (self.rope_local, self.sliding_window)
            };

            // Attention: pre-norm, projections, per-head q/k norms, RoPE, scaled q.
            ops::rms_norm(&s.x, &l.attn_norm, eps, &s.xb)?;
            ops::matmul(&s.xb, &l.attn_q, &s.q)?;
            ops::matmul(&s.xb, &l.attn_k, &s.k)?;
            ops::matmul(&s.xb, &l.attn_v, &s.v)?;
            ops::rms_norm(&s.q, &l.attn_q_norm, eps, &s.qn)?;
            ops::rms_norm(&s.k, &l.attn_k_norm, eps, &s.kn)?;
            ops::rope(&s.qn, pos, rope, None)?;
            ops::rope(&s.kn, pos, rope, None)?;
            ops::scale(&s.qn, q_scale)?;
            ops::attention(
                &s.qn, &s.kn, &s.v, cache, il as u32, pos, hp.n_head, 1.0, window, &s.att,
            )?;
            ops::matmul(&s.att, &l.attn_output, &s.xb)?;
            // Post-attention norm, then the residual.
            ops::rms_norm(&s.xb, &l.post_attention_norm, eps, &s.xb2)?;
            ops::add(&s.x, &s.xb2)?;

            // Feed-forward: pre-norm, GeGLU, post-norm, residual.
            ops::rms_norm(&s.x, &l.ffn_norm, eps, &s.xb)?;
            ops::matmul(&s.xb, &l.ffn_gate, &s.gate)?;
            ops::matmul(&s.xb, &l.ffn_up, &s.up)?;
            ops::glu(&s.gate, &s.up, Activation::GeluTanh)?;
            ops::matmul(&s.up, &l.ffn_down, &s.xb)?;
            ops::rms_norm(&s.xb, &l.post_ffw_norm, eps, &s.xb2)?;
            ops::add(&s.x, &s.xb2)?;
        }
        if out == Output::MeanPooled {
            ops::rms_norm(&s.x, &self.output_norm, eps, &s.xb)?;
            return mean_pooled(&s.xb, ids.len());
        }
        ops::keep_last_row(&s.x)?;
        ops::rms_norm(&s.x, &self.output_norm, eps, &s.xb)?;
        ops::matmul(&s.xb, &self.token_embd, &s.logits)?;
        Ok(s.logits.read_row(0)?)
    }
}
