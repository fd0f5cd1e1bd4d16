//! AVX2 + FMA + F16C versions of the integer dot products in `quant.rs`: the same
//! instructions ggml's x86 `ggml_vec_dot_*` uses, in the same order, so results are
//! identical to the portable code (and to llama.cpp) bit for bit — only faster. Selected
//! at run time; `quant::dot` stays the reference they are tested against.

use std::arch::x86_64::*;

use realm_gguf::GgmlType;

use super::quant::{Q8_0_BYTES, Q8_1_BYTES, Q8_K_BYTES, TileOut};

/// Whether this CPU can run these kernels.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Rows `j0..j0 + out.len()` of `w` dotted with `x`; `false` if `ty` has no AVX2 kernel.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_rows(
    ty: GgmlType,
    w: &[u8],
    wrow: usize,
    x: &[u8],
    j0: usize,
    out: &mut [f32],
) -> bool {
    let row = |i: usize| &w[(j0 + i) * wrow..(j0 + i + 1) * wrow];
    match ty {
        GgmlType::Q4_0 => out.iter_mut().enumerate().for_each(|(i, o)| {
            prefetch_ahead(w, (j0 + i) * wrow, wrow);
            *o = dot_q4_0(row(i), x)
        }),
        GgmlType::Q4_1 => {
            // Four rows per pass share the activation loads and run four independent
            // FMA chains; each row's arithmetic is unchanged.
            let full = out.len() / 4 * 4;
            for i in (0..full).step_by(4) {
                prefetch_ahead(w, (j0 + i) * wrow, 4 * wrow);
                let r = dot4_q4_1([row(i), row(i + 1), row(i + 2), row(i + 3)], x);
                out[i..i + 4].copy_from_slice(&r);
            }
            for (i, o) in out.iter_mut().enumerate().skip(full) {
                *o = dot_q4_1(row(i), x);
            }
        }
        GgmlType::Q5_0 => out.iter_mut().enumerate().for_each(|(i, o)| {
            prefetch_ahead(w, (j0 + i) * wrow, wrow);
            *o = dot_q5_0(row(i), x)
        }),
        GgmlType::Q8_0 => {
            let full = out.len() / 4 * 4;
            for i in (0..full).step_by(4) {
                prefetch_ahead(w, (j0 + i) * wrow, 4 * wrow);
                let r = dot4_q8_0([row(i), row(i + 1), row(i + 2), row(i + 3)], x);
                out[i..i + 4].copy_from_slice(&r);
            }
            for (i, o) in out.iter_mut().enumerate().skip(full) {
                *o = dot_q8_0(row(i), x);
            }
        }
        GgmlType::Q4_K => out.iter_mut().enumerate().for_each(|(i, o)| {
            prefetch_ahead(w, (j0 + i) * wrow, wrow);
            *o = dot_q4_k(row(i), x)
        }),
        GgmlType::Q6_K => out.iter_mut().enumerate().for_each(|(i, o)| {
            prefetch_ahead(w, (j0 + i) * wrow, wrow);
            *o = dot_q6_k(row(i), x)
        }),
        _ => return false,
    }
    true
}

/// How far ahead of the rows being computed their weights are requested from memory.
/// Measured on SmolLM2 Q4_1 decode at 1 thread, interleaved runs on the GPU machine's
/// 16-core Xeon (2.1 GHz, a large mesh L3, noisy): 16 KiB into L2 58–69 tok/s, 4 KiB into
/// L1 48–60; on the 2-core development Xeon both are within noise of each other.
const PREFETCH_DISTANCE: usize = 16 * 1024;

/// Ask for the cache lines of `w[at + D..at + D + len]` (D: [`PREFETCH_DISTANCE`]) into
/// L2, so the next rows stream in while these compute; the hardware prefetcher stops at
/// 4 KiB page boundaries of the mapped file. Addresses past the end are skipped.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn prefetch_ahead(w: &[u8], at: usize, len: usize) {
    let start = at + PREFETCH_DISTANCE;
    let end = (start + len).min(w.len());
    let mut p = start & !63;
    while p < end {
        // SAFETY: `p < w.len()`; a prefetch never faults or changes memory anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(w.as_ptr().add(p).cast()) };
        p += 64;
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn h(b: &[u8], at: usize) -> f32 {
    let bits = i32::from(u16::from_le_bytes([b[at], b[at + 1]]));
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

/// ggml's `hsum_float_8`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum8(v: __m256) -> f32 {
    let r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    let r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// The sum of eight i32 lanes (exact).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)))
}

/// 16 bytes of nibbles → 32 bytes: low nibbles first, then high (ggml's `bytes_from_nibbles_32`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn nibbles(qs: &[u8]) -> __m256i {
    assert!(qs.len() >= 16);
    // SAFETY: 16 bytes are there (checked); unaligned load.
    let tmp = unsafe { _mm_loadu_si128(qs.as_ptr().cast()) };
    let bytes = _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp);
    _mm256_and_si256(bytes, _mm256_set1_epi8(0x0F))
}

/// Eight lanes, each the sum of four consecutive u8 × i8 products, as floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_sum_us8(ax: __m256i, sy: __m256i) -> __m256 {
    let dot = _mm256_maddubs_epi16(ax, sy);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), dot))
}

/// The same for i8 × i8 (ggml's sign trick).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_sum_i8(x: __m256i, y: __m256i) -> __m256 {
    mul_sum_us8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load32(b: &[u8]) -> __m256i {
    assert!(b.len() >= 32);
    // SAFETY: 32 bytes are there (checked); unaligned load.
    unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q4_0(w: &[u8], x: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (wb, xb) in w.chunks_exact(18).zip(x.chunks_exact(Q8_0_BYTES)) {
        {
            let d = _mm256_set1_ps(h(wb, 0) * h(xb, 0));
            let qx = _mm256_sub_epi8(nibbles(&wb[2..18]), _mm256_set1_epi8(8));
            let q = mul_sum_i8(qx, load32(&xb[2..34]));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
    }
    hsum8(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q4_1(w: &[u8], x: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    for (wb, xb) in w.chunks_exact(20).zip(x.chunks_exact(Q8_1_BYTES)) {
        {
            summs = h(wb, 2).mul_add(h(xb, 2), summs);
            let d0d1 = _mm256_mul_ps(_mm256_set1_ps(h(wb, 0)), _mm256_set1_ps(h(xb, 0)));
            let xy = mul_sum_us8(nibbles(&wb[4..20]), load32(&xb[4..36]));
            acc = _mm256_fmadd_ps(d0d1, xy, acc);
        }
    }
    hsum8(acc) + summs
}

/// Each of the 32 fifth bits of a Q5 block spread to a byte of all ones or zeros (ggml's
/// `bytes_from_bits_32`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn high_bits(qh: &[u8]) -> __m256i {
    let x32 = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let shuf = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let mut bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x32 as i32), shuf);
    let bit_mask = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64);
    bytes = _mm256_or_si256(bytes, bit_mask);
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q5_0(w: &[u8], x: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (wb, xb) in w.chunks_exact(22).zip(x.chunks_exact(Q8_0_BYTES)) {
        {
            let d = _mm256_set1_ps(h(wb, 0) * h(xb, 0));
            let mut bx = nibbles(&wb[6..22]);
            // Values 0..15 with the fifth bit clear become -16..-1 (ggml: andnot with 0xF0).
            let bxhi = _mm256_andnot_si256(high_bits(&wb[2..6]), _mm256_set1_epi8(0xF0u8 as i8));
            bx = _mm256_or_si256(bx, bxhi);
            let q = mul_sum_i8(bx, load32(&xb[2..34]));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
    }
    hsum8(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (wb, xb) in w.chunks_exact(34).zip(x.chunks_exact(Q8_0_BYTES)) {
        {
            let d = _mm256_set1_ps(h(wb, 0) * h(xb, 0));
            let q = mul_sum_i8(load32(&wb[2..34]), load32(&xb[2..34]));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
    }
    hsum8(acc)
}

/// [`dot_q4_1`] of four rows at once.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot4_q4_1(w: [&[u8]; 4], x: &[u8]) -> [f32; 4] {
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut summs = [0f32; 4];
    for (b, xb) in x.chunks_exact(Q8_1_BYTES).enumerate() {
        let (dy, sy) = (h(xb, 0), h(xb, 2));
        let y = load32(&xb[4..36]);
        for r in 0..4 {
            let wb = &w[r][20 * b..20 * b + 20];
            summs[r] = h(wb, 2).mul_add(sy, summs[r]);
            let d0d1 = _mm256_mul_ps(_mm256_set1_ps(h(wb, 0)), _mm256_set1_ps(dy));
            let xy = mul_sum_us8(nibbles(&wb[4..20]), y);
            acc[r] = _mm256_fmadd_ps(d0d1, xy, acc[r]);
        }
    }
    [
        hsum8(acc[0]) + summs[0],
        hsum8(acc[1]) + summs[1],
        hsum8(acc[2]) + summs[2],
        hsum8(acc[3]) + summs[3],
    ]
}

/// [`dot_q8_0`] of four rows at once.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot4_q8_0(w: [&[u8]; 4], x: &[u8]) -> [f32; 4] {
    let mut acc = [_mm256_setzero_ps(); 4];
    for (b, xb) in x.chunks_exact(Q8_0_BYTES).enumerate() {
        let dy = h(xb, 0);
        let y = load32(&xb[2..34]);
        for r in 0..4 {
            let wb = &w[r][34 * b..34 * b + 34];
            let d = _mm256_set1_ps(h(wb, 0) * dy);
            let q = mul_sum_i8(load32(&wb[2..34]), y);
            acc[r] = _mm256_fmadd_ps(d, q, acc[r]);
        }
    }
    [hsum8(acc[0]), hsum8(acc[1]), hsum8(acc[2]), hsum8(acc[3])]
}

/// Q4_K × Q8_K (ggml's AVX2 `ggml_vec_dot_q4_K_q8_K`): integer sums per lane, scaled by
/// the sub-block scales in `madd`, fused into `acc`; the mins go to four lanes of their own.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q4_k(w: &[u8], x: &[u8]) -> f32 {
    tile_q4_k::<1>(w, [x])[0]
}

/// [`dot_q4_k`] of one weight row against `T` activation rows: the scales and nibbles of
/// each weight block are unpacked once for all; each token's arithmetic is unchanged.
#[target_feature(enable = "avx2,fma,f16c")]
fn tile_q4_k<const T: usize>(w: &[u8], xs: [&[u8]; T]) -> [f32; T] {
    let mut acc = [_mm256_setzero_ps(); T];
    let mut acc_m = [[0f32; 4]; T];
    let m4 = _mm256_set1_epi8(0x0F);
    let nb = w.len() / 144;
    assert!(xs.iter().all(|x| x.len() >= nb * Q8_K_BYTES));
    for (b, wb) in w.chunks_exact(144).enumerate() {
        let (dw, dminw) = (h(wb, 0), h(wb, 2));
        let mut scales = [0u8; 12];
        scales.copy_from_slice(&wb[4..16]);
        let mut sc = [0i16; 8];
        let mut mn = [0i32; 8];
        for j in 0..8 {
            let (s, m) = realm_gguf::quant::scale_min_k4(j, &scales);
            sc[j] = i16::from(s);
            mn[j] = i32::from(m);
        }
        let mut q4l = [_mm256_setzero_si256(); 4];
        let mut q4h = [_mm256_setzero_si256(); 4];
        for j in 0..4 {
            let q4 = load32(&wb[16 + 32 * j..]);
            q4l[j] = _mm256_and_si256(q4, m4);
            q4h[j] = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
        }
        for t in 0..T {
            let xb = &xs[t][b * Q8_K_BYTES..(b + 1) * Q8_K_BYTES];
            let dy = f32::from_le_bytes([xb[0], xb[1], xb[2], xb[3]]);
            let d = dy * dw;
            let dmin = -dy * dminw;
            let bsum = |k: usize| i32::from(i16::from_le_bytes([xb[260 + 2 * k], xb[261 + 2 * k]]));
            for (l, a) in acc_m[t].iter_mut().enumerate() {
                let q8s = |k: usize| bsum(2 * k) + bsum(2 * k + 1);
                let prod = mn[2 * l] * q8s(2 * l) + mn[2 * l + 1] * q8s(2 * l + 1);
                *a = dmin.mul_add(prod as f32, *a);
            }
            let mut sumi = _mm256_setzero_si256();
            for j in 0..4 {
                let q8l = load32(&xb[4 + 64 * j..]);
                let q8h = load32(&xb[4 + 64 * j + 32..]);
                let pl = _mm256_madd_epi16(
                    _mm256_set1_epi16(sc[2 * j]),
                    _mm256_maddubs_epi16(q4l[j], q8l),
                );
                let ph = _mm256_madd_epi16(
                    _mm256_set1_epi16(sc[2 * j + 1]),
                    _mm256_maddubs_epi16(q4h[j], q8h),
                );
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
            }
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc[t]);
        }
    }
    let mut out = [0f32; T];
    for t in 0..T {
        let m = acc_m[t];
        out[t] = hsum8(acc[t]) + ((m[0] + m[2]) + (m[1] + m[3]));
    }
    out
}

/// Q6_K × Q8_K (ggml's AVX2 `ggml_vec_dot_q6_K_q8_K`): unsigned six-bit values, the -32
/// offset subtracted per lane from the activations' 16-value sums.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q6_k(w: &[u8], x: &[u8]) -> f32 {
    tile_q6_k::<1>(w, [x])[0]
}

/// [`dot_q6_k`] of one weight row against `T` activation rows, each weight block's six-bit
/// values and scales unpacked once for all.
#[target_feature(enable = "avx2,fma,f16c")]
fn tile_q6_k<const T: usize>(w: &[u8], xs: [&[u8]; T]) -> [f32; T] {
    let mut acc = [_mm256_setzero_ps(); T];
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(3);
    let nb = w.len() / 210;
    assert!(xs.iter().all(|x| x.len() >= nb * Q8_K_BYTES));
    for (b, wb) in w.chunks_exact(210).enumerate() {
        let dw = h(wb, 208);
        let mut q = [_mm256_setzero_si256(); 8];
        let mut scale = [_mm256_setzero_si256(); 8];
        for n in 0..2 {
            let ql1 = load32(&wb[64 * n..]);
            let ql2 = load32(&wb[64 * n + 32..]);
            let qh = load32(&wb[128 + 32 * n..]);
            let h0 = _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4);
            let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4);
            let h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4);
            let h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4);
            q[4 * n] = _mm256_or_si256(_mm256_and_si256(ql1, m4), h0);
            q[4 * n + 1] = _mm256_or_si256(_mm256_and_si256(ql2, m4), h1);
            q[4 * n + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), h2);
            q[4 * n + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql2, 4), m4), h3);
            for k in 0..4 {
                let s_lo = i16::from(wb[192 + 8 * n + 2 * k] as i8);
                let s_hi = i16::from(wb[192 + 8 * n + 2 * k + 1] as i8);
                scale[4 * n + k] = _mm256_set_m128i(_mm_set1_epi16(s_hi), _mm_set1_epi16(s_lo));
            }
        }
        for t in 0..T {
            let xb = &xs[t][b * Q8_K_BYTES..(b + 1) * Q8_K_BYTES];
            let dy = f32::from_le_bytes([xb[0], xb[1], xb[2], xb[3]]);
            let d = dy * dw;
            let mut sumi = _mm256_setzero_si256();
            for n in 0..2 {
                for k in 0..4 {
                    let q8 = load32(&xb[4 + 128 * n + 32 * k..]);
                    let p16 = _mm256_maddubs_epi16(q[4 * n + k], q8);
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(scale[4 * n + k], p16));
                }
            }
            sumi = _mm256_sub_epi32(sumi, q6_offset(&wb[192..208], &xb[260..292]));
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc[t]);
        }
    }
    let mut out = [0f32; T];
    for t in 0..T {
        out[t] = hsum8(acc[t]);
    }
    out
}

/// Q6_K's -32 offset per lane as ggml's AVX2 kernel takes it: 32 · (bsum[2L] · sc[2L] +
/// bsum[2L+1] · sc[2L+1]) from the block's 16 scales and the activations' 16 sums.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn q6_offset(scales: &[u8], bsums: &[u8]) -> __m256i {
    assert!(scales.len() >= 16 && bsums.len() >= 32);
    // SAFETY: 16 and 32 readable bytes (asserted); unaligned loads.
    let (sc, bs) = unsafe {
        (
            _mm_loadu_si128(scales.as_ptr().cast()),
            _mm256_loadu_si256(bsums.as_ptr().cast()),
        )
    };
    _mm256_slli_epi32(_mm256_madd_epi16(bs, _mm256_cvtepi8_epi16(sc)), 5)
}

/// Σ qs[i]·x[i] over a K-quant super-block's 256 scaled values (16-bit) and activations
/// (signed bytes): `quant::KRow`'s integer sum, exact in any order.
///
/// # Safety
/// The CPU must support AVX2 ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn scaled_dot(qs: &[i16; 256], x: &[u8; 256]) -> i32 {
    let mut acc = _mm256_setzero_si256();
    for i in (0..256).step_by(16) {
        // SAFETY: 16 i16 and 16 bytes at i < 256; unaligned loads.
        let (q, y) = unsafe {
            (
                _mm256_loadu_si256(qs[i..].as_ptr().cast()),
                _mm256_cvtepi8_epi16(_mm_loadu_si128(x[i..].as_ptr().cast())),
            )
        };
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(q, y));
    }
    hsum_epi32(acc)
}

/// [`scaled_dot`] of one super-block against four activation rows at once (the weight
/// values loaded once for all four).
///
/// # Safety
/// The CPU must support AVX2 ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn scaled_dot4(qs: &[i16; 256], x: [&[u8; 256]; 4]) -> [i32; 4] {
    let mut acc = [_mm256_setzero_si256(); 4];
    for i in (0..256).step_by(16) {
        // SAFETY: 16 i16 and 16 bytes at i < 256 in every row; unaligned loads.
        let q = unsafe { _mm256_loadu_si256(qs[i..].as_ptr().cast()) };
        for (a, x) in acc.iter_mut().zip(x) {
            // SAFETY: as above.
            let y = unsafe { _mm256_cvtepi8_epi16(_mm_loadu_si128(x[i..].as_ptr().cast())) };
            *a = _mm256_add_epi32(*a, _mm256_madd_epi16(q, y));
        }
    }
    // A loop, not `map`: a closure does not take this function's target features, so the
    // intrinsics in one are calls.
    let mut out = [0i32; 4];
    for (o, a) in out.iter_mut().zip(acc) {
        *o = hsum_epi32(a);
    }
    out
}

/// Whether [`dot_tile`] has a kernel for `ty`.
pub fn has_tile(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q4_K | GgmlType::Q6_K
    )
}

/// The 32 signed weights of a Q4_0 or Q5_0 block (`wb`), as the dot product takes them.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn signed_weights(ty: GgmlType, wb: &[u8]) -> __m256i {
    if ty == GgmlType::Q5_0 {
        let bxhi = _mm256_andnot_si256(high_bits(&wb[2..6]), _mm256_set1_epi8(0xF0u8 as i8));
        _mm256_or_si256(nibbles(&wb[6..22]), bxhi)
    } else {
        _mm256_sub_epi8(nibbles(&wb[2..18]), _mm256_set1_epi8(8))
    }
}

/// [`dot_q4_0`] or [`dot_q5_0`] of one row against four tokens: each weight block
/// unpacked, made unsigned (ggml's sign trick) and its scale converted once for the four;
/// every (row, token) result is the single dot's, bit for bit. (Q4_1 and Q8_0 stay with
/// the four-row passes of [`dot_rows`], which measured faster for them.)
#[target_feature(enable = "avx2,fma,f16c")]
fn tile4_q_0(ty: GgmlType, w: &[u8], x: [&[u8]; 4]) -> [f32; 4] {
    let bytes = ty.type_size() as usize;
    let mut acc = [_mm256_setzero_ps(); 4];
    for (b, wb) in w.chunks_exact(bytes).enumerate() {
        let dw = h(wb, 0);
        let qx = signed_weights(ty, wb);
        let ax = _mm256_sign_epi8(qx, qx);
        for (a, xt) in acc.iter_mut().zip(x) {
            let xb = &xt[Q8_0_BYTES * b..Q8_0_BYTES * (b + 1)];
            let d = _mm256_set1_ps(dw * h(xb, 0));
            let q = mul_sum_us8(ax, _mm256_sign_epi8(load32(&xb[2..34]), qx));
            *a = _mm256_fmadd_ps(d, q, *a);
        }
    }
    [hsum8(acc[0]), hsum8(acc[1]), hsum8(acc[2]), hsum8(acc[3])]
}

/// Weight rows `rows` of `w` × all `n_tok` activation rows of `xq` (`qrow` bytes each),
/// into `out` at (token, row): one weight row against four tokens per step, each result
/// bit-identical to [`dot_rows`]'. `false` if `ty` has no tile.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]), and no other thread may write
/// the elements of `out` in `rows` meanwhile.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_tile(
    ty: GgmlType,
    w: &[u8],
    wrow: usize,
    (xq, qrow): (&[u8], usize),
    rows: std::ops::Range<usize>,
    out: TileOut,
) -> bool {
    let n_tok = xq.len() / qrow.max(1);
    if !has_tile(ty) || n_tok == 0 {
        return false;
    }
    let x = |t: usize| &xq[t * qrow..(t + 1) * qrow];
    for j in rows {
        let row = &w[j * wrow..(j + 1) * wrow];
        // SAFETY: this call owns row `j` (the caller's contract).
        let put = |t: usize, v: f32| unsafe { out.put(t, j, &[v]) };
        let mut t = 0;
        while t < n_tok {
            if n_tok - t >= 4 {
                let xs = [x(t), x(t + 1), x(t + 2), x(t + 3)];
                let v = match ty {
                    GgmlType::Q4_K => tile_q4_k::<4>(row, xs),
                    GgmlType::Q6_K => tile_q6_k::<4>(row, xs),
                    _ => tile4_q_0(ty, row, xs),
                };
                v.into_iter().enumerate().for_each(|(i, v)| put(t + i, v));
                t += 4;
            } else {
                put(
                    t,
                    match ty {
                        GgmlType::Q4_K => dot_q4_k(row, x(t)),
                        GgmlType::Q6_K => dot_q6_k(row, x(t)),
                        GgmlType::Q5_0 => dot_q5_0(row, x(t)),
                        _ => dot_q4_0(row, x(t)),
                    },
                );
                t += 1;
            }
        }
    }
    true
}

/// `quant::quantize_row` for Q8_0 and Q8_1 (`with_sum`), byte for byte, as ggml's AVX2
/// `quantize_row_q8_0/1`: the block's absolute maximum by lanes, `127 / max` as the
/// inverse, products rounded half to even by `vcvtps2dq`, packed to bytes; for Q8_1 the
/// scale times the exact integer sum.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_q8_0(x: &[f32], with_sum: bool, out: &mut Vec<u8>) {
    let sign = _mm256_set1_ps(-0.0);
    for block in x.chunks_exact(32) {
        // SAFETY: 32 floats are there (`chunks_exact`); unaligned loads.
        let v: [__m256; 4] =
            std::array::from_fn(|i| unsafe { _mm256_loadu_ps(block[8 * i..].as_ptr()) });
        let mut m = _mm256_andnot_ps(sign, v[0]);
        for &vi in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, vi));
        }
        let m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let q: [__m256i; 4] = std::array::from_fn(|i| _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id)));
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        if with_sum {
            let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let s4 = _mm_add_epi32(_mm256_extracti128_si256(s, 1), _mm256_castsi256_si128(s));
            let s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
            let sum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 1)));
            out.extend_from_slice(&half::f16::from_f32(d * sum as f32).to_le_bytes());
        }
        // Values are within -127..=127: the saturating packs are exact; the permute undoes
        // their lane interleaving.
        let p = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let mut qs = [0u8; 32];
        // SAFETY: 32 bytes into `qs`.
        unsafe { _mm256_storeu_si256(qs.as_mut_ptr().cast(), p) };
        out.extend_from_slice(&qs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::{self, Lcg};

    /// Token tiles give each (row, token) the portable result exactly.
    #[test]
    fn tiles_equal_the_portable_kernels() {
        if !available() {
            eprintln!("this CPU lacks AVX2/FMA/F16C: nothing to compare");
            return;
        }
        let mut rng = Lcg(4321);
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q5_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ] {
            assert!(has_tile(ty));
            for n_tok in [1usize, 4, 7] {
                let (w, wrow) = testdata::weights(&mut rng, ty, 3, 512);
                let (xq, qrow) = testdata::activations(&mut rng, ty, n_tok, 512);
                let mut out = vec![0f32; 3 * n_tok];
                let to = TileOut::new(&mut out, 3);
                // SAFETY: `available()` checked above; one thread.
                assert!(unsafe { dot_tile(ty, &w, wrow, (&xq, qrow), 1..3, to) });
                testdata::assert_tiles(ty, (&w, wrow), (&xq, qrow), 1..3, &out);
            }
        }
    }

    /// The AVX2 Q8_0/Q8_1 quantizer writes the portable code's bytes, ties and zero blocks
    /// included.
    #[test]
    fn quantizer_equals_the_portable_one() {
        if !available() {
            eprintln!("this CPU lacks AVX2/FMA/F16C: nothing to compare");
            return;
        }
        let mut rng = Lcg(17);
        for case in 0..40 {
            let mut x: Vec<f32> = (0..1024)
                .map(|_| (rng.next() % 20001) as f32 / 1000.0 - 10.0)
                .collect();
            if case % 3 == 1 {
                x[..256].fill(0.0);
            }
            if case % 3 == 2 {
                x.iter_mut().for_each(|v| *v = (*v * 2.0).round() / 2.0);
            }
            for with_sum in [false, true] {
                let (mut got, mut want) = (Vec::new(), Vec::new());
                // SAFETY: `available()` checked above.
                unsafe { quantize_q8_0(&x, with_sum, &mut got) };
                let kind = if with_sum {
                    crate::quant::VecDot::Q8_1
                } else {
                    crate::quant::VecDot::Q8_0
                };
                crate::quant::quantize_row_portable(kind, &x, &mut want);
                assert_eq!(got, want, "sum {with_sum}, case {case}");
            }
        }
    }

    /// Bit-identical to the portable kernels on random blocks and activations; seven rows
    /// exercise the four-row passes and their remainder.
    #[test]
    fn avx2_kernels_equal_the_portable_ones() {
        if !available() {
            eprintln!("this CPU lacks AVX2/FMA/F16C: nothing to compare");
            return;
        }
        let mut rng = Lcg(12345);
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ] {
            for _ in 0..20 {
                let (w, wrow) = testdata::weights(&mut rng, ty, 7, 512);
                let (xq, qrow) = testdata::activations(&mut rng, ty, 1, 512);
                let mut got = vec![0f32; 7];
                // SAFETY: `available()` checked above.
                assert!(unsafe { dot_rows(ty, &w, wrow, &xq, 0, &mut got) });
                testdata::assert_tiles(ty, (&w, wrow), (&xq, qrow), 0..got.len(), &got);
            }
        }
    }
}

/// Flash-attention helpers on f16 rows, the same arithmetic as `kernels`' portable code
/// lane for lane (ggml's F16C + FMA vector path): products of f16 are exact in f32, the
/// accumulator is rounded to f16 after every fused update.
pub mod fa {
    use std::arch::x86_64::*;

    use half::f16;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn load8(x: &[f16]) -> __m256 {
        assert!(x.len() >= 8);
        // SAFETY: 8 f16 (16 bytes) are there (checked); f16 is a transparent u16.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(x.as_ptr().cast()) })
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn store8(x: &mut [f16], v: __m256) {
        assert!(x.len() >= 8);
        let h = _mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(v);
        // SAFETY: room for 8 f16 (checked); unaligned store.
        unsafe { _mm_storeu_si128(x.as_mut_ptr().cast(), h) };
    }

    /// `kernels::dot_f16` for lengths that are multiples of 64.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C ([`super::available`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot(x: &[f16], y: &[f16]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 8]; // 4 accumulators × 16 lanes
        for i in (0..x.len() / 64).map(|i| i * 64) {
            for (k, a) in acc.iter_mut().enumerate() {
                let at = i + 8 * k;
                *a = _mm256_add_ps(*a, _mm256_mul_ps(load8(&x[at..]), load8(&y[at..])));
            }
        }
        // (0 + 2) + (1 + 3) per lane, lanes 0..8 and 8..16 separately.
        let lo = _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6]));
        let hi = _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7]));
        let t3 = _mm256_add_ps(hi, lo);
        let t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
        let mut t = [0f32; 4];
        // SAFETY: `t` holds four floats.
        unsafe { _mm_storeu_ps(t.as_mut_ptr(), t6) };
        (t[0] + t[2]) + (t[1] + t[3])
    }

    /// acc = f16(v · s + acc), fused, for lengths that are multiples of 8.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C ([`super::available`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn mad(acc: &mut [f16], v: &[f16], s: f32) {
        let vs = _mm256_set1_ps(s);
        for i in (0..acc.len() / 8).map(|i| i * 8) {
            let r = _mm256_fmadd_ps(load8(&v[i..]), vs, load8(&acc[i..]));
            store8(&mut acc[i..], r);
        }
    }

    /// acc = f16(acc · s), for lengths that are multiples of 8.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C ([`super::available`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn scale(acc: &mut [f16], s: f32) {
        let vs = _mm256_set1_ps(s);
        for i in (0..acc.len() / 8).map(|i| i * 8) {
            let r = _mm256_mul_ps(load8(&acc[i..]), vs);
            store8(&mut acc[i..], r);
        }
    }
}
