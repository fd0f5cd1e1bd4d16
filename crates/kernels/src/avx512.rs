//! AVX-512 (F, BW, VL, VNNI) passes over four weight rows at once for the two types that
//! dominate decode (Q4_1 and Q8_0 weights). Each 512-bit register holds two rows, laid out
//! so that every 32-bit lane computes exactly what the matching lane of the AVX2 kernel
//! computes: `vpdpbusd` gives the same integer sums as ggml's `maddubs` + `madd` (no i16
//! saturation is possible for these value ranges), and the float updates per lane are the
//! same fused multiply-adds in the same block order. Results are bit-identical to
//! `avx2.rs` and to the portable code (tests below).

use std::arch::x86_64::*;

use super::avx2;
use super::quant::{Q8_0_BYTES, Q8_1_BYTES, TileOut};
use realm_gguf::GgmlType;

/// Whether this CPU can run these kernels (the AVX2 set as well, for the remainder rows).
pub fn available() -> bool {
    avx2::available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// An activation row's per-block scales and lane corrections.
type BlockScratch = (Vec<[f32; 2]>, Vec<[i32; 8]>);

/// Four rows (`stride` bytes apart from the start of the slice) × one activation row, given
/// the activation's per-block scales and lane corrections.
type FourRows = fn(&[u8], usize, &[u8], &[[f32; 2]], &[[i32; 8]]) -> [f32; 4];

/// What the signed weight types add to each quant to make it unsigned for `vpdpbusd`
/// (u8 × s8): Q5_0's raw five bits are `w + 16`, and `w ^ 0x80` is `w + 128` for Q8_0.
fn weight_offset(ty: GgmlType) -> Option<i32> {
    match ty {
        GgmlType::Q5_0 => Some(16),
        GgmlType::Q8_0 => Some(128),
        _ => None,
    }
}

/// `-offset ×` the sum of each lane's four activation bytes in one Q8_0 block: the start
/// value of `vpdpbusd` on `w + offset`, so that every lane ends at `Σ w·y` exactly, the
/// integer that ggml's sign trick gives that lane.
fn lane_correction(xb: &[u8], off: i32) -> [i32; 8] {
    let mut c = [0i32; 8];
    for (l, four) in c.iter_mut().zip(xb[2..34].chunks_exact(4)) {
        *l = -off * four.iter().map(|&b| i32::from(b as i8)).sum::<i32>();
    }
    c
}

/// Rows `j0..j0 + out.len()` of `w` dotted with `x`; `false` if `ty` has no kernel here.
///
/// # Safety
/// The CPU must support what [`available`] checks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_rows(
    ty: GgmlType,
    w: &[u8],
    wrow: usize,
    x: &[u8],
    j0: usize,
    out: &mut [f32],
) -> bool {
    let (block, kernel): (usize, FourRows) = match ty {
        GgmlType::Q4_1 => (Q8_1_BYTES, |g, s, x, sc, _| {
            tile_q4_1::<1>(g, s, [x], [sc])[0]
        }),
        GgmlType::Q8_0 => (Q8_0_BYTES, |g, s, x, sc, su| {
            tile_signed::<1, 34, false>(g, s, [x], [sc], [su])[0]
        }),
        GgmlType::Q5_0 => (Q8_0_BYTES, |g, s, x, sc, su| {
            tile_signed::<1, 22, true>(g, s, [x], [sc], [su])[0]
        }),
        _ => return false,
    };
    // The activation's block scales (and Q8_1 sums, or the signed types' lane
    // corrections), once for all rows.
    let nb = x.len() / block;
    // Per-thread buffers, reused: this runs for every matmul of every token.
    thread_local! {
        static BLOCKS: std::cell::RefCell<BlockScratch> =
            const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    }
    BLOCKS.with_borrow_mut(|(scales, sums)| {
        scales.clear();
        scales.extend(
            x.chunks_exact(block)
                .map(|xb| [f16_at(xb, 0), f16_at(xb, 2)]),
        );
        sums.clear();
        match weight_offset(ty) {
            Some(off) => sums.extend(x.chunks_exact(block).map(|xb| lane_correction(xb, off))),
            None => sums.resize(nb, [0; 8]),
        }
        for i in (0..out.len() / 4 * 4).step_by(4) {
            let at = (j0 + i) * wrow;
            avx2::prefetch_ahead(w, at, 4 * wrow);
            let r = kernel(&w[at..at + 4 * wrow], wrow, x, scales, sums);
            out[i..i + 4].copy_from_slice(&r);
        }
    });
    if !out.len().is_multiple_of(4) {
        let full = out.len() / 4 * 4;
        // SAFETY: the AVX2 set is part of `available`.
        unsafe { avx2::dot_rows(ty, w, wrow, x, j0 + full, &mut out[full..]) };
    }
    true
}

/// ggml's `hsum_float_8` of the 256-bit value whose low half is `lo` and high half `hi`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn hsum8_halves(lo: __m128, hi: __m128) -> f32 {
    let r = _mm_add_ps(hi, lo);
    let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    let r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn load16(b: &[u8]) -> __m128i {
    assert!(b.len() >= 16);
    // SAFETY: 16 bytes are there (checked); unaligned load.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn load32(b: &[u8]) -> __m256i {
    assert!(b.len() >= 32);
    // SAFETY: 32 bytes are there (checked); unaligned load.
    unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
}

/// Rows `2p` and `2p + 1` of a group of four: lanes 0–7 of register `p` belong to the first,
/// 8–15 to the second. From the converted [d0 · d1 · d2 · d3 ·] (`·`: unused lanes).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn row_scales(d: __m256, p: usize) -> __m512 {
    let idx = if p == 0 {
        _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0)
    } else {
        _mm512_set_epi32(6, 6, 6, 6, 6, 6, 6, 6, 4, 4, 4, 4, 4, 4, 4, 4)
    };
    _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(d))
}

/// The 4 bytes at `o` of each of four rows `stride` bytes apart, as f16 pairs → f32:
/// [a0 a1 b0 b1 c0 c1 d0 d1].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn halves4(w: &[u8], stride: usize, o: usize) -> __m256 {
    let ld = |r: usize| {
        let b = &w[r * stride + o..r * stride + o + 4];
        i32::from_le_bytes([b[0], b[1], b[2], b[3]])
    };
    let v = _mm_set_epi32(ld(3), ld(2), ld(1), ld(0));
    _mm256_cvtph_ps(v)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn f16_at(b: &[u8], at: usize) -> f32 {
    let bits = i32::from(u16::from_le_bytes([b[at], b[at + 1]]));
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

/// Four Q4_1 rows × `T` Q8_1 activation rows. Register `p` holds rows `2p` and `2p + 1`
/// as 128-bit quarters [a low nibbles, a high, b low, b high] against an activation twice
/// over: per row and token, the AVX2 kernel's register. The unpacked weights and their
/// scales are shared by the `T` tokens; every (row, token) keeps its own accumulators, so
/// each result is the single-token result bit for bit.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn tile_q4_1<const T: usize>(
    g: &[u8],
    stride: usize,
    xs: [&[u8]; T],
    scales: [&[[f32; 2]]; T],
) -> [[f32; 4]; T] {
    let nb = xs[0].len() / Q8_1_BYTES;
    assert!(g.len() >= 4 * stride && stride >= nb * 20);
    assert!((0..T).all(|t| xs[t].len() >= nb * Q8_1_BYTES && scales[t].len() >= nb));
    let w = [0, 1, 2, 3].map(|r| &g[r * stride..r * stride + nb * 20]);
    // Per 16-bit lane: 0 in quarters 0 and 2, 4 in quarters 1 and 3.
    let four = 0x0004_0004_0004_0004;
    let shifts = _mm512_set_epi64(four, four, 0, 0, four, four, 0, 0);
    let m4 = _mm512_set1_epi8(0x0F);
    let mut acc = [[_mm512_setzero_ps(); 2]; T];
    let mut summs = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let o = 20 * b;
        let dm = halves4(g, stride, o);
        // Each row's d over its lanes; times the token's d below (the same product).
        let rs = [row_scales(dm, 0), row_scales(dm, 1)];
        // (Plain loops, not closures: those were not inlined into the kernel.)
        let mut q = [_mm512_setzero_si512(); 2];
        for p in 0..2 {
            let a = _mm512_broadcast_i32x4(load16(&w[2 * p][o + 4..]));
            let b = _mm512_broadcast_i32x4(load16(&w[2 * p + 1][o + 4..]));
            let ab = _mm512_mask_blend_epi64(0xF0, a, b);
            q[p] = _mm512_and_si512(_mm512_srlv_epi16(ab, shifts), m4);
        }
        for t in 0..T {
            let xb = &xs[t][b * Q8_1_BYTES..(b + 1) * Q8_1_BYTES];
            let yy = _mm512_broadcast_i64x4(load32(&xb[4..36]));
            let [dy, sy] = scales[t][b];
            // ggml: m · s summed per row (scalar FMA per block): here the odd lanes.
            summs[t] = _mm256_fmadd_ps(dm, _mm256_set1_ps(sy), summs[t]);
            for p in 0..2 {
                let xy = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q[p], yy));
                let d = _mm512_mul_ps(rs[p], _mm512_set1_ps(dy));
                acc[t][p] = _mm512_fmadd_ps(d, xy, acc[t][p]);
            }
        }
    }
    let mut out = [[0f32; 4]; T];
    for t in 0..T {
        let mut s = [0f32; 8];
        // SAFETY: `s` has room for eight floats.
        unsafe { _mm256_storeu_ps(s.as_mut_ptr(), summs[t]) };
        for p in 0..2 {
            let a = acc[t][p];
            out[t][2 * p] =
                hsum8_halves(_mm512_extractf32x4_ps(a, 0), _mm512_extractf32x4_ps(a, 1))
                    + s[4 * p + 1];
            out[t][2 * p + 1] =
                hsum8_halves(_mm512_extractf32x4_ps(a, 2), _mm512_extractf32x4_ps(a, 3))
                    + s[4 * p + 3];
        }
    }
    out
}

/// Two Q8_0 blocks → one register of `w + 128` as unsigned bytes, [a | b].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn unpack_q8_0(a: &[u8], b: &[u8]) -> __m512i {
    let q = _mm512_mask_broadcast_i64x4(
        _mm512_castsi256_si512(load32(&a[2..])),
        0xF0,
        load32(&b[2..]),
    );
    _mm512_xor_si512(q, _mm512_set1_epi8(0x80u8 as i8))
}

/// Two Q5_0 blocks → [a low nibbles, a high, b low, b high] with the fifth bits: the raw
/// values 0..31, that is `w + 16`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn unpack_q5_0(a: &[u8], b: &[u8]) -> __m512i {
    let four = 0x0004_0004_0004_0004;
    let shifts = _mm512_set_epi64(four, four, 0, 0, four, four, 0, 0);
    let qa = _mm512_broadcast_i32x4(load16(&a[6..]));
    let qb = _mm512_broadcast_i32x4(load16(&b[6..]));
    let q = _mm512_mask_blend_epi64(0xF0, qa, qb);
    let nib = _mm512_and_si512(_mm512_srlv_epi16(q, shifts), _mm512_set1_epi8(0x0F));
    // Fifth bits: row a's 32 to bytes 0–31, row b's to 32–63.
    let bits = u64::from(u32::from_le_bytes([a[2], a[3], a[4], a[5]]))
        | u64::from(u32::from_le_bytes([b[2], b[3], b[4], b[5]])) << 32;
    let high = _mm512_or_si512(nib, _mm512_set1_epi8(0x10));
    _mm512_mask_mov_epi8(nib, bits, high)
}

/// Four rows of a signed-weight type (Q8_0 or Q5_0, `BLOCK`-byte blocks) × `T` Q8_0
/// activation rows. Register `p` holds rows `2p` (low half) and `2p + 1` (high half), each
/// half exactly the AVX2 kernel's register. The weights are made unsigned (`w + offset`,
/// see [`weight_offset`]) once for all `T` tokens, and each token's lane corrections
/// (`sums`, from [`lane_correction`]) start the integer sums, so every lane holds ggml's
/// integer and every (row, token) result is the single-token one bit for bit.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn tile_signed<const T: usize, const BLOCK: usize, const Q5: bool>(
    g: &[u8],
    stride: usize,
    xs: [&[u8]; T],
    scales: [&[[f32; 2]]; T],
    sums: [&[[i32; 8]]; T],
) -> [[f32; 4]; T] {
    let nb = xs[0].len() / Q8_0_BYTES;
    assert!(g.len() >= 4 * stride && stride >= nb * BLOCK);
    assert!((0..T).all(|t| {
        xs[t].len() >= nb * Q8_0_BYTES && scales[t].len() >= nb && sums[t].len() >= nb
    }));
    let w = [0, 1, 2, 3].map(|r| &g[r * stride..r * stride + nb * BLOCK]);
    let mut acc = [[_mm512_setzero_ps(); 2]; T];
    for b in 0..nb {
        let o = BLOCK * b;
        // [d0 · d1 · d2 · d3 ·]: each row's scale and the next two bytes, unused.
        let dw = halves4(g, stride, o);
        let rs = [row_scales(dw, 0), row_scales(dw, 1)];
        let mut q = [_mm512_setzero_si512(); 2];
        for (p, q) in q.iter_mut().enumerate() {
            let (a, b) = (&w[2 * p][o..o + BLOCK], &w[2 * p + 1][o..o + BLOCK]);
            *q = if Q5 {
                unpack_q5_0(a, b)
            } else {
                unpack_q8_0(a, b)
            };
        }
        for t in 0..T {
            let xb = &xs[t][b * Q8_0_BYTES..(b + 1) * Q8_0_BYTES];
            let yy = _mm512_broadcast_i64x4(load32(&xb[2..34]));
            // SAFETY: eight i32 are 32 bytes; unaligned load.
            let c = unsafe { _mm256_loadu_si256(sums[t][b].as_ptr().cast()) };
            let c = _mm512_broadcast_i64x4(c);
            let dy = scales[t][b][0];
            for p in 0..2 {
                let xy = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c, q[p], yy));
                let d = _mm512_mul_ps(rs[p], _mm512_set1_ps(dy));
                acc[t][p] = _mm512_fmadd_ps(d, xy, acc[t][p]);
            }
        }
    }
    let mut out = [[0f32; 4]; T];
    for t in 0..T {
        for p in 0..2 {
            let a = acc[t][p];
            out[t][2 * p] =
                hsum8_halves(_mm512_extractf32x4_ps(a, 0), _mm512_extractf32x4_ps(a, 1));
            out[t][2 * p + 1] =
                hsum8_halves(_mm512_extractf32x4_ps(a, 2), _mm512_extractf32x4_ps(a, 3));
        }
    }
    out
}

/// Tokens per tile in [`dot_tile`].
pub const TILE_TOKENS: usize = 8;

/// Whether [`dot_tile`] has a kernel for `ty`.
pub fn has_tile(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q8_0)
}

/// One block of eight tokens' activations, side by side: what a tile reads per weight block.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Rec {
    /// The 32 quants of each token's block.
    y: [[u8; 32]; TILE_TOKENS],
    /// The signed weight types' lane corrections ([`lane_correction`]).
    corr: [[i32; 8]; TILE_TOKENS],
    /// Each block's scale, and for Q8_1 its sum, as f32.
    d: [f32; TILE_TOKENS],
    s: [f32; TILE_TOKENS],
}

const EMPTY: Rec = Rec {
    y: [[0; 32]; TILE_TOKENS],
    corr: [[0; 8]; TILE_TOKENS],
    d: [0.0; TILE_TOKENS],
    s: [0.0; TILE_TOKENS],
};

/// A prompt's quantized activation rows, repacked for the tiles: per group of eight tokens
/// (the last one padded with zeros) and per block, one [`Rec`]. Repacking costs one pass
/// over the activations and lets a tile walk a single pointer.
#[derive(Default)]
pub struct Packed {
    recs: Vec<Rec>,
    nb: usize,
    n_tok: usize,
}

impl Packed {
    /// Repacks `n_tok` rows of `xq` (quantized for weights of type `ty`).
    pub fn pack(&mut self, ty: GgmlType, xq: &[u8], n_tok: usize) {
        let (block, q_at) = if ty == GgmlType::Q4_1 {
            (Q8_1_BYTES, 4)
        } else {
            (Q8_0_BYTES, 2)
        };
        let off = weight_offset(ty);
        self.n_tok = n_tok;
        self.nb = xq.len() / block / n_tok.max(1);
        self.recs.clear();
        self.recs
            .resize(n_tok.div_ceil(TILE_TOKENS) * self.nb, EMPTY);
        for (i, xb) in xq.chunks_exact(block).enumerate() {
            let (t, b) = (i / self.nb.max(1), i % self.nb.max(1));
            let rec = &mut self.recs[t / TILE_TOKENS * self.nb + b];
            let l = t % TILE_TOKENS;
            rec.y[l].copy_from_slice(&xb[q_at..q_at + 32]);
            let h = |at: usize| f32::from(half::f16::from_le_bytes([xb[at], xb[at + 1]]));
            rec.d[l] = h(0);
            if ty == GgmlType::Q4_1 {
                rec.s[l] = h(2);
            }
            if let Some(off) = off {
                rec.corr[l] = lane_correction(xb, off);
            }
        }
    }

    /// The records of token group `g`.
    fn group(&self, g: usize) -> &[Rec] {
        &self.recs[g * self.nb..(g + 1) * self.nb]
    }
}

/// Four Q4_1 rows × the eight tokens of `recs`; per (row, token) the single-token
/// kernel's arithmetic (see [`tile_q4_1`]).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn tile8_q4_1(g: &[u8], stride: usize, recs: &[Rec]) -> [[f32; 4]; TILE_TOKENS] {
    let nb = recs.len();
    assert!(g.len() >= 4 * stride && stride >= nb * 20);
    let four = 0x0004_0004_0004_0004;
    let shifts = _mm512_set_epi64(four, four, 0, 0, four, four, 0, 0);
    let m4 = _mm512_set1_epi8(0x0F);
    let mut acc = [[_mm512_setzero_ps(); 2]; TILE_TOKENS];
    let mut summs = [_mm256_setzero_ps(); TILE_TOKENS];
    for (b, rec) in recs.iter().enumerate() {
        let o = 20 * b;
        let dm = halves4(g, stride, o);
        let rs = [row_scales(dm, 0), row_scales(dm, 1)];
        let mut q = [_mm512_setzero_si512(); 2];
        for (p, q) in q.iter_mut().enumerate() {
            let a = _mm512_broadcast_i32x4(load16(&g[2 * p * stride + o + 4..]));
            let b = _mm512_broadcast_i32x4(load16(&g[(2 * p + 1) * stride + o + 4..]));
            let ab = _mm512_mask_blend_epi64(0xF0, a, b);
            *q = _mm512_and_si512(_mm512_srlv_epi16(ab, shifts), m4);
        }
        for t in 0..TILE_TOKENS {
            let yy = _mm512_broadcast_i64x4(load32(&rec.y[t]));
            summs[t] = _mm256_fmadd_ps(dm, _mm256_set1_ps(rec.s[t]), summs[t]);
            let dy = _mm512_set1_ps(rec.d[t]);
            for p in 0..2 {
                let xy = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q[p], yy));
                acc[t][p] = _mm512_fmadd_ps(_mm512_mul_ps(rs[p], dy), xy, acc[t][p]);
            }
        }
    }
    let mut out = [[0f32; 4]; TILE_TOKENS];
    for t in 0..TILE_TOKENS {
        let mut s = [0f32; 8];
        // SAFETY: `s` has room for eight floats.
        unsafe { _mm256_storeu_ps(s.as_mut_ptr(), summs[t]) };
        for p in 0..2 {
            let a = acc[t][p];
            out[t][2 * p] =
                hsum8_halves(_mm512_extractf32x4_ps(a, 0), _mm512_extractf32x4_ps(a, 1))
                    + s[4 * p + 1];
            out[t][2 * p + 1] =
                hsum8_halves(_mm512_extractf32x4_ps(a, 2), _mm512_extractf32x4_ps(a, 3))
                    + s[4 * p + 3];
        }
    }
    out
}

/// Four rows of a signed-weight type × the eight tokens of `recs`; per (row, token) the
/// single-token kernel's arithmetic (see [`tile_signed`]).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn tile8_signed<const BLOCK: usize, const Q5: bool>(
    g: &[u8],
    stride: usize,
    recs: &[Rec],
) -> [[f32; 4]; TILE_TOKENS] {
    let nb = recs.len();
    assert!(g.len() >= 4 * stride && stride >= nb * BLOCK);
    let mut acc = [[_mm512_setzero_ps(); 2]; TILE_TOKENS];
    for (b, rec) in recs.iter().enumerate() {
        let o = BLOCK * b;
        let dw = halves4(g, stride, o);
        let rs = [row_scales(dw, 0), row_scales(dw, 1)];
        let mut q = [_mm512_setzero_si512(); 2];
        for (p, q) in q.iter_mut().enumerate() {
            let a = &g[2 * p * stride + o..2 * p * stride + o + BLOCK];
            let b = &g[(2 * p + 1) * stride + o..(2 * p + 1) * stride + o + BLOCK];
            *q = if Q5 {
                unpack_q5_0(a, b)
            } else {
                unpack_q8_0(a, b)
            };
        }
        for (t, acc) in acc.iter_mut().enumerate() {
            let yy = _mm512_broadcast_i64x4(load32(&rec.y[t]));
            // SAFETY: eight i32 are 32 bytes; unaligned load.
            let c = unsafe { _mm256_loadu_si256(rec.corr[t].as_ptr().cast()) };
            let c = _mm512_broadcast_i64x4(c);
            let dy = _mm512_set1_ps(rec.d[t]);
            for p in 0..2 {
                let xy = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c, q[p], yy));
                acc[p] = _mm512_fmadd_ps(_mm512_mul_ps(rs[p], dy), xy, acc[p]);
            }
        }
    }
    let mut out = [[0f32; 4]; TILE_TOKENS];
    for t in 0..TILE_TOKENS {
        for p in 0..2 {
            let a = acc[t][p];
            out[t][2 * p] =
                hsum8_halves(_mm512_extractf32x4_ps(a, 0), _mm512_extractf32x4_ps(a, 1));
            out[t][2 * p + 1] =
                hsum8_halves(_mm512_extractf32x4_ps(a, 2), _mm512_extractf32x4_ps(a, 3));
        }
    }
    out
}

/// Bytes of a Q8_K activation block: f32 scale, 256 quants, 16 i16 sums of sixteen.
const Q8K: usize = super::quant::Q8_K_BYTES;

/// The f32 scale of the Q8_K block at `at`.
#[inline]
fn q8k_d(x: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([x[at], x[at + 1], x[at + 2], x[at + 3]])
}

/// 256 bits → both halves of a 512-bit register.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn twice(b: &[u8]) -> __m512i {
    _mm512_broadcast_i64x4(load32(b))
}

/// [low half from `a`, high half from `b`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn pair(a: __m256i, b: __m256i) -> __m512i {
    _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1)
}

/// Row `r` of a pair: ggml's `hsum_float_8` of its 256-bit half.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn hsum_half(a: __m512, r: usize) -> f32 {
    if r == 0 {
        hsum8_halves(_mm512_extractf32x4_ps(a, 0), _mm512_extractf32x4_ps(a, 1))
    } else {
        hsum8_halves(_mm512_extractf32x4_ps(a, 2), _mm512_extractf32x4_ps(a, 3))
    }
}

/// Two Q4_K rows (`stride` bytes apart) × eight Q8_K activation rows (`qrow` bytes apart).
/// Each 512-bit register holds the two rows' 256-bit AVX2 registers side by side, so every
/// lane computes the integer and the fused multiply-adds of the AVX2 kernel: the results
/// are the single-token ones bit for bit.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn tile8_q4_k(g: &[u8], stride: usize, x: &[u8], qrow: usize) -> [[f32; 2]; TILE_TOKENS] {
    let nb = stride / 144;
    assert!(g.len() >= 2 * stride && x.len() >= TILE_TOKENS * qrow && qrow >= nb * Q8K);
    let m4 = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); TILE_TOKENS];
    let mut acc_m = [_mm256_setzero_ps(); TILE_TOKENS];
    let mut sc = [_mm512_setzero_si512(); 8];
    for b in 0..nb {
        let o = 144 * b;
        let (wa, wb) = (&g[o..o + 144], &g[stride + o..stride + o + 144]);
        let (mut mins, mut dw, mut dminw) = ([0i16; 16], [0f32; 16], [0f32; 8]);
        for (r, w) in [wa, wb].into_iter().enumerate() {
            let mut scales = [0u8; 12];
            scales.copy_from_slice(&w[4..16]);
            let (d, dmin) = (avx2_h(w, 0), avx2_h(w, 2));
            dw[8 * r..8 * r + 8].fill(d);
            dminw[4 * r..4 * r + 4].fill(dmin);
            for j in 0..8 {
                let (s, m) = realm_gguf::quant::scale_min_k4(j, &scales);
                mins[8 * r + j] = i16::from(m);
                // Sub-block j's scale over row r's half of register j.
                let v = _mm256_set1_epi16(i16::from(s));
                sc[j] = if r == 0 {
                    _mm512_castsi256_si512(v)
                } else {
                    _mm512_inserti64x4(sc[j], v, 1)
                };
            }
        }
        // SAFETY: sixteen i16, sixteen f32 and eight f32: unaligned loads.
        let (mins, dw, dminw) = unsafe {
            (
                _mm256_loadu_si256(mins.as_ptr().cast()),
                _mm512_loadu_ps(dw.as_ptr()),
                _mm256_loadu_ps(dminw.as_ptr()),
            )
        };
        let mut q = [_mm512_setzero_si512(); 8];
        for j in 0..4 {
            let q4 = pair(load32(&wa[16 + 32 * j..]), load32(&wb[16 + 32 * j..]));
            q[2 * j] = _mm512_and_si512(q4, m4);
            q[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(q4, 4), m4);
        }
        for (t, (acc, acc_m)) in acc.iter_mut().zip(&mut acc_m).enumerate() {
            let xb = &x[t * qrow + b * Q8K..t * qrow + (b + 1) * Q8K];
            let dy = q8k_d(xb, 0);
            // ggml: the sums of each 32 (pairs of the sixteens), against the mins.
            let bs = load32(&xb[260..]);
            let q8s = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
            let prod = _mm256_madd_epi16(mins, _mm256_broadcastsi128_si256(q8s));
            let dmin = _mm256_mul_ps(_mm256_set1_ps(-dy), dminw);
            *acc_m = _mm256_fmadd_ps(dmin, _mm256_cvtepi32_ps(prod), *acc_m);
            let mut sumi = _mm512_setzero_si512();
            for (k, (q, sc)) in q.iter().zip(&sc).enumerate() {
                let p = _mm512_madd_epi16(*sc, _mm512_maddubs_epi16(*q, twice(&xb[4 + 32 * k..])));
                sumi = _mm512_add_epi32(sumi, p);
            }
            let d = _mm512_mul_ps(_mm512_set1_ps(dy), dw);
            *acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi), *acc);
        }
    }
    let mut out = [[0f32; 2]; TILE_TOKENS];
    for (o, (acc, acc_m)) in out.iter_mut().zip(acc.iter().zip(&acc_m)) {
        let mut m = [0f32; 8];
        // SAFETY: room for eight floats.
        unsafe { _mm256_storeu_ps(m.as_mut_ptr(), *acc_m) };
        for (r, o) in o.iter_mut().enumerate() {
            let m = &m[4 * r..4 * r + 4];
            *o = hsum_half(*acc, r) + ((m[0] + m[2]) + (m[1] + m[3]));
        }
    }
    out
}

/// `avx2::scaled_dot4` on 512-bit vectors: one K-quant super-block's 256 scaled weight
/// values against four activation rows (an exact integer sum each).
///
/// # Safety
/// As for [`quantize_q8_0`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn scaled_dot4(qs: &[i16; 256], x: [&[u8; 256]; 4]) -> [i32; 4] {
    let mut acc = [_mm512_setzero_si512(); 4];
    for i in (0..256).step_by(32) {
        // SAFETY: 32 i16 and 32 bytes at i < 256 in every row; unaligned loads.
        let q = unsafe { _mm512_loadu_si512(qs[i..].as_ptr().cast()) };
        for (a, x) in acc.iter_mut().zip(x) {
            // SAFETY: as above.
            let y = unsafe { _mm512_cvtepi8_epi16(_mm256_loadu_si256(x[i..].as_ptr().cast())) };
            *a = _mm512_dpwssd_epi32(*a, q, y);
        }
    }
    // A loop, not `map` (see `avx2::scaled_dot4`).
    let mut out = [0i32; 4];
    for (o, a) in out.iter_mut().zip(acc) {
        *o = _mm512_reduce_add_epi32(a);
    }
    out
}

/// Two Q6_K rows × eight Q8_K activation rows, laid out as [`tile8_q4_k`]'s: the AVX2
/// kernel's arithmetic per lane (unsigned six-bit values, the -32 offset per lane from the
/// activations' 16-value sums).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn tile8_q6_k(g: &[u8], stride: usize, x: &[u8], qrow: usize) -> [[f32; 2]; TILE_TOKENS] {
    let nb = stride / 210;
    assert!(g.len() >= 2 * stride && x.len() >= TILE_TOKENS * qrow && qrow >= nb * Q8K);
    let m4 = _mm512_set1_epi8(0x0F);
    let m2 = _mm512_set1_epi8(3);
    let mut acc = [_mm512_setzero_ps(); TILE_TOKENS];
    for b in 0..nb {
        let o = 210 * b;
        let (wa, wb) = (&g[o..o + 210], &g[stride + o..stride + o + 210]);
        let mut dw = [0f32; 16];
        dw[..8].fill(avx2_h(wa, 208));
        dw[8..].fill(avx2_h(wb, 208));
        // SAFETY: sixteen f32; unaligned load.
        let dw = unsafe { _mm512_loadu_ps(dw.as_ptr()) };
        let mut q = [_mm512_setzero_si512(); 8];
        let mut scale = [_mm512_setzero_si512(); 8];
        for n in 0..2 {
            let two = |at: usize| pair(load32(&wa[at..]), load32(&wb[at..]));
            let (ql1, ql2, qh) = (two(64 * n), two(64 * n + 32), two(128 + 32 * n));
            let hb = |s: u32| {
                let v = _mm512_srlv_epi16(qh, _mm512_set1_epi16(s as i16));
                _mm512_slli_epi16(_mm512_and_si512(v, m2), 4)
            };
            q[4 * n] = _mm512_or_si512(_mm512_and_si512(ql1, m4), hb(0));
            q[4 * n + 1] = _mm512_or_si512(_mm512_and_si512(ql2, m4), hb(2));
            q[4 * n + 2] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql1, 4), m4), hb(4));
            q[4 * n + 3] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql2, 4), m4), hb(6));
            for k in 0..4 {
                let s = |w: &[u8], i: usize| {
                    _mm_set1_epi16(i16::from(w[192 + 8 * n + 2 * k + i] as i8))
                };
                let a = _mm256_set_m128i(s(wa, 1), s(wa, 0));
                let b = _mm256_set_m128i(s(wb, 1), s(wb, 0));
                scale[4 * n + k] = pair(a, b);
            }
        }
        for (t, acc) in acc.iter_mut().enumerate() {
            let xb = &x[t * qrow + b * Q8K..t * qrow + (b + 1) * Q8K];
            let dy = q8k_d(xb, 0);
            let mut sumi = _mm512_setzero_si512();
            for (k, (q, scale)) in q.iter().zip(&scale).enumerate() {
                let q8 = twice(&xb[4 + 32 * k..]);
                let p16 = _mm512_maddubs_epi16(*q, q8);
                sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(*scale, p16));
            }
            let offset = pair(
                super::avx2::q6_offset(&wa[192..208], &xb[260..292]),
                super::avx2::q6_offset(&wb[192..208], &xb[260..292]),
            );
            sumi = _mm512_sub_epi32(sumi, offset);
            let d = _mm512_mul_ps(_mm512_set1_ps(dy), dw);
            *acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi), *acc);
        }
    }
    let mut out = [[0f32; 2]; TILE_TOKENS];
    for (o, acc) in out.iter_mut().zip(&acc) {
        *o = [hsum_half(*acc, 0), hsum_half(*acc, 1)];
    }
    out
}

/// An f16 at `at` as f32 (F16C).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn avx2_h(b: &[u8], at: usize) -> f32 {
    f16_at(b, at)
}

/// The K-quant tiles (Q4_K, Q6_K weights × Q8_K activations): weight rows `rows` × every
/// token of `xq` (`qrow` bytes each), into `out` at (token, row). Two weight rows × eight
/// tokens per step; remainders go to the AVX2 tiles. Every result equals the single-token
/// kernel's bit for bit. `false` if `ty` is not a K-quant with a tile.
///
/// # Safety
/// As for [`dot_tile`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_tile_k(
    ty: GgmlType,
    (w, wrow): (&[u8], usize),
    (xq, qrow): (&[u8], usize),
    rows: std::ops::Range<usize>,
    out: TileOut,
) -> bool {
    if !matches!(ty, GgmlType::Q4_K | GgmlType::Q6_K) || qrow == 0 {
        return false;
    }
    let n_tok = xq.len() / qrow;
    let groups = n_tok / TILE_TOKENS;
    let pairs = rows.start + rows.len() / 2 * 2;
    for j in (rows.start..pairs).step_by(2) {
        let g = &w[j * wrow..(j + 2) * wrow];
        for group in 0..groups {
            let t0 = group * TILE_TOKENS;
            let x = &xq[t0 * qrow..(t0 + TILE_TOKENS) * qrow];
            let res = if ty == GgmlType::Q4_K {
                tile8_q4_k(g, wrow, x, qrow)
            } else {
                tile8_q6_k(g, wrow, x, qrow)
            };
            for (t, v) in res.into_iter().enumerate() {
                // SAFETY: this call owns rows `j..j + 2` (the caller's contract).
                unsafe { out.put(t0 + t, j, &v) };
            }
        }
    }
    let t0 = groups * TILE_TOKENS;
    // SAFETY: the AVX2 set is part of `available`; the same rows.
    unsafe {
        if t0 < n_tok {
            avx2::dot_tile(
                ty,
                w,
                wrow,
                (&xq[t0 * qrow..], qrow),
                rows.start..pairs,
                out.skip(t0),
            );
        }
        avx2::dot_tile(ty, w, wrow, (xq, qrow), pairs..rows.end, out);
    }
    true
}

/// Weight rows `rows` of `w` × every token of `prompt`, into `out` at (token, row): four
/// weight rows × eight tokens per step, the weights unpacked once per step. Every result
/// equals [`dot_rows`]' bit for bit. `false` if `ty` has no tile kernel.
///
/// # Safety
/// The CPU must support what [`available`] checks, and no other thread may write the
/// elements of `out` in `rows` meanwhile.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_tile(
    ty: GgmlType,
    (w, wrow): (&[u8], usize),
    (xq, prompt): (&[u8], &Packed),
    rows: std::ops::Range<usize>,
    out: TileOut,
) -> bool {
    let n_tok = prompt.n_tok;
    if !has_tile(ty) || n_tok == 0 {
        return false;
    }
    let full = rows.start + rows.len() / 4 * 4;
    for j in (rows.start..full).step_by(4) {
        let g = &w[j * wrow..(j + 4) * wrow];
        for group in 0..n_tok.div_ceil(TILE_TOKENS) {
            let recs = prompt.group(group);
            let res = match ty {
                GgmlType::Q4_1 => tile8_q4_1(g, wrow, recs),
                GgmlType::Q5_0 => tile8_signed::<22, true>(g, wrow, recs),
                _ => tile8_signed::<34, false>(g, wrow, recs),
            };
            let t0 = group * TILE_TOKENS;
            for (t, v) in (t0..n_tok).zip(res) {
                // SAFETY: this call owns rows `j..j + 4` (the caller's contract).
                unsafe { out.put(t, j, &v) };
            }
        }
    }
    // Weight rows past the last group of four: one row and token at a time.
    let qrow = xq.len() / n_tok;
    for j in full..rows.end {
        for t in 0..n_tok {
            let mut v = [0f32];
            // SAFETY: the AVX2 set is part of `available`.
            unsafe { avx2::dot_rows(ty, w, wrow, &xq[t * qrow..(t + 1) * qrow], j, &mut v) };
            // SAFETY: as above.
            unsafe { out.put(t, j, &v) };
        }
    }
    true
}

/// `quant::quantize_row` for Q8_0 and Q8_1 (`with_sum`), byte for byte: the scale from the
/// block's absolute maximum, `127 / max` as the inverse, products rounded half to even
/// (the default rounding mode of `vcvtps2dq`), and for Q8_1 `d ×` the exact integer sum.
///
/// # Safety
/// The CPU must support what [`available`] checks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub fn quantize_q8_0(x: &[f32], with_sum: bool, out: &mut Vec<u8>) {
    for block in x.chunks_exact(32) {
        // SAFETY: 32 floats are there (`chunks_exact`); unaligned loads.
        let (a, b) = unsafe {
            (
                _mm512_loadu_ps(block.as_ptr()),
                _mm512_loadu_ps(block[16..].as_ptr()),
            )
        };
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let m = _mm512_set1_ps(id);
        let qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, m));
        let qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, m));
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        if with_sum {
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
            out.extend_from_slice(&half::f16::from_f32(d * sum as f32).to_le_bytes());
        }
        let mut qs = [0u8; 32];
        // SAFETY: 16 + 16 bytes into `qs`; values are within -127..=127, so the truncating
        // narrowing is exact.
        unsafe {
            _mm_storeu_si128(qs.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(qa));
            _mm_storeu_si128(qs[16..].as_mut_ptr().cast(), _mm512_cvtepi32_epi8(qb));
        }
        out.extend_from_slice(&qs);
    }
}

/// `quant::quantize_row` for Q8_K, byte for byte: the scale from the value of largest
/// magnitude (the first such, with its sign), `-127 / max`, round half to even, clamp at
/// 127, and the sums of each sixteen.
///
/// # Safety
/// As for [`quantize_q8_0`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub fn quantize_q8_k(x: &[f32], out: &mut Vec<u8>) {
    for block in x.chunks_exact(256) {
        let mut v = [_mm512_setzero_ps(); 16];
        let mut am = _mm512_setzero_ps();
        for (i, v) in v.iter_mut().enumerate() {
            // SAFETY: 16 floats at 16·i < 256; unaligned load.
            *v = unsafe { _mm512_loadu_ps(block[16 * i..].as_ptr()) };
            am = _mm512_max_ps(am, _mm512_abs_ps(*v));
        }
        let amax = _mm512_reduce_max_ps(am);
        if amax == 0.0 {
            out.extend_from_slice(&[0u8; super::quant::Q8_K_BYTES]);
            continue;
        }
        // The first value whose magnitude is the maximum, sign included.
        let at = v
            .iter()
            .enumerate()
            .find_map(|(i, v)| {
                let hit = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(*v), _mm512_set1_ps(amax));
                (hit != 0).then(|| 16 * i + hit.trailing_zeros() as usize)
            })
            .unwrap_or(0);
        let iscale = -127.0 / block[at];
        let m = _mm512_set1_ps(iscale);
        let mut qs = [0u8; 256];
        let mut sums = [0u8; 32];
        for (i, v) in v.iter().enumerate() {
            let q = _mm512_min_epi32(
                _mm512_cvtps_epi32(_mm512_mul_ps(*v, m)),
                _mm512_set1_epi32(127),
            );
            let sum = _mm512_reduce_add_epi32(q) as i16;
            sums[2 * i..2 * i + 2].copy_from_slice(&sum.to_le_bytes());
            // SAFETY: 16 bytes at 16·i < 256; values are within -128..=127.
            unsafe { _mm_storeu_si128(qs[16 * i..].as_mut_ptr().cast(), _mm512_cvtepi32_epi8(q)) };
        }
        out.extend_from_slice(&(1.0 / iscale).to_le_bytes());
        out.extend_from_slice(&qs);
        out.extend_from_slice(&sums);
    }
}

/// Flash-attention helpers for several query heads that share one KV head.
pub mod fa {
    use std::arch::x86_64::*;

    use half::f16;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn load16(x: &[f16]) -> __m512 {
        assert!(x.len() >= 16);
        // SAFETY: 16 f16 (32 bytes) are there (checked); f16 is a transparent u16.
        _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(x.as_ptr().cast()) })
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn loadf(x: &[f32]) -> __m512 {
        assert!(x.len() >= 16);
        // SAFETY: 16 f32 are there (checked); unaligned load.
        unsafe { _mm512_loadu_ps(x.as_ptr()) }
    }

    /// `avx2::fa::dot(k, q_h)` for each head `h` (`q`: the heads' f16 queries as f32, one
    /// after the other), bit for bit: per head four 16-lane accumulators over 64-element
    /// steps and the same reduction; the key row is converted once for all heads.
    ///
    /// # Safety
    /// The CPU must support what [`super::available`] checks.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub fn dots(k: &[f16], q: &[f32], s: &mut [f32]) {
        match s.len() {
            1 => dots_n::<1>(k, q, s),
            2 => dots_n::<2>(k, q, s),
            3 => dots_n::<3>(k, q, s),
            _ => dots_n::<4>(k, q, s),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn dots_n<const H: usize>(k: &[f16], q: &[f32], s: &mut [f32]) {
        let n = k.len();
        assert!(n.is_multiple_of(64) && q.len() >= H * n && s.len() >= H);
        let mut acc = [[_mm512_setzero_ps(); 4]; H];
        for i in (0..n).step_by(64) {
            for a in 0..4 {
                let kv = load16(&k[i + 16 * a..]);
                for (h, acc) in acc.iter_mut().enumerate() {
                    let p = _mm512_mul_ps(kv, loadf(&q[h * n + i + 16 * a..]));
                    acc[a] = _mm512_add_ps(acc[a], p);
                }
            }
        }
        for (s, a) in s.iter_mut().zip(&acc) {
            // (0 + 2) + (1 + 3) lane-wise, then the halves, then the quarters.
            let v = _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
            let t3 = _mm256_add_ps(
                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)),
                _mm512_castps512_ps256(v),
            );
            let t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
            let mut t = [0f32; 4];
            // SAFETY: `t` holds four floats.
            unsafe { _mm_storeu_ps(t.as_mut_ptr(), t6) };
            *s = (t[0] + t[2]) + (t[1] + t[3]);
        }
    }

    /// `avx2::fa::mad(acc_h, v, vs[h])` for each head `h` (`acc`: the heads' f16
    /// accumulators one after the other), the value row converted once for all.
    ///
    /// # Safety
    /// As for [`dots`].
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub fn mads(acc: &mut [f16], v: &[f16], vs: &[f32]) {
        let n = v.len();
        assert!(n.is_multiple_of(16) && acc.len() >= vs.len() * n);
        for i in (0..n).step_by(16) {
            let vv = load16(&v[i..]);
            for (h, &s) in vs.iter().enumerate() {
                let a = &mut acc[h * n + i..h * n + i + 16];
                let r = _mm512_fmadd_ps(vv, _mm512_set1_ps(s), load16(a));
                let r = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(r);
                // SAFETY: room for 16 f16 (the slice above); unaligned store.
                unsafe { _mm256_storeu_si256(a.as_mut_ptr().cast(), r) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::VecDot;
    use crate::testdata::{self, Lcg};

    /// Tiles of several tokens give each (row, token) exactly the single-row result,
    /// whatever the token count (remainders included) and weight row count.
    #[test]
    fn k_quant_tiles_equal_the_portable_kernels() {
        if !available() {
            eprintln!("this CPU lacks AVX-512 VNNI: nothing to compare");
            return;
        }
        let mut rng = Lcg(77);
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
            for n_tok in [1usize, 8, 11, 16, 19] {
                let (w, wrow) = testdata::weights(&mut rng, ty, 8, 512);
                let (xq, qrow) = testdata::activations(&mut rng, ty, n_tok, 512);
                // Rows 1..8: an odd start and a remainder past the pairs.
                let mut out = vec![0f32; 8 * n_tok];
                let to = TileOut::new(&mut out, 8);
                // SAFETY: `available()` checked above; one thread.
                assert!(unsafe { dot_tile_k(ty, (&w, wrow), (&xq, qrow), 1..8, to) });
                testdata::assert_tiles(ty, (&w, wrow), (&xq, qrow), 1..8, &out);
            }
        }
    }

    /// The multi-head attention helpers equal the AVX2 ones (themselves checked against
    /// the portable arithmetic) head by head, bit for bit.
    #[test]
    fn attention_helpers_equal_the_avx2_ones() {
        if !available() {
            eprintln!("this CPU lacks AVX-512 VNNI: nothing to compare");
            return;
        }
        let mut rng = Lcg(5);
        let mut mk = |n: usize| -> Vec<half::f16> {
            (0..n)
                .map(|_| half::f16::from_f32((rng.next() % 2000) as f32 / 300.0 - 3.3))
                .collect()
        };
        for heads in 1..=4 {
            let (k, q) = (mk(256), mk(256 * heads));
            let q32: Vec<f32> = q.iter().map(|v| v.to_f32()).collect();
            let mut s = vec![0f32; heads];
            // SAFETY: `available()` checked above.
            unsafe { fa::dots(&k, &q32, &mut s) };
            for (h, s) in s.iter().enumerate() {
                // SAFETY: AVX2 is part of `available`.
                let want = unsafe { avx2::fa::dot(&k, &q[h * 256..(h + 1) * 256]) };
                assert_eq!(s.to_bits(), want.to_bits(), "{heads} heads, head {h}");
            }
            let (v, mut acc) = (mk(256), mk(256 * heads));
            let mut want = acc.clone();
            let vs: Vec<f32> = (0..heads).map(|h| 0.3 + h as f32 * 0.17).collect();
            // SAFETY: as above.
            unsafe { fa::mads(&mut acc, &v, &vs) };
            for (h, w) in want.chunks_exact_mut(256).enumerate() {
                // SAFETY: as above.
                unsafe { avx2::fa::mad(w, &v, vs[h]) };
            }
            assert_eq!(acc, want, "{heads} heads");
        }
    }

    /// The AVX-512 quantizers write the portable code's bytes, ties and zero blocks included.
    #[test]
    fn quantizers_equal_the_portable_ones() {
        if !available() {
            eprintln!("this CPU lacks AVX-512 VNNI: nothing to compare");
            return;
        }
        let mut rng = Lcg(11);
        for case in 0..40 {
            let mut x: Vec<f32> = (0..1024)
                .map(|_| (rng.next() % 20001) as f32 / 1000.0 - 10.0)
                .collect();
            if case % 4 == 1 {
                x[..256].fill(0.0);
            }
            if case % 4 == 2 {
                // Equal magnitudes of both signs: the first one decides Q8_K's sign.
                x[7] = -12.0;
                x[300] = 12.0;
                x[40] = 12.0;
            }
            if case % 4 == 3 {
                // Halves, to exercise round-half-to-even.
                x.iter_mut().for_each(|v| *v = (*v * 2.0).round() / 2.0);
            }
            for kind in [VecDot::Q8_0, VecDot::Q8_1, VecDot::Q8K] {
                let (mut got, mut want) = (Vec::new(), Vec::new());
                // SAFETY: `available()` checked above.
                unsafe {
                    match kind {
                        VecDot::Q8K => quantize_q8_k(&x, &mut got),
                        _ => quantize_q8_0(&x, kind == VecDot::Q8_1, &mut got),
                    }
                }
                crate::quant::quantize_row_portable(kind, &x, &mut want);
                assert_eq!(got, want, "{kind:?}, case {case}");
            }
        }
    }

    #[test]
    fn tiles_equal_the_portable_kernels() {
        if !available() {
            eprintln!("this CPU lacks AVX-512 VNNI: nothing to compare");
            return;
        }
        let mut rng = Lcg(99);
        for ty in [GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0] {
            for n_tok in [1usize, 3, 4, 6, 9, 13, 21] {
                let (w, wrow) = testdata::weights(&mut rng, ty, 10, 256);
                let (xq, qrow) = testdata::activations(&mut rng, ty, n_tok, 256);
                let mut packed = Packed::default();
                packed.pack(ty, &xq, n_tok);
                // Rows 1..10 (a remainder past the groups of four, and an offset start).
                let mut out = vec![0f32; 10 * n_tok];
                let to = TileOut::new(&mut out, 10);
                // SAFETY: `available()` checked above; one thread.
                assert!(unsafe { dot_tile(ty, (&w, wrow), (&xq, &packed), 1..10, to) });
                testdata::assert_tiles(ty, (&w, wrow), (&xq, qrow), 1..10, &out);
            }
        }
    }

    /// Bit-identical to the portable kernel, row by row, on random weights, with a row
    /// count that leaves a remainder.
    #[test]
    fn avx512_kernels_equal_the_portable_ones() {
        if !available() {
            eprintln!("this CPU lacks AVX-512 VNNI: nothing to compare");
            return;
        }
        let mut rng = Lcg(4242);
        for ty in [GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0] {
            for _ in 0..20 {
                let (w, wrow) = testdata::weights(&mut rng, ty, 11, 576);
                let (xq, qrow) = testdata::activations(&mut rng, ty, 1, 576);
                let mut got = vec![0f32; 11];
                // SAFETY: `available()` checked above.
                assert!(unsafe { dot_rows(ty, &w, wrow, &xq, 0, &mut got) });
                testdata::assert_tiles(ty, (&w, wrow), (&xq, qrow), 0..got.len(), &got);
            }
        }
    }
}
