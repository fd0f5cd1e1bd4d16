//! AVX-512 (F, BW, VL, VNNI) passes over four weight rows at once for the two types that
//! dominate decode (Q4_1 and Q8_0 weights). Each 512-bit register holds two rows, laid out
//! so that every 32-bit lane computes exactly what the matching lane of the AVX2 kernel
//! computes: `vpdpbusd` gives the same integer sums as ggml's `maddubs` + `madd` (no i16
//! saturation is possible for these value ranges), and the float updates per lane are the
//! same fused multiply-adds in the same block order. Results are bit-identical to
//! `avx2.rs` and to the portable code (tests below).

use std::arch::x86_64::*;

use super::avx2;
use super::quant::{Q8_0_BYTES, Q8_1_BYTES};
use realm_gguf::GgmlType;

/// Whether this CPU can run these kernels (the AVX2 set as well, for the remainder rows).
pub fn available() -> bool {
    avx2::available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// Four rows (`stride` bytes apart from the start of the slice) × one activation row, given
/// the activation's per-block scales.
type FourRows = fn(&[u8], usize, &[u8], &[[f32; 2]]) -> [f32; 4];

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
        GgmlType::Q4_1 => (Q8_1_BYTES, |g, s, x, sc| dot4_q4_1(g, s, x, sc)),
        GgmlType::Q8_0 => (Q8_0_BYTES, |g, s, x, sc| dot4_q8_0(g, s, x, sc)),
        _ => return false,
    };
    // The activation's block scales (and Q8_1 sums) as f32, once for all rows.
    let nb = x.len() / block;
    let mut stack = [[0f32; 2]; 512];
    let mut heap = Vec::new();
    let scales = if nb <= stack.len() {
        &mut stack[..nb]
    } else {
        heap.resize(nb, [0f32; 2]);
        &mut heap[..]
    };
    for (s, xb) in scales.iter_mut().zip(x.chunks_exact(block)) {
        *s = [f16_at(xb, 0), f16_at(xb, 2)];
    }
    for i in (0..out.len() / 4 * 4).step_by(4) {
        let at = (j0 + i) * wrow;
        avx2::prefetch_ahead(w, at, 4 * wrow);
        let r = kernel(&w[at..at + 4 * wrow], wrow, x, scales);
        out[i..i + 4].copy_from_slice(&r);
    }
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
/// [a0 a1 b0 b1 c0 c1 d0 d1]. One gather instead of a chain of inserts, which would
/// compete with the permutes for the shuffle port.
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

/// Four Q4_1 rows × one Q8_1 activation row. Register `p` holds rows `2p` and `2p + 1`
/// as 128-bit quarters [a low nibbles, a high, b low, b high] against the activation
/// twice over: per row, the AVX2 kernel's register.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn dot4_q4_1(g: &[u8], stride: usize, x: &[u8], scales: &[[f32; 2]]) -> [f32; 4] {
    let nb = x.len() / Q8_1_BYTES;
    assert!(g.len() >= 4 * stride && stride >= nb * 20 && scales.len() >= nb);
    let w = [0, 1, 2, 3].map(|r| &g[r * stride..r * stride + nb * 20]);
    // Per 16-bit lane: 0 in quarters 0 and 2, 4 in quarters 1 and 3.
    let four = 0x0004_0004_0004_0004;
    let shifts = _mm512_set_epi64(four, four, 0, 0, four, four, 0, 0);
    let m4 = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut summs = _mm256_setzero_ps();
    for b in 0..nb {
        let xb = &x[b * Q8_1_BYTES..(b + 1) * Q8_1_BYTES];
        let yy = _mm512_broadcast_i64x4(load32(&xb[4..36]));
        let [dy, sy] = scales[b];
        let o = 20 * b;
        let dm = halves4(g, stride, o);
        // ggml: m · s summed per row (scalar FMA per block): here the odd lanes.
        summs = _mm256_fmadd_ps(dm, _mm256_set1_ps(sy), summs);
        let dd = _mm256_mul_ps(dm, _mm256_set1_ps(dy));
        for p in 0..2 {
            let a = _mm512_broadcast_i32x4(load16(&w[2 * p][o + 4..]));
            let b = _mm512_broadcast_i32x4(load16(&w[2 * p + 1][o + 4..]));
            let q = _mm512_mask_blend_epi64(0xF0, a, b);
            let q = _mm512_and_si512(_mm512_srlv_epi16(q, shifts), m4);
            let xy = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q, yy));
            acc[p] = _mm512_fmadd_ps(row_scales(dd, p), xy, acc[p]);
        }
    }
    let mut s = [0f32; 8];
    // SAFETY: `s` has room for eight floats.
    unsafe { _mm256_storeu_ps(s.as_mut_ptr(), summs) };
    let mut r = [0f32; 4];
    for p in 0..2 {
        let a = acc[p];
        r[2 * p] =
            hsum8_halves(_mm512_extractf32x4_ps(a, 0), _mm512_extractf32x4_ps(a, 1)) + s[4 * p + 1];
        r[2 * p + 1] =
            hsum8_halves(_mm512_extractf32x4_ps(a, 2), _mm512_extractf32x4_ps(a, 3)) + s[4 * p + 3];
    }
    r
}

/// Four Q8_0 rows × one Q8_0 activation row; register `p` holds rows `2p` (low half) and
/// `2p + 1` (high half), each half exactly the AVX2 kernel's register.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn dot4_q8_0(g: &[u8], stride: usize, x: &[u8], scales: &[[f32; 2]]) -> [f32; 4] {
    let nb = x.len() / Q8_0_BYTES;
    assert!(g.len() >= 4 * stride && stride >= nb * 34 && scales.len() >= nb);
    let w = [0, 1, 2, 3].map(|r| &g[r * stride..r * stride + nb * 34]);
    let mut acc = [_mm512_setzero_ps(); 2];
    for b in 0..nb {
        let xb = &x[b * Q8_0_BYTES..(b + 1) * Q8_0_BYTES];
        let yy = _mm512_broadcast_i64x4(load32(&xb[2..34]));
        let dy = scales[b][0];
        let o = 34 * b;
        // [d0 · d1 · d2 · d3 ·]: each row's scale and its first two quants, unused.
        let dd = _mm256_mul_ps(halves4(g, stride, o), _mm256_set1_ps(dy));
        for p in 0..2 {
            let q = _mm512_mask_broadcast_i64x4(
                _mm512_castsi256_si512(load32(&w[2 * p][o + 2..])),
                0xF0,
                load32(&w[2 * p + 1][o + 2..]),
            );
            // ggml's sign trick (|w| × y·sign(w)) without `vpsignb`, which has no 512-bit form.
            let neg = _mm512_movepi8_mask(q);
            let sy = _mm512_mask_sub_epi8(yy, neg, _mm512_setzero_si512(), yy);
            let xy = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(
                _mm512_setzero_si512(),
                _mm512_abs_epi8(q),
                sy,
            ));
            acc[p] = _mm512_fmadd_ps(row_scales(dd, p), xy, acc[p]);
        }
    }
    let mut r = [0f32; 4];
    for p in 0..2 {
        let a = acc[p];
        r[2 * p] = hsum8_halves(_mm512_extractf32x4_ps(a, 0), _mm512_extractf32x4_ps(a, 1));
        r[2 * p + 1] = hsum8_halves(_mm512_extractf32x4_ps(a, 2), _mm512_extractf32x4_ps(a, 3));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::quant::{self, VecDot};

    /// Bit-identical to the portable kernel, row by row, on random weights, including
    /// extreme quants (-128) and a row count that leaves a remainder.
    #[test]
    fn avx512_kernels_equal_the_portable_ones() {
        if !available() {
            eprintln!("this CPU lacks AVX-512 VNNI: nothing to compare");
            return;
        }
        let mut s = 4242u64;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        for ty in [GgmlType::Q4_1, GgmlType::Q8_0] {
            for _ in 0..20 {
                let (k, ts, rows) = (576usize, ty.type_size() as usize, 11usize);
                let wrow = k / 32 * ts;
                let mut w: Vec<u8> = (0..rows * wrow).map(|_| next() as u8).collect();
                for b in 0..rows * k / 32 {
                    let d = half::f16::from_f32((next() % 1000) as f32 / 40000.0 - 0.0125);
                    w[b * ts..b * ts + 2].copy_from_slice(&d.to_le_bytes());
                    if ty == GgmlType::Q4_1 {
                        let m = half::f16::from_f32((next() % 1000) as f32 / 9000.0 - 0.05);
                        w[b * ts + 2..b * ts + 4].copy_from_slice(&m.to_le_bytes());
                    }
                }
                let xs: Vec<f32> = (0..k)
                    .map(|_| (next() % 2000) as f32 / 100.0 - 10.0)
                    .collect();
                let mut xq = Vec::new();
                quant::quantize_row(VecDot::for_weight(ty).expect("kind"), &xs, &mut xq);
                let mut got = vec![0f32; rows];
                // SAFETY: `available()` checked above.
                assert!(unsafe { dot_rows(ty, &w, wrow, &xq, 0, &mut got) });
                for (r, g) in got.iter().enumerate() {
                    let want = quant::dot(ty, &w[r * wrow..(r + 1) * wrow], &xq);
                    assert_eq!(g.to_bits(), want.to_bits(), "{ty} row {r}: {g} vs {want}");
                }
            }
        }
    }
}
