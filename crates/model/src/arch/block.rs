//! The pre-norm decoder block every architecture here is built from, and the parts around
//! it (embeddings, the output norm and projection, pooling). An architecture says what its
//! blocks have ([`Spec`]) and how each layer runs ([`Layer`]); the order of the ops, which
//! fixes the numerics, is written once, here.

use realm_compute::{Activation, Compute, RopeParams};
use realm_gguf::Hparams;

use super::{Loader, Output, Scratch};
use crate::{Error, Result};

/// What a block has beyond llama's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spec {
    /// Per-head RMS norms of q and k before RoPE (`attn_q_norm`, `attn_k_norm`).
    pub qk_norm: bool,
    /// RMS norms of the attention and feed-forward outputs before their residuals
    /// (`post_attention_norm`, `post_ffw_norm`).
    pub post_norms: bool,
    /// Biases added to the q, k and v projections (`attn_q.bias`, …: Qwen 2).
    pub qkv_bias: bool,
    /// The feed-forward's gate and up projections fused in `ffn_up` (gate rows first), and
    /// q, k and v in `attn_qkv` where the file has it (Phi-3).
    pub fused: bool,
}

/// One block's weights.
pub struct Block<W> {
    attn_norm: W,   // (n_embd)
    attn_q: W,      // (n_embd → n_head · head_dim)
    attn_k: W,      // (n_embd → n_head_kv · head_dim)
    attn_v: W,      // (n_embd → n_head_kv · head_dim)
    attn_output: W, // (n_head · head_dim → n_embd)
    ffn_norm: W,    // (n_embd)
    ffn_gate: W,    // (n_embd → n_ff)
    ffn_up: W,      // (n_embd → n_ff)
    ffn_down: W,    // (n_ff → n_embd)
    /// (head_dim) ×2.
    qk_norm: Option<(W, W)>,
    /// (n_embd) ×2: after attention, after the feed-forward.
    post_norms: Option<(W, W)>,
    /// (q_dim), (kv_dim) ×2, each where the file has it.
    qkv_bias: [Option<W>; 3],
}

/// Where the attention scores are scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QScale {
    /// By the attention op (llama: `kq_scale`).
    InAttention(f32),
    /// On q before attention, which then scales by 1 (Gemma: `ggml_scale(Qcur)`).
    OnQ(f32),
}

/// How one layer runs.
pub struct Layer<'a, W> {
    pub rope: RopeParams,
    /// Per-pair RoPE frequency divisors (Llama 3's `rope_freqs`).
    pub rope_factors: Option<&'a W>,
    /// Attend to the last `window` positions only (0: all).
    pub window: u32,
    pub q_scale: QScale,
    pub activation: Activation,
    /// Rows (tokens) in this step.
    pub rows: usize,
    /// Whether q and k are rotated (SmolLM3 skips RoPE on every fourth block).
    pub use_rope: bool,
    /// Attention logit soft-capping (0: none; Gemma 2).
    pub softcap: f32,
    /// q's attention temperature after RoPE, a factor per row (Mistral 3's Llama-4-style
    /// scaling by position; `None`: none).
    pub q_temp: Option<&'a [f32]>,
    /// The last block of a step whose logits are wanted: after attention only the last row
    /// goes on (as llama.cpp's `inp_out_ids`), so its feed-forward is one row's — the same
    /// numbers as llama.cpp's wherever a product's order depends on its rows (K-quants).
    pub last_row_only: bool,
}

impl<W> Layer<'_, W> {
    /// A Gemma block (Gemma 2 and 3): GELU, q scaled before attention, and either local
    /// attention over the last `window` positions with `local`'s RoPE, or global attention
    /// with `global`'s (`window` `None`).
    pub fn gemma(
        (local, global): (RopeParams, RopeParams),
        window: Option<u32>,
        q_scale: f32,
        softcap: f32,
        rows: usize,
        last_row_only: bool,
    ) -> Self {
        Layer {
            rope: if window.is_some() { local } else { global },
            rope_factors: None,
            window: window.unwrap_or(0),
            q_scale: QScale::OnQ(q_scale),
            activation: Activation::GeluTanh,
            rows,
            use_rope: true,
            softcap,
            q_temp: None,
            last_row_only,
        }
    }
}

/// The whole stack: embeddings, blocks, output norm and projection.
pub struct Decoder<W> {
    pub hp: Hparams,
    pub n_vocab: u64,
    pub spec: Spec,
    token_embd: W,  // (n_embd, n_vocab)
    output_norm: W, // (n_embd)
    /// (n_embd → n_vocab); `None` when tied to `token_embd`.
    output: Option<W>,
    pub blocks: Vec<Block<W>>,
}

/// Whether the output projection is a tensor of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputWeight {
    /// `output.weight` if the file has it, else the embeddings (llama).
    Optional,
    /// Always the embeddings (Gemma).
    Tied,
}

impl<W> Decoder<W> {
    /// Loads the embeddings, `hp.n_layer` blocks shaped as `spec`, and the output.
    pub fn load<C: Compute<Weight = W>>(
        l: &Loader<'_, C>,
        hp: Hparams,
        spec: Spec,
        output: OutputWeight,
    ) -> Result<Self> {
        let (e, ff, hd) = (
            u64::from(hp.n_embd),
            u64::from(hp.n_ff),
            u64::from(hp.head_dim),
        );
        let q_dim = u64::from(hp.n_head) * hd;
        let kv_dim = u64::from(hp.n_head_kv) * hd;
        let n_vocab = l.n_vocab()?;
        let blocks = (0..hp.n_layer)
            .map(|i| {
                let w =
                    |name: &str, dims: &[u64]| l.weight(&format!("blk.{i}.{name}.weight"), dims);
                let qkv_name = format!("blk.{i}.attn_qkv.weight");
                let (attn_q, attn_k, attn_v) = if spec.fused && l.tensor(&qkv_name).is_some() {
                    let all = [e, q_dim + 2 * kv_dim];
                    (
                        l.weight_rows(&qkv_name, &all, 0..q_dim)?,
                        l.weight_rows(&qkv_name, &all, q_dim..q_dim + kv_dim)?,
                        l.weight_rows(&qkv_name, &all, q_dim + kv_dim..q_dim + 2 * kv_dim)?,
                    )
                } else {
                    (
                        w("attn_q", &[e, q_dim])?,
                        w("attn_k", &[e, kv_dim])?,
                        w("attn_v", &[e, kv_dim])?,
                    )
                };
                let (ffn_gate, ffn_up) = if spec.fused {
                    let up = format!("blk.{i}.ffn_up.weight");
                    let all = [e, 2 * ff];
                    (
                        l.weight_rows(&up, &all, 0..ff)?,
                        l.weight_rows(&up, &all, ff..2 * ff)?,
                    )
                } else {
                    (w("ffn_gate", &[e, ff])?, w("ffn_up", &[e, ff])?)
                };
                Ok(Block {
                    attn_norm: w("attn_norm", &[e])?,
                    attn_q,
                    attn_k,
                    attn_v,
                    attn_output: w("attn_output", &[q_dim, e])?,
                    ffn_norm: w("ffn_norm", &[e])?,
                    ffn_gate,
                    ffn_up,
                    ffn_down: w("ffn_down", &[ff, e])?,
                    qk_norm: match spec.qk_norm {
                        true => Some((w("attn_q_norm", &[hd])?, w("attn_k_norm", &[hd])?)),
                        false => None,
                    },
                    post_norms: match spec.post_norms {
                        true => Some((w("post_attention_norm", &[e])?, w("post_ffw_norm", &[e])?)),
                        false => None,
                    },
                    qkv_bias: match spec.qkv_bias {
                        true => {
                            let b = |name: &str, d: u64| {
                                l.optional(&format!("blk.{i}.{name}.bias"), &[d])
                            };
                            [
                                b("attn_q", q_dim)?,
                                b("attn_k", kv_dim)?,
                                b("attn_v", kv_dim)?,
                            ]
                        }
                        false => [None, None, None],
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            token_embd: l.weight("token_embd.weight", &[e, n_vocab])?,
            output_norm: l.weight("output_norm.weight", &[e])?,
            output: match output {
                OutputWeight::Optional => l.optional("output.weight", &[e, n_vocab])?,
                OutputWeight::Tied => None,
            },
            blocks,
            hp,
            n_vocab,
            spec,
        })
    }

    /// A session's buffers for this stack.
    pub fn scratch<C: Compute<Weight = W>>(&self, c: &C, n_ctx: u32) -> Scratch<C> {
        Scratch::new(c, &self.hp, self.n_vocab as u32, self.spec, n_ctx)
    }

    /// Whether block `il` of a step returning `out` goes on with the last row only after
    /// its attention ([`Layer::last_row_only`]).
    pub fn last_row_only(&self, il: usize, out: Output) -> bool {
        out == Output::Logits && il + 1 == self.blocks.len()
    }

    /// The residual stream starts as the embeddings of `ids`, times `scale`.
    pub fn embed<C: Compute<Weight = W>>(
        &self,
        c: &C,
        s: &Scratch<C>,
        ids: &[u32],
        scale: f32,
    ) -> Result<()> {
        Ok(c.embed(&self.token_embd, ids, scale, &s.x)?)
    }

    /// Block `il` on the residual stream: attention, then the gated feed-forward, each
    /// pre-normed (and post-normed where the spec says) and added back.
    #[allow(clippy::too_many_arguments, reason = "one layer's inputs")]
    pub fn block<C: Compute<Weight = W>>(
        &self,
        c: &C,
        s: &Scratch<C>,
        cache: &C::Cache,
        il: usize,
        pos: u32,
        run: &Layer<'_, W>,
    ) -> Result<()> {
        let (b, hp) = (&self.blocks[il], &self.hp);
        let eps = hp.rms_eps;
        // Attention: pre-norm, projections, (per-head q/k norms), RoPE, causal attention.
        c.rms_norm(&s.x, &b.attn_norm, eps, &s.xb)?;
        c.matmul(&s.xb, &b.attn_q, &s.q)?;
        c.matmul(&s.xb, &b.attn_k, &s.k)?;
        c.matmul(&s.xb, &b.attn_v, &s.v)?;
        // Biases: each a one-row table, its row repeated for every token, then added (the
        // attention output's buffer holds q's until attention writes it).
        if b.qkv_bias.iter().any(Option::is_some) {
            let zeros = vec![0u32; run.rows];
            for (bias, out) in [&s.q, &s.k, &s.v].into_iter().enumerate() {
                let Some(w) = &b.qkv_bias[bias] else { continue };
                let rows = match bias {
                    0 => &s.att,
                    _ => s.kv_bias.as_ref().ok_or_else(missing_scratch)?,
                };
                c.embed(w, &zeros, 1.0, rows)?;
                c.add(out, rows)?;
            }
        }
        let (q, k) = match (&b.qk_norm, &s.qk_norm) {
            (Some((qn_w, kn_w)), Some((qn, kn))) => {
                c.rms_norm(&s.q, qn_w, eps, qn)?;
                c.rms_norm(&s.k, kn_w, eps, kn)?;
                (qn, kn)
            }
            (None, _) => (&s.q, &s.k),
            (Some(_), None) => return Err(missing_scratch()),
        };
        if run.use_rope {
            c.rope(q, pos, &run.rope, run.rope_factors)?;
            c.rope(k, pos, &run.rope, run.rope_factors)?;
        }
        if let Some(t) = run.q_temp {
            c.scale_rows(q, t)?;
        }
        let kq_scale = match run.q_scale {
            QScale::InAttention(v) => v,
            QScale::OnQ(v) => {
                c.scale(q, v)?;
                1.0
            }
        };
        c.attention(
            q,
            k,
            &s.v,
            cache,
            il as u32,
            pos,
            hp.n_head,
            kq_scale,
            run.window,
            run.softcap,
            &s.att,
        )?;
        c.matmul(&s.att, &b.attn_output, &s.xb)?;
        self.residual(c, s, b.post_norms.as_ref().map(|p| &p.0))?;
        if run.last_row_only && run.rows > 1 {
            c.keep_last_row(&s.x)?;
        }

        // Feed-forward: pre-norm, gated activation, down projection.
        c.rms_norm(&s.x, &b.ffn_norm, eps, &s.xb)?;
        c.matmul(&s.xb, &b.ffn_gate, &s.gate)?;
        c.matmul(&s.xb, &b.ffn_up, &s.up)?;
        c.glu(&s.gate, &s.up, run.activation)?;
        c.matmul(&s.up, &b.ffn_down, &s.xb)?;
        self.residual(c, s, b.post_norms.as_ref().map(|p| &p.1))
    }

    /// x += xb, post-normed first when the block has that norm.
    fn residual<C: Compute<Weight = W>>(
        &self,
        c: &C,
        s: &Scratch<C>,
        post_norm: Option<&W>,
    ) -> Result<()> {
        match (post_norm, &s.post_norm) {
            (None, _) => c.add(&s.x, &s.xb)?,
            (Some(w), Some(t)) => {
                c.rms_norm(&s.xb, w, self.hp.rms_eps, t)?;
                c.add(&s.x, t)?;
            }
            (Some(_), None) => return Err(missing_scratch()),
        }
        Ok(())
    }

    /// After the last block: the output norm, then the logits of the last position, or
    /// the mean of all `n` positions' normed states, unit length.
    pub fn finish<C: Compute<Weight = W>>(
        &self,
        c: &C,
        s: &Scratch<C>,
        n: usize,
        out: Output,
    ) -> Result<Vec<f32>> {
        let eps = self.hp.rms_eps;
        if out == Output::MeanPooled {
            c.rms_norm(&s.x, &self.output_norm, eps, &s.xb)?;
            return mean_pooled(c, &s.xb, n);
        }
        // Only the last position's logits are needed.
        c.keep_last_row(&s.x)?;
        c.rms_norm(&s.x, &self.output_norm, eps, &s.xb)?;
        c.matmul(
            &s.xb,
            self.output.as_ref().unwrap_or(&self.token_embd),
            &s.logits,
        )?;
        Ok(c.read_row(&s.logits, 0)?)
    }
}

fn missing_scratch() -> Error {
    Error::Compute("the session's buffers do not match the model's blocks".into())
}

/// The mean of the `n` rows of `h`, L2-normalized.
pub fn mean_pooled<C: Compute>(c: &C, h: &C::Tensor, n: usize) -> Result<Vec<f32>> {
    let mut sum: Vec<f64> = Vec::new();
    for i in 0..n {
        let row = c.read_row(h, i as u32)?;
        if sum.is_empty() {
            sum = vec![0.0; row.len()];
        }
        for (s, v) in sum.iter_mut().zip(row) {
            *s += f64::from(v);
        }
    }
    let norm = sum.iter().map(|v| v * v).sum::<f64>().sqrt();
    let scale = if norm > 0.0 { 1.0 / norm } else { 0.0 };
    Ok(sum.iter().map(|v| (v * scale) as f32).collect())
}
