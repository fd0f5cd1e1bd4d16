//! The f32 ops of a transformer, following ggml-cpu's numerics where they matter for
//! token-exact agreement with llama.cpp: RMS sums in f64, RoPE angles by repeated
//! multiplication, attention with q and the softmax weights rounded to f16 like ggml's
//! f16 matmuls over an f16 KV cache.

use std::sync::OnceLock;

use half::f16;

/// Every f16 as f32 (ggml keeps the same table): exact, and much faster than converting
/// in software where the build cannot assume F16C.
fn f16_table() -> &'static [f32] {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    TABLE.get_or_init(|| (0..=u16::MAX).map(|b| f16::from_bits(b).to_f32()).collect())
}

#[inline(always)]
fn f32_of(t: &[f32], h: f16) -> f32 {
    t[h.to_bits() as usize]
}

/// An f16 as f32 through the table (for targets without a conversion instruction).
#[inline(always)]
pub fn f16_to_f32(h: f16) -> f32 {
    f32_of(f16_table(), h)
}

/// y = x / sqrt(mean(x²) + eps) · w, over groups of `w.len()` values (a row or a head).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let n = w.len();
    for (xg, yg) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        // ggml squares in f32 and sums in f64.
        let sum: f64 = xg.iter().map(|&v| f64::from(v * v)).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((y, &x), &w) in yg.iter_mut().zip(xg).zip(w) {
            *y = (x * scale) * w;
        }
    }
}

/// How RoPE turns positions into angles: ggml's `rope_ext` parameters, which llama.cpp
/// derives from a file's `rope.*` keys (`realm_gguf::RopeScaling`, plus the base and head).
pub use realm_compute::RopeParams;
use realm_compute::{RopeMode, rounded};

/// Rotate each head of `row` for position `pos` as ggml's `rope_ext` does: angles
/// `pos · base^(-2i/n_rot)` by repeated products, divided by the per-pair frequency
/// `factors` when given (Llama 3's `rope_freqs`), then scaled (linear or YaRN).
pub fn rope(
    row: &mut [f32],
    p: &RopeParams,
    factors: Option<&[f32]>,
    pos: u32,
    cache: &mut Vec<(f32, f32)>,
) {
    cache.clear();
    p.angles(factors, pos, cache);
    let half = p.n_rot as usize / 2;
    let neox = p.mode == RopeMode::Neox;
    for head in row.chunks_exact_mut(p.head_dim as usize) {
        for (i, &(c, s)) in cache.iter().enumerate() {
            let (a, b) = if neox {
                (i, i + half)
            } else {
                (2 * i, 2 * i + 1)
            };
            let (x0, x1) = (head[a], head[b]);
            // ggml's C, as GCC contracts it: one product rounded, the other fused.
            head[a] = x0.mul_add(c, -(x1 * s));
            head[b] = x0.mul_add(s, x1 * c);
        }
    }
}

/// ggml's vectorized `expf` (`ggml_v_expf`, AVX-512 form): a degree-5 polynomial on the
/// reduced argument, scaled by 2^n. llama.cpp's SiLU uses it instead of libm's `expf`, and
/// the last-bit differences are enough to change greedy outputs, so Realm matches it.
#[inline(always)]
pub fn ggml_v_expf(x: f32) -> f32 {
    // The constants are ggml's hex floats (0x1.8p23, 0x1.715476p+0, …), bit for bit.
    let c = |bits: u32| f32::from_bits(bits);
    let shift = c(0x4b40_0000);
    let z = x.mul_add(c(0x3fb8_aa3b), shift);
    let n = z - shift;
    let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x));
    let u = b * b;
    let j = c(0x3c07_2010)
        .mul_add(b, c(0x3d2b_9f17))
        .mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)))
        .mul_add(u, c(0x3f7f_fff6).mul_add(b, 1.0));
    // scalef: exact in f64, then one rounding (subnormal results included). 2^n is built
    // from its bits (|n| ≤ 192 is a normal f64), and out-of-range n selected away after,
    // with no branch, so loops over this function vectorize.
    let two_n = f64::from_bits(((n as i64).wrapping_add(1023) as u64) << 52);
    let scaled = (f64::from(j) * two_n) as f32;
    let out_of_range = if n <= 0.0 { 0.0 } else { f32::INFINITY };
    if n.abs() > 192.0 {
        out_of_range
    } else {
        scaled
    }
}

/// ggml's `silu` as its AVX-512 `ggml_v_silu` computes it: x / (1 + v_expf(-x)).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + ggml_v_expf(0.0 - x))
}

/// The gate activations `glu` applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Silu,
    GeluTanh,
}

/// up ×= act(gate), element-wise, with FMA when the CPU has it (the polynomial needs it
/// to be fast; the results are the same either way).
pub fn glu(gate: &[f32], up: &mut [f32], act: Gate) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA (checked just above); the function only enables it.
        unsafe { glu_fma(gate, up, act) };
        return;
    }
    glu_portable(gate, up, act);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
fn glu_fma(gate: &[f32], up: &mut [f32], act: Gate) {
    glu_portable(gate, up, act);
}

#[inline(always)]
fn glu_portable(gate: &[f32], up: &mut [f32], act: Gate) {
    match act {
        Gate::Silu => up.iter_mut().zip(gate).for_each(|(u, &g)| *u *= silu(g)),
        Gate::GeluTanh => up
            .iter_mut()
            .zip(gate)
            .for_each(|(u, &g)| *u *= gelu_tanh(g)),
    }
}

/// GELU, tanh approximation, as ggml-cpu evaluates it: through its f16 lookup table
/// (`ggml_table_gelu_f16`, built from `ggml_gelu_f32` of every f16), saturating outside
/// ±10.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    if x <= -10.0 {
        return 0.0;
    }
    if x >= 10.0 {
        return x;
    }
    gelu_table()[f16::from_f32(x).to_bits() as usize]
}

/// [`gelu_of_f16`] of every f16, computed once (the result depends on the input's f16
/// value only, so the lookup is exact).
fn gelu_table() -> &'static [f32] {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    TABLE.get_or_init(|| (0..=u16::MAX).map(gelu_of_f16).collect())
}

/// ggml's `ggml_gelu_f32` of one f16 value, rounded to f16.
fn gelu_of_f16(bits: u16) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044_715;
    let x = f16::from_bits(bits).to_f32();
    // GCC contracts `1.0f + GELU_COEF_A*x*x` into one fused multiply-add.
    let inner = (COEF_A * x).mul_add(x, 1.0);
    let g = 0.5 * x * (1.0 + rounded::tanh(SQRT_2_OVER_PI * x * inner));
    f16::from_f32(g).to_f32()
}

/// Numerically stable softmax in place; the sum is taken in f64 as ggml does.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for v in x.iter_mut() {
        *v = rounded::exp(*v - max);
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

/// ggml's `ggml_vec_dot_f16` on AVX-512 (what llama.cpp runs on this class of machine):
/// four 16-lane accumulators over 64-element steps, folded as ggml's `GGML_F32x16_REDUCE`
/// ((0+2) + (1+3)), then GCC's `_mm512_reduce_add_ps` tree. The
/// f16 × f16 products are exact in f32, so only the additions round, in this order.
#[inline(always)]
pub fn dot_f16(x: &[f16], y: &[f16]) -> f32 {
    let t = f16_table();
    let mut acc = [[0f32; 16]; 4];
    let steps = x.len() / 64;
    for i in 0..steps {
        for (j, a) in acc.iter_mut().enumerate() {
            for (l, lane) in a.iter_mut().enumerate() {
                let at = i * 64 + j * 16 + l;
                *lane += f32_of(t, x[at]) * f32_of(t, y[at]);
            }
        }
    }
    let mut v = [0f32; 16];
    for l in 0..16 {
        v[l] = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    }
    let t3: [f32; 8] = std::array::from_fn(|i| v[8 + i] + v[i]);
    let t6: [f32; 4] = std::array::from_fn(|i| t3[4 + i] + t3[i]);
    let mut sum = f64::from((t6[0] + t6[2]) + (t6[1] + t6[3]));
    for at in steps * 64..x.len() {
        sum += f64::from(f32_of(t, x[at]) * f32_of(t, y[at]));
    }
    sum as f32
}

/// The fixed shape of one layer's attention.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Attend to the last `window` positions only (0: all).
    pub window: usize,
    /// Scores capped as softcap · tanh(score · scale / softcap) when non-zero, as
    /// ggml-cpu computes it (the scale divided by softcap first), tanh by [`rounded::tanh`].
    pub softcap: f32,
    /// ggml's tiled flash attention (f32 queries and weights, 64-position tiles), which
    /// ggml-cpu runs when a batch has [`FA_TILE`] query rows or more; else the row path.
    pub tiled: bool,
}

/// A score times `scale`, soft-capped when `softcap` is non-zero, in ggml-cpu's order:
/// `scale / softcap` once, then `softcap · tanh(s · that)` ([`rounded::tanh`]).
#[inline(always)]
fn capped(s: f32, scale: f32, softcap: f32) -> f32 {
    if softcap == 0.0 {
        return s * scale;
    }
    softcap * rounded::tanh(s * (scale / softcap))
}

/// Query rows from which ggml-cpu switches to tiled flash attention (`GGML_FA_TILE_Q`),
/// and the key/value positions in each of its tiles (`GGML_FA_TILE_KV`).
pub const FA_TILE: usize = 64;

/// Causal attention of one query row at position `p` over `cache[..=p]` (or its last
/// `window` positions), all heads; GQA maps `n_head / n_head_kv` query heads per KV head.
///
/// The numerics are ggml-cpu's `flash_attn_ext_f16` (llama.cpp's default attention): q is
/// rounded to f16, scores are f16 dot products, and the softmax is online, with the
/// weighted sum of values accumulated *in f16* (`ggml_vec_mad_f16`) and rescaled in f16
/// whenever the running maximum rises; the sum of weights stays in f32.
///
/// Only the query heads in `heads` are computed; `out` holds their outputs in order.
pub fn attend_row(
    q: &[f32],
    cache: &LayerCache,
    p: usize,
    shape: AttnShape,
    heads: std::ops::Range<usize>,
    scratch: &mut Vec<f16>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA (checked just above); the function only enables it.
        unsafe { attend_row_fma(q, cache, p, shape, heads, scratch, out) };
        return;
    }
    attend_row_body(q, cache, p, shape, heads, scratch, out);
}

/// A layer's keys and values in f32 for [`attend_row_tiled`], converted once per attention
/// call and shared by all its rows: keys transposed per KV head (position fastest, as
/// ggml packs a tile), values as they are.
#[derive(Default)]
pub struct TiledKv {
    kt: Vec<f32>,
    v: Vec<f32>,
    /// Positions per key row of `kt` (the cached ones, rounded up to whole tiles).
    stride: usize,
}

impl TiledKv {
    /// Converts positions `..end` of `cache` for heads of `shape`.
    pub fn build(&mut self, cache: &LayerCache, shape: AttnShape, end: usize) {
        let (hd, n_kv) = (shape.head_dim, shape.n_head_kv);
        let kv_width = hd * n_kv;
        let tab = f16_table();
        self.stride = end.div_ceil(FA_TILE) * FA_TILE;
        self.kt.clear();
        self.kt.resize(n_kv * hd * self.stride, 0.0);
        for t in 0..end {
            let row = &cache.k[t * kv_width..(t + 1) * kv_width];
            for (j, &y) in row.iter().enumerate() {
                self.kt[j * self.stride + t] = f32_of(tab, y);
            }
        }
        self.v.clear();
        self.v
            .extend(cache.v[..end * kv_width].iter().map(|&y| f32_of(tab, y)));
    }
}

/// GCC's `_mm512_reduce_add_ps` of 16 lanes: halves, quarters, then pairs.
#[inline(always)]
fn reduce16(v: &[f32; 16]) -> f32 {
    let t3: [f32; 8] = std::array::from_fn(|i| v[8 + i] + v[i]);
    let t6: [f32; 4] = std::array::from_fn(|i| t3[4 + i] + t3[i]);
    (t6[0] + t6[2]) + (t6[1] + t6[3])
}

/// One query row through ggml-cpu's tiled flash attention (`flash_attn_ext_tiled`), which
/// llama.cpp runs for batches of 64 query rows or more: q stays f32, each key's score is a
/// sequential FMA chain over the head (`simd_gemm`), times `scale`; the online softmax goes
/// tile by tile (64 positions), its weights `ggml_v_expf(s − max)` summed per 16 lanes
/// (`ggml_vec_soft_max_f32`, AVX-512 form) into f64, rescaled by `expf` when the maximum
/// rises; values accumulate in f32 by FMA, then divide by the sum. `kv` holds the cache
/// (positions `..=p` at least) from [`TiledKv::build`].
pub fn attend_row_tiled(
    q: &[f32],
    kv: &TiledKv,
    p: usize,
    shape: AttnShape,
    heads: std::ops::Range<usize>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if super::quant::kernel_level() >= super::quant::KernelLevel::Avx512 {
        // SAFETY: the AVX-512 level implies both features (checked at run time by
        // `kernel_level`); the function only enables them.
        unsafe { attend_row_tiled_avx512(q, kv, p, shape, heads, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA (checked just above); the function only enables it.
        unsafe { attend_row_tiled_fma(q, kv, p, shape, heads, out) };
        return;
    }
    attend_row_tiled_body(q, kv, p, shape, heads, out);
}

/// The same body with 512-bit vectors available to the compiler: every lane still does its
/// own FMA chain, so the results are the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn attend_row_tiled_avx512(
    q: &[f32],
    kv: &TiledKv,
    p: usize,
    shape: AttnShape,
    heads: std::ops::Range<usize>,
    out: &mut [f32],
) {
    attend_row_tiled_body(q, kv, p, shape, heads, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
fn attend_row_tiled_fma(
    q: &[f32],
    kv: &TiledKv,
    p: usize,
    shape: AttnShape,
    heads: std::ops::Range<usize>,
    out: &mut [f32],
) {
    attend_row_tiled_body(q, kv, p, shape, heads, out);
}

#[inline(always)]
fn attend_row_tiled_body(
    q: &[f32],
    kv: &TiledKv,
    p: usize,
    shape: AttnShape,
    heads: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let AttnShape {
        n_head,
        n_head_kv,
        head_dim: hd,
        scale,
        window,
        softcap,
        ..
    } = shape;
    let start = if window > 0 {
        (p + 1).saturating_sub(window)
    } else {
        0
    };
    let kv_width = n_head_kv * hd;
    let group = n_head / n_head_kv;
    let first = heads.start;
    let stride = kv.stride;
    for h in heads.start..heads.end.min(n_head) {
        let qh = &q[h * hd..(h + 1) * hd];
        let g = h / group;
        let o = &mut out[(h - first) * hd..(h - first + 1) * hd];
        o.fill(0.0);
        let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
        for tile in (start / FA_TILE * FA_TILE..=p).step_by(FA_TILE) {
            let valid = |t: usize| t >= start && t <= p;
            // Each score a sequential FMA chain over the head, 64 of them side by side.
            let mut dots = [0f32; FA_TILE];
            for (d, &x) in qh.iter().enumerate() {
                let col = &kv.kt[(g * hd + d) * stride + tile..][..FA_TILE];
                for (a, &y) in dots.iter_mut().zip(col) {
                    *a = x.mul_add(y, *a);
                }
            }
            // Scores, with positions outside [start, p] masked (-inf).
            let mut kq = [f32::NEG_INFINITY; FA_TILE];
            for (tk, s) in kq.iter_mut().enumerate() {
                if valid(tile + tk) {
                    *s = capped(dots[tk], scale, softcap) + 0.0;
                }
            }
            let tile_max = kq.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if tile_max == f32::NEG_INFINITY {
                continue;
            }
            let m_new = m.max(tile_max);
            if m_new > m {
                let ms = rounded::exp(m - m_new);
                o.iter_mut().for_each(|a| *a *= ms);
                sum *= ms;
            }
            m = m_new;
            let mut tile_sum = 0f64;
            for lanes in kq.as_chunks_mut::<16>().0 {
                for s in lanes.iter_mut() {
                    *s = ggml_v_expf(*s - m_new);
                }
                tile_sum += f64::from(reduce16(lanes));
            }
            sum = (f64::from(sum) + tile_sum) as f32;
            // The valid positions of this tile are one run.
            let lo = tile.max(start);
            let hi = (tile + FA_TILE).min(p + 1);
            let vs = &kv.v[lo * kv_width + g * hd..];
            let ws = &kq[lo - tile..hi - tile];
            match hd {
                64 => add_values::<64>(o, ws, vs, kv_width),
                128 => add_values::<128>(o, ws, vs, kv_width),
                256 => add_values::<256>(o, ws, vs, kv_width),
                _ => {
                    for (i, &w) in ws.iter().enumerate() {
                        let v = &vs[i * kv_width..][..hd];
                        for (a, &y) in o.iter_mut().zip(v) {
                            *a = w.mul_add(y, *a);
                        }
                    }
                }
            }
        }
        let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
        o.iter_mut().for_each(|a| *a *= inv);
    }
}

/// `o += w[i] · v[i]` for the value rows `v[i · stride..][..HD]`, one FMA per element in
/// row order, with the accumulator held in registers for the whole run.
#[inline(always)]
fn add_values<const HD: usize>(o: &mut [f32], w: &[f32], v: &[f32], stride: usize) {
    let Some(o) = o.first_chunk_mut::<HD>() else {
        return;
    };
    let mut acc = *o;
    for (i, &wi) in w.iter().enumerate() {
        let Some(row) = v[i * stride..].first_chunk::<HD>() else {
            break;
        };
        for (a, &y) in acc.iter_mut().zip(row) {
            *a = wi.mul_add(y, *a);
        }
    }
    *o = acc;
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
fn attend_row_fma(
    q: &[f32],
    cache: &LayerCache,
    p: usize,
    shape: AttnShape,
    heads: std::ops::Range<usize>,
    scratch: &mut Vec<f16>,
    out: &mut [f32],
) {
    attend_row_body(q, cache, p, shape, heads, scratch, out);
}

/// Query heads that share a KV head, attended together.
const MAX_HEADS: usize = 4;

/// Which flash-attention helpers this CPU runs (all give the same bits).
#[derive(Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    not(target_arch = "x86_64"),
    allow(dead_code, reason = "the SIMD variants exist on x86-64 only")
)]
enum Fa {
    Portable,
    Avx2,
    /// The query heads that share a KV head (up to four) go through each key and value
    /// row together: the row is converted from f16 once for all of them.
    Avx512,
}

#[inline(always)]
fn attend_row_body(
    q: &[f32],
    cache: &LayerCache,
    p: usize,
    shape: AttnShape,
    heads: std::ops::Range<usize>,
    scratch: &mut Vec<f16>,
    out: &mut [f32],
) {
    let AttnShape {
        head_dim, window, ..
    } = shape;
    #[cfg(target_arch = "x86_64")]
    let fa = if !head_dim.is_multiple_of(64) || !super::avx2::available() {
        Fa::Portable
    } else if super::quant::kernel_level() >= super::quant::KernelLevel::Avx512 {
        Fa::Avx512
    } else {
        Fa::Avx2
    };
    #[cfg(not(target_arch = "x86_64"))]
    let fa = Fa::Portable;
    let start = if window > 0 {
        (p + 1).saturating_sub(window)
    } else {
        0
    };
    // Up to four heads at once: their queries (as f16, and as f32 for the AVX-512 dots),
    // their f16 accumulators, running sums and maxima.
    scratch.resize(2 * MAX_HEADS * head_dim, f16::ZERO);
    let (q16, acc) = scratch.split_at_mut(MAX_HEADS * head_dim);
    thread_local! {
        static Q32: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    Q32.with_borrow_mut(|q32| {
        q32.resize(
            if fa == Fa::Avx512 {
                MAX_HEADS * head_dim
            } else {
                0
            },
            0.0,
        );
        attend_heads(q, cache, (p, start), shape, fa, heads, (q16, acc, q32), out);
    });
}

/// [`attend_row_body`]'s loop over its heads, in runs that share a KV head.
#[inline(always)]
#[allow(
    clippy::too_many_arguments,
    reason = "the row's geometry and its scratch"
)]
fn attend_heads(
    q: &[f32],
    cache: &LayerCache,
    (p, start): (usize, usize),
    shape: AttnShape,
    fa: Fa,
    heads: std::ops::Range<usize>,
    (q16, acc, q32): (&mut [f16], &mut [f16], &mut [f32]),
    out: &mut [f32],
) {
    let AttnShape {
        n_head,
        n_head_kv,
        head_dim,
        scale,
        softcap,
        ..
    } = shape;
    let tab = f16_table();
    let group = n_head / n_head_kv;
    let kv_width = n_head_kv * head_dim;
    let first = heads.start;
    let mut h0 = heads.start;
    let end = heads.end.min(n_head);
    while h0 < end {
        let g = h0 / group;
        // The heads from h0 that share KV head g, at most four.
        let h1 = end.min((g + 1) * group).min(h0 + MAX_HEADS);
        let n = h1 - h0;
        let (q16, acc) = (&mut q16[..n * head_dim], &mut acc[..n * head_dim]);
        for (d, &v) in q16.iter_mut().zip(&q[h0 * head_dim..h1 * head_dim]) {
            *d = f16::from_f32(v);
        }
        for (d, v) in q32.iter_mut().zip(q16.iter()) {
            *d = f32_of(tab, *v);
        }
        acc.fill(f16::ZERO);
        let (mut sum, mut max) = ([0f32; MAX_HEADS], [f32::NEG_INFINITY; MAX_HEADS]);
        let (mut s, mut vs) = ([0f32; MAX_HEADS], [0f32; MAX_HEADS]);
        for t in start..=p {
            let row = t * kv_width + g * head_dim;
            let k = &cache.k[row..row + head_dim];
            match fa {
                Fa::Avx512 => fa_dots(k, &q32[..n * head_dim], &mut s[..n]),
                Fa::Avx2 => {
                    for (s, q) in s.iter_mut().zip(q16.chunks_exact(head_dim)) {
                        *s = fa_dot(k, q);
                    }
                }
                Fa::Portable => {
                    for (s, q) in s.iter_mut().zip(q16.chunks_exact(head_dim)) {
                        *s = dot_f16(k, q);
                    }
                }
            }
            for i in 0..n {
                let s = capped(s[i], scale, softcap);
                let acc = &mut acc[i * head_dim..(i + 1) * head_dim];
                let mut ms = 1f32;
                vs[i] = 1.0;
                if s > max[i] {
                    ms = rounded::exp(max[i] - s);
                    max[i] = s;
                    if fa == Fa::Portable {
                        for a in acc.iter_mut() {
                            *a = f16::from_f32(f32_of(tab, *a) * ms);
                        }
                    } else {
                        fa_scale(acc, ms);
                    }
                } else {
                    vs[i] = rounded::exp(s - max[i]);
                }
                sum[i] = crate::fma(sum[i], ms, vs[i]);
            }
            let v = &cache.v[row..row + head_dim];
            match fa {
                Fa::Avx512 => fa_mads(acc, v, &vs[..n]),
                Fa::Avx2 => {
                    for (acc, &vs) in acc.chunks_exact_mut(head_dim).zip(&vs) {
                        fa_mad(acc, v, vs);
                    }
                }
                Fa::Portable => {
                    for (acc, &vs) in acc.chunks_exact_mut(head_dim).zip(&vs) {
                        for (a, v) in acc.iter_mut().zip(v) {
                            *a = f16::from_f32(crate::fma(f32_of(tab, *v), vs, f32_of(tab, *a)));
                        }
                    }
                }
            }
        }
        for i in 0..n {
            let inv = 1.0 / sum[i];
            let at = (h0 + i - first) * head_dim;
            let acc = &acc[i * head_dim..(i + 1) * head_dim];
            for (o, a) in out[at..at + head_dim].iter_mut().zip(acc) {
                *o = f32_of(tab, *a) * inv;
            }
        }
        h0 = h1;
    }
}

/// The AVX-512 helpers, called only when the kernel level said so.
#[cfg(target_arch = "x86_64")]
fn fa_dots(k: &[f16], q: &[f32], s: &mut [f32]) {
    // SAFETY: callers pass `Fa::Avx512`, chosen only when the CPU has AVX-512 VNNI.
    unsafe { super::avx512::fa::dots(k, q, s) }
}

#[cfg(target_arch = "x86_64")]
fn fa_mads(acc: &mut [f16], v: &[f16], vs: &[f32]) {
    // SAFETY: as for `fa_dots`.
    unsafe { super::avx512::fa::mads(acc, v, vs) }
}

#[cfg(not(target_arch = "x86_64"))]
fn fa_dots(_: &[f16], _: &[f32], _: &mut [f32]) {}

#[cfg(not(target_arch = "x86_64"))]
fn fa_mads(_: &mut [f16], _: &[f16], _: &[f32]) {}

/// The AVX2 flash-attention helpers, called only when `avx2::available()` said so.
#[cfg(target_arch = "x86_64")]
fn fa_dot(k: &[f16], q: &[f16]) -> f32 {
    // SAFETY: callers pass `fast`, which is true only when the CPU has AVX2, FMA and F16C.
    unsafe { super::avx2::fa::dot(k, q) }
}

#[cfg(target_arch = "x86_64")]
fn fa_mad(acc: &mut [f16], v: &[f16], s: f32) {
    // SAFETY: as for `fa_dot`.
    unsafe { super::avx2::fa::mad(acc, v, s) }
}

#[cfg(target_arch = "x86_64")]
fn fa_scale(acc: &mut [f16], s: f32) {
    // SAFETY: as for `fa_dot`.
    unsafe { super::avx2::fa::scale(acc, s) }
}

#[cfg(not(target_arch = "x86_64"))]
fn fa_dot(k: &[f16], q: &[f16]) -> f32 {
    dot_f16(k, q)
}

#[cfg(not(target_arch = "x86_64"))]
fn fa_mad(_: &mut [f16], _: &[f16], _: f32) {}

#[cfg(not(target_arch = "x86_64"))]
fn fa_scale(_: &mut [f16], _: f32) {}

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

    /// Unscaled RoPE over whole heads.
    fn plain(head_dim: u32, freq_base: f32, neox: bool) -> RopeParams {
        RopeParams {
            head_dim,
            n_rot: head_dim,
            mode: if neox {
                RopeMode::Neox
            } else {
                RopeMode::Normal
            },
            freq_base,
            freq_scale: 1.0,
            ext_factor: 0.0,
            attn_factor: 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            n_ctx_orig: 0,
        }
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let mut cache = Vec::new();
        let orig: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let mut r = orig.clone();
        rope(&mut r, &plain(4, 10000.0, false), None, 0, &mut cache);
        assert_eq!(r, orig);
        rope(&mut r, &plain(4, 10000.0, true), None, 7, &mut cache);
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
        assert!((norm(&r) - norm(&orig)).abs() < 1e-3);
    }

    /// Frequency factors divide each pair's angle, and linear scaling multiplies every
    /// angle: doubling the position and halving the scale is the same rotation, bit for
    /// bit (both are exact powers of two).
    #[test]
    fn rope_factors_and_linear_scaling() {
        let mut cache = Vec::new();
        let orig: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin()).collect();
        let plain = plain(8, 500_000.0, false);
        let mut a = orig.clone();
        rope(&mut a, &plain, None, 5, &mut cache);
        let mut b = orig.clone();
        rope(&mut b, &plain, Some(&[1.0; 4]), 5, &mut cache);
        assert_eq!(a, b, "factors of 1 change nothing");
        let mut c = orig.clone();
        rope(&mut c, &plain, Some(&[1.0, 1.0, 8.0, 8.0]), 5, &mut cache);
        assert_eq!(a[..4], c[..4], "pairs with factor 1 are unchanged");
        assert_ne!(a[4..8], c[4..8], "pairs with factor 8 turn less");
        let half = RopeParams {
            freq_scale: 0.5,
            ..plain
        };
        let mut d = orig.clone();
        rope(&mut d, &half, None, 10, &mut cache);
        assert_eq!(a, d);
        // n_rot < head_dim: the tail of each head is kept.
        let partial = RopeParams { n_rot: 4, ..plain };
        let mut e = orig.clone();
        rope(&mut e, &partial, None, 5, &mut cache);
        assert_eq!(e[4..8], orig[4..8]);
        assert_eq!(e[12..16], orig[12..16]);
        assert_ne!(e[..4], orig[..4]);
    }

    /// The tiled numerics (batches of 64+ rows) attend to the same positions as the row
    /// path, windows and GQA included: outputs agree to f16 rounding, over several tiles.
    #[test]
    fn tiled_attention_agrees_with_the_row_path() {
        let (hd, n_kv, n_head, n_pos) = (64, 2, 4, 150);
        let val = |i: usize| (i as f32 * 0.7311).sin() * 1.5;
        let cache = LayerCache {
            k: (0..n_pos * n_kv * hd)
                .map(|i| f16::from_f32(val(i)))
                .collect(),
            v: (0..n_pos * n_kv * hd)
                .map(|i| f16::from_f32(val(i + 7)))
                .collect(),
        };
        let q: Vec<f32> = (0..n_head * hd).map(|i| val(i + 3)).collect();
        for window in [0, 70] {
            let shape = AttnShape {
                tiled: true,
                n_head,
                n_head_kv: n_kv,
                head_dim: hd,
                scale: 0.125,
                window,
                softcap: 0.0,
            };
            let mut kv = TiledKv::default();
            kv.build(&cache, shape, n_pos);
            for p in [0, 63, 64, 130, n_pos - 1] {
                let mut tiled = vec![0.0; n_head * hd];
                attend_row_tiled(&q, &kv, p, shape, 0..n_head, &mut tiled);
                let mut row = vec![0.0; n_head * hd];
                let plain = AttnShape {
                    tiled: false,
                    ..shape
                };
                attend_row(&q, &cache, p, plain, 0..n_head, &mut Vec::new(), &mut row);
                for (a, b) in tiled.iter().zip(&row) {
                    assert!((a - b).abs() < 2e-2, "p {p} window {window}: {a} vs {b}");
                }
                // Heads computed alone give the same bits.
                let mut one = vec![0.0; hd];
                attend_row_tiled(&q, &kv, p, shape, 3..4, &mut one);
                assert_eq!(one[..], tiled[3 * hd..]);
            }
        }
    }

    /// The power of two in `ggml_v_expf` built from bits equals `powi`'s over the whole
    /// range the polynomial uses.
    #[test]
    fn v_expf_scale_is_exact() {
        for n in -192i32..=192 {
            let bits = f64::from_bits(((i64::from(n) + 1023) as u64) << 52);
            assert_eq!(bits, 2f64.powi(n), "2^{n}");
        }
        // The branch-free form gives the branchy one's bits, out-of-range inputs included.
        let reference = |x: f32| {
            let c = |bits: u32| f32::from_bits(bits);
            let shift = c(0x4b40_0000);
            let n = x.mul_add(c(0x3fb8_aa3b), shift) - shift;
            if n.abs() > 192.0 {
                return if n <= 0.0 { 0.0 } else { f32::INFINITY };
            }
            let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x));
            let u = b * b;
            let j = c(0x3c07_2010)
                .mul_add(b, c(0x3d2b_9f17))
                .mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)))
                .mul_add(u, c(0x3f7f_fff6).mul_add(b, 1.0));
            (f64::from(j) * 2f64.powi(n as i32)) as f32
        };
        let mut state = 77u32;
        let mut next = move || {
            // xorshift32: inputs spread over (-200, 200).
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state as f32 / u32::MAX as f32 - 0.5) * 400.0
        };
        let specials = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            88.7,
            -103.9,
            -150.0,
            200.0,
        ];
        for x in specials.into_iter().chain((0..200_000).map(|_| next())) {
            assert_eq!(ggml_v_expf(x).to_bits(), reference(x).to_bits(), "{x}");
        }
        assert!(ggml_v_expf(f32::NAN).is_nan());
    }

    #[test]
    fn attention_over_one_position_returns_its_value() {
        let cache = LayerCache {
            k: [1.0f32, 0.0].iter().map(|&v| f16::from_f32(v)).collect(),
            v: [3.0f32, -2.0].iter().map(|&v| f16::from_f32(v)).collect(),
        };
        let mut out = [0.0; 4];
        let shape = AttnShape {
            tiled: false,
            n_head: 2,
            n_head_kv: 1,
            head_dim: 2,
            scale: 1.0,
            window: 0,
            softcap: 0.0,
        };
        attend_row(
            &[0.5, 0.5, -1.0, 2.0],
            &cache,
            0,
            shape,
            0..2,
            &mut Vec::new(),
            &mut out,
        );
        assert_eq!(out, [3.0, -2.0, 3.0, -2.0]);
        // One head alone writes only its own outputs.
        let mut one = [0.0; 2];
        attend_row(
            &[0.5, 0.5, -1.0, 2.0],
            &cache,
            0,
            shape,
            1..2,
            &mut Vec::new(),
            &mut one,
        );
        assert_eq!(one, [3.0, -2.0]);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_attention_helpers_equal_the_portable_arithmetic() {
        if !crate::avx2::available() {
            eprintln!("this CPU lacks AVX2/FMA/F16C: nothing to compare");
            return;
        }
        let mk = |seed: u32, n: usize| -> Vec<f16> {
            (0..n)
                .map(|i| {
                    f16::from_f32((((i as u32 * 2654435761) ^ seed) % 2000) as f32 / 300.0 - 3.3)
                })
                .collect()
        };
        for seed in 0..20 {
            let (x, y) = (mk(seed, 256), mk(seed + 99, 256));
            assert_eq!(fa_dot(&x, &y).to_bits(), dot_f16(&x, &y).to_bits());
            let mut a = mk(seed + 7, 64);
            let mut b = a.clone();
            let v = mk(seed + 3, 64);
            fa_mad(&mut a, &v, 0.37);
            for (b, v) in b.iter_mut().zip(&v) {
                *b = f16::from_f32(v.to_f32().mul_add(0.37, b.to_f32()));
            }
            assert_eq!(a, b);
            fa_scale(&mut a, 0.61);
            for b in b.iter_mut() {
                *b = f16::from_f32(b.to_f32() * 0.61);
            }
            assert_eq!(a, b);
        }
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = [1.0, 2.0, 3.0, -1000.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(x[3], 0.0);
    }
}
