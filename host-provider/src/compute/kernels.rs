//! The f32 ops of a transformer, following ggml-cpu's numerics where they matter for
//! token-exact agreement with llama.cpp: RMS sums in f64, RoPE angles by repeated
//! multiplication, attention with q and the softmax weights rounded to f16 like ggml's
//! f16 matmuls over an f16 KV cache.

use half::f16;

/// y = x / sqrt(mean(x²) + eps) · w, over groups of `w.len()` values (a row or a head).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let n = w.len();
    for (xg, yg) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        let sum: f64 = xg.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((y, &x), &w) in yg.iter_mut().zip(xg).zip(w) {
            *y = (x * scale) * w;
        }
    }
}

/// Rotate each `head_dim`-wide head of `row` for position `pos` (ggml `rope` with no
/// scaling: `theta_i = pos · base^(-2i/d)`, computed as ggml does by repeated products).
pub fn rope(
    row: &mut [f32],
    head_dim: usize,
    pos: u32,
    freq_base: f32,
    neox: bool,
    cache: &mut Vec<(f32, f32)>,
) {
    let theta_scale = freq_base.powf(-2.0 / head_dim as f32);
    cache.clear();
    let mut theta = pos as f32;
    for _ in 0..head_dim / 2 {
        cache.push((theta.cos(), theta.sin()));
        theta *= theta_scale;
    }
    for head in row.chunks_exact_mut(head_dim) {
        for (i, &(c, s)) in cache.iter().enumerate() {
            let (a, b) = if neox {
                (i, i + head_dim / 2)
            } else {
                (2 * i, 2 * i + 1)
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * c - x1 * s;
            head[b] = x0 * s + x1 * c;
        }
    }
}

/// ggml's `silu`: x / (1 + e^-x).
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU, tanh approximation (ggml `gelu`).
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh())
}

/// Numerically stable softmax in place; the sum is taken in f64 as ggml does.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += f64::from(*v);
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// One layer's cached keys and values: `[pos][head_kv][head_dim]`, in f16.
#[derive(Debug, Default)]
pub struct LayerCache {
    pub k: Vec<f16>,
    pub v: Vec<f16>,
}

/// Causal attention of one query row at position `p` over `cache[..=p]` (or its last
/// `window` positions), all heads; GQA maps `n_head / n_head_kv` query heads per KV head.
#[allow(
    clippy::too_many_arguments,
    reason = "the shape of attention is this many numbers"
)]
pub fn attend_row(
    q: &[f32],
    cache: &LayerCache,
    p: usize,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    scale: f32,
    window: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let group = n_head / n_head_kv;
    let kv_width = n_head_kv * head_dim;
    let start = if window > 0 {
        (p + 1).saturating_sub(window)
    } else {
        0
    };
    for h in 0..n_head {
        let g = h / group;
        // ggml converts q to f16 for the f16 K·q matmul.
        let qh: Vec<f32> = q[h * head_dim..(h + 1) * head_dim]
            .iter()
            .map(|&v| f16::from_f32(v).to_f32())
            .collect();
        scores.clear();
        for t in start..=p {
            let k = &cache.k[t * kv_width + g * head_dim..][..head_dim];
            let s: f32 = qh.iter().zip(k).map(|(&a, &b)| a * b.to_f32()).sum();
            scores.push(s * scale);
        }
        softmax(scores);
        let o = &mut out[h * head_dim..(h + 1) * head_dim];
        o.fill(0.0);
        for (i, &w) in scores.iter().enumerate() {
            // …and the softmax weights to f16 for the f16 V·weights matmul.
            let w = f16::from_f32(w).to_f32();
            let v = &cache.v[(start + i) * kv_width + g * head_dim..][..head_dim];
            for (o, &v) in o.iter_mut().zip(v) {
                *o += w * v.to_f32();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_normalizes_each_group() {
        let x = [1.0, 1.0, 2.0, 2.0];
        let mut y = [0.0; 4];
        rms_norm(&x, &[1.0, 1.0], 0.0, &mut y);
        assert_eq!(y, [1.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let mut cache = Vec::new();
        let orig: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let mut r = orig.clone();
        rope(&mut r, 4, 0, 10000.0, false, &mut cache);
        assert_eq!(r, orig);
        rope(&mut r, 4, 7, 10000.0, true, &mut cache);
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
        assert!((norm(&r) - norm(&orig)).abs() < 1e-3);
    }

    #[test]
    fn attention_over_one_position_returns_its_value() {
        let cache = LayerCache {
            k: [1.0f32, 0.0].iter().map(|&v| f16::from_f32(v)).collect(),
            v: [3.0f32, -2.0].iter().map(|&v| f16::from_f32(v)).collect(),
        };
        let mut out = [0.0; 4];
        attend_row(
            &[0.5, 0.5, -1.0, 2.0],
            &cache,
            0,
            2,
            1,
            2,
            1.0,
            0,
            &mut Vec::new(),
            &mut out,
        );
        assert_eq!(out, [3.0, -2.0, 3.0, -2.0]);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = [1.0, 2.0, 3.0, -1000.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(x[3], 0.0);
    }
}
