//! The llama architecture (Llama 2/3, SmolLM, Mistral-style): RMSNorm, GQA attention with
//! RoPE (adjacent pairs; Llama 3's per-pair frequency factors, linear or YaRN scaling),
//! SwiGLU feed-forward, optionally tied output embeddings.
//! Follows llama.cpp's `llm_build_llama` (src/models/llama.cpp).

use realm_gguf::{Hparams, RopeScalingType};

use super::{Architecture, Loader, Output, Scratch, mean_pooled, rope_params};
use crate::compute::{Activation, KvCache, RopeMode, RopeParams, Weight, ops};
use crate::exports::realm::inference::types::Error;

struct Layer {
    attn_norm: Weight,   // (n_embd)
    attn_q: Weight,      // (n_embd → n_head · head_dim)
    attn_k: Weight,      // (n_embd → n_head_kv · head_dim)
    attn_v: Weight,      // (n_embd → n_head_kv · head_dim)
    attn_output: Weight, // (n_head · head_dim → n_embd)
    ffn_norm: Weight,    // (n_embd)
    ffn_gate: Weight,    // (n_embd → n_ff)
    ffn_up: Weight,      // (n_embd → n_ff)
    ffn_down: Weight,    // (n_ff → n_embd)
}

pub struct Llama {
    hp: Hparams,
    token_embd: Weight,     // (n_embd, n_vocab)
    output_norm: Weight,    // (n_embd)
    output: Option<Weight>, // (n_embd → n_vocab); absent when tied to token_embd
    /// (n_rot / 2) Llama 3's RoPE frequency divisors (`rope_freqs`), shared by all layers.
    rope_freqs: Option<Weight>,
    rope: RopeParams,
    layers: Vec<Layer>,
    n_vocab: u64,
}

impl Llama {
    pub fn load(l: &Loader<'_>, hp: Hparams) -> Result<Self, Error> {
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
        let (e, ff) = (u64::from(hp.n_embd), u64::from(hp.n_ff));
        let q_dim = u64::from(hp.n_head) * u64::from(hp.head_dim);
        let kv_dim = u64::from(hp.n_head_kv) * u64::from(hp.head_dim);
        let n_vocab = l.n_vocab()?;
        let layers = (0..hp.n_layer)
            .map(|i| {
                let w =
                    |name: &str, dims: &[u64]| l.weight(&format!("blk.{i}.{name}.weight"), dims);
                Ok(Layer {
                    attn_norm: w("attn_norm", &[e])?,
                    attn_q: w("attn_q", &[e, q_dim])?,
                    attn_k: w("attn_k", &[e, kv_dim])?,
                    attn_v: w("attn_v", &[e, kv_dim])?,
                    attn_output: w("attn_output", &[q_dim, e])?,
                    ffn_norm: w("ffn_norm", &[e])?,
                    ffn_gate: w("ffn_gate", &[e, ff])?,
                    ffn_up: w("ffn_up", &[e, ff])?,
                    ffn_down: w("ffn_down", &[ff, e])?,
                })
            })
            .collect::<Result<_, Error>>()?;
        Ok(Self {
            token_embd: l.weight("token_embd.weight", &[e, n_vocab])?,
            output_norm: l.weight("output_norm.weight", &[e])?,
            output: l.optional("output.weight", &[e, n_vocab])?,
            rope_freqs: l.optional("rope_freqs.weight", &[u64::from(hp.n_rot / 2)])?,
            rope: rope_params(&hp, RopeMode::Normal, hp.rope_freq_base, &hp.rope_scaling),
            layers,
            hp,
            n_vocab,
        })
    }
}

impl Architecture for Llama {
    fn hparams(&self) -> &Hparams {
        &self.hp
    }

    fn scratch(&self) -> Scratch {
        Scratch::new(&self.hp, self.n_vocab as u32, false)
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
        let scale = 1.0 / (hp.head_dim as f32).sqrt();
        ops::embed(&self.token_embd, ids, 1.0, &s.x)?;
        for (il, l) in self.layers.iter().enumerate() {
            // Attention: pre-norm, projections, RoPE, cached causal attention, residual.
            ops::rms_norm(&s.x, &l.attn_norm, hp.rms_eps, &s.xb)?;
            ops::matmul(&s.xb, &l.attn_q, &s.q)?;
            ops::matmul(&s.xb, &l.attn_k, &s.k)?;
            ops::matmul(&s.xb, &l.attn_v, &s.v)?;
            ops::rope(&s.q, pos, self.rope, self.rope_freqs.as_ref())?;
            ops::rope(&s.k, pos, self.rope, self.rope_freqs.as_ref())?;
            ops::attention(
                &s.q, &s.k, &s.v, cache, il as u32, pos, hp.n_head, scale, 0, &s.att,
            )?;
            ops::matmul(&s.att, &l.attn_output, &s.xb)?;
            ops::add(&s.x, &s.xb)?;

            // Feed-forward: pre-norm, SwiGLU, residual.
            ops::rms_norm(&s.x, &l.ffn_norm, hp.rms_eps, &s.xb)?;
            ops::matmul(&s.xb, &l.ffn_gate, &s.gate)?;
            ops::matmul(&s.xb, &l.ffn_up, &s.up)?;
            ops::glu(&s.gate, &s.up, Activation::Silu)?;
            ops::matmul(&s.up, &l.ffn_down, &s.xb)?;
            ops::add(&s.x, &s.xb)?;
        }
        if out == Output::MeanPooled {
            ops::rms_norm(&s.x, &self.output_norm, hp.rms_eps, &s.xb)?;
            return mean_pooled(&s.xb, ids.len());
        }
        // Only the last position's logits are needed.
        ops::keep_last_row(&s.x)?;
        ops::rms_norm(&s.x, &self.output_norm, hp.rms_eps, &s.xb)?;
        ops::matmul(
            &s.xb,
            self.output.as_ref().unwrap_or(&self.token_embd),
            &s.logits,
        )?;
        Ok(s.logits.read_row(0)?)
    }
}
