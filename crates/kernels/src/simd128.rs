//! WebAssembly SIMD128 parts of the portable kernels (built when the target enables
//! `simd128`, as `.cargo/config.toml` does for wasm32-wasip2). They compute the scalar
//! code's results exactly: the integer sums are exact in any order, and the fused
//! multiply-adds are done in f64 (exact product, one rounding) with the rare cases that
//! could round twice sent to libm, as `crate::fma` does. `quant`'s and this module's tests
//! run on this code under wasm.

use std::arch::wasm32::*;

/// 32 bytes as two registers.
#[inline(always)]
fn load32(b: &[u8]) -> (v128, v128) {
    assert!(b.len() >= 32);
    // SAFETY: 32 bytes are there (checked); unaligned loads.
    unsafe {
        (
            v128_load(b.as_ptr().cast()),
            v128_load(b.as_ptr().add(16).cast()),
        )
    }
}

/// The eight lane sums of ggml's AVX2 kernels as two i32x4: lane `l` is `Σ q[k]·y[k]` over
/// `k` in `4l..4l + 4`, for the 32 signed quants in `(q0, q1)` and 32 signed bytes of `y`.
#[inline(always)]
pub fn lane_sums_v(q0: v128, q1: v128, y: &[u8]) -> (v128, v128) {
    let (y0, y1) = load32(y);
    // Pairs of products in i32 (exact: |q·y| ≤ 128·128), eight values per vector.
    let dot = |a: v128, b: v128| {
        (
            i32x4_dot_i16x8(i16x8_extend_low_i8x16(a), i16x8_extend_low_i8x16(b)),
            i32x4_dot_i16x8(i16x8_extend_high_i8x16(a), i16x8_extend_high_i8x16(b)),
        )
    };
    let (p0, p1) = dot(q0, y0);
    let (p2, p3) = dot(q1, y1);
    // Adjacent pairs → sums of four.
    let quad = |a: v128, b: v128| {
        i32x4_add(
            i32x4_shuffle::<0, 2, 4, 6>(a, b),
            i32x4_shuffle::<1, 3, 5, 7>(a, b),
        )
    };
    (quad(p0, p1), quad(p2, p3))
}

/// `quant::lane_sums` for quants already in an array.
#[inline(always)]
pub fn lane_sums(q: &[i8; 32], y: &[u8]) -> [i32; 8] {
    // SAFETY: 32 bytes (by type); unaligned loads.
    let (q0, q1) = unsafe {
        (
            v128_load(q.as_ptr().cast()),
            v128_load(q.as_ptr().add(16).cast()),
        )
    };
    let (lo, hi) = lane_sums_v(q0, q1, y);
    let mut out = [0i32; 8];
    // SAFETY: 8 i32 of room; unaligned stores.
    unsafe {
        v128_store(out.as_mut_ptr().cast(), lo);
        v128_store(out.as_mut_ptr().add(4).cast(), hi);
    }
    out
}

/// `acc[l] = fma(d, s[l] as f32, acc[l])` for four lanes, each exactly `crate::fma`'s
/// result: `d · s` is exact in f64 (24-bit × at most 23-bit integers), the f64 sum rounds
/// once, and converting to f32 is the fused result unless that sum lies exactly halfway
/// between two f32 or is tiny, in which case the lanes go through `crate::fma`.
#[inline(always)]
pub fn fma4(d: f32, s: v128, acc: v128) -> v128 {
    let dd = f64x2_splat(f64::from(d));
    let (s_lo, s_hi) = (
        f64x2_convert_low_i32x4(s),
        f64x2_convert_low_i32x4(i32x4_shuffle::<2, 3, 0, 1>(s, s)),
    );
    let (a_lo, a_hi) = (
        f64x2_promote_low_f32x4(acc),
        f64x2_promote_low_f32x4(i32x4_shuffle::<2, 3, 0, 1>(acc, acc)),
    );
    let (r_lo, r_hi) = (
        f64x2_add(f64x2_mul(dd, s_lo), a_lo),
        f64x2_add(f64x2_mul(dd, s_hi), a_hi),
    );
    let risky = |r: v128| {
        let halfway = i64x2_eq(
            v128_and(r, i64x2_splat(0x1fff_ffff)),
            i64x2_splat(0x1000_0000),
        );
        let tiny = f64x2_lt(f64x2_abs(r), f64x2_splat(f64::from(f32::MIN_POSITIVE)));
        v128_or(halfway, tiny)
    };
    if v128_any_true(v128_or(risky(r_lo), risky(r_hi))) {
        let (mut a, mut v) = ([0f32; 4], [0i32; 4]);
        // SAFETY: four lanes of room each; unaligned stores.
        unsafe {
            v128_store(a.as_mut_ptr().cast(), acc);
            v128_store(v.as_mut_ptr().cast(), s);
        }
        let r: [f32; 4] = std::array::from_fn(|l| crate::fma(d, v[l] as f32, a[l]));
        // SAFETY: four floats; unaligned load.
        return unsafe { v128_load(r.as_ptr().cast()) };
    }
    i32x4_shuffle::<0, 1, 4, 5>(f32x4_demote_f64x2_zero(r_lo), f32x4_demote_f64x2_zero(r_hi))
}

/// The fifth bits of a Q5 block for 16 quants: bit `j` of `bits` (j < 16) as 0x10 in byte
/// `j`.
#[inline(always)]
fn fifth_bits(bits: u16) -> v128 {
    let v = u16x8_splat(bits);
    let bytes = i8x16_swizzle(v, u8x16(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
    let mask = u8x16(1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128);
    v128_and(
        i8x16_ne(v128_and(bytes, mask), u8x16_splat(0)),
        u8x16_splat(0x10),
    )
}

/// A weight block's 32 quants as two i8x16 (the scalar unpackers' values), for the
/// Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 layouts; `at` is where the quants start in the block.
#[inline(always)]
pub fn unpack(ty: realm_gguf::GgmlType, b: &[u8]) -> (v128, v128) {
    use realm_gguf::GgmlType as T;
    let nibbles = |at: usize| {
        assert!(b.len() >= at + 16);
        // SAFETY: 16 bytes at `at` (checked); unaligned load.
        let v = unsafe { v128_load(b.as_ptr().add(at).cast()) };
        (v128_and(v, u8x16_splat(0x0F)), u8x16_shr(v, 4))
    };
    match ty {
        T::Q4_0 => {
            let (lo, hi) = nibbles(2);
            (i8x16_sub(lo, i8x16_splat(8)), i8x16_sub(hi, i8x16_splat(8)))
        }
        T::Q4_1 => nibbles(4),
        T::Q5_0 | T::Q5_1 => {
            let (qh_at, q_at, off) = if ty == T::Q5_0 { (2, 6, 16) } else { (4, 8, 0) };
            let qh = u32::from_le_bytes([b[qh_at], b[qh_at + 1], b[qh_at + 2], b[qh_at + 3]]);
            let (lo, hi) = nibbles(q_at);
            let lo = v128_or(lo, fifth_bits(qh as u16));
            let hi = v128_or(hi, fifth_bits((qh >> 16) as u16));
            (
                i8x16_sub(lo, i8x16_splat(off)),
                i8x16_sub(hi, i8x16_splat(off)),
            )
        }
        _ => load32(&b[2..34]),
    }
}

#[cfg(test)]
mod tests {
    use std::arch::wasm32::*;

    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    /// The SIMD lane sums equal the scalar definition on random bytes, extremes included.
    #[test]
    fn lane_sums_equal_the_scalar_ones() {
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        for case in 0..20_000 {
            let mut q = [0i8; 32];
            let mut y = [0u8; 32];
            for k in 0..32 {
                let r = xorshift(&mut s);
                q[k] = if case % 3 == 0 { -128 } else { r as i8 };
                y[k] = if case % 5 == 0 { 0x80 } else { (r >> 8) as u8 };
            }
            let want: [i32; 8] = std::array::from_fn(|l| {
                (4 * l..4 * l + 4)
                    .map(|k| i32::from(q[k]) * i32::from(y[k] as i8))
                    .sum()
            });
            assert_eq!(super::lane_sums(&q, &y), want);
        }
    }

    /// Four-lane FMA equals the scalar `crate::fma` (itself checked against libm), on
    /// random values and on sums built to land halfway between two f32.
    #[test]
    fn fma4_equals_the_scalar_fma() {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        for case in 0..100_000 {
            let r = xorshift(&mut s);
            let d = f32::from_bits((r as u32 & 0x807F_FFFF) | ((r >> 40) as u32 % 40 + 100) << 23);
            let v: [i32; 4] =
                std::array::from_fn(|_| (xorshift(&mut s) % 4_000_001) as i32 - 2_000_000);
            let mut a: [f32; 4] = std::array::from_fn(|_| {
                let r = xorshift(&mut s);
                f32::from_bits((r as u32 & 0x807F_FFFF) | ((r >> 40) as u32 % 40 + 100) << 23)
            });
            if case % 7 == 0 {
                // d·v + a exactly halfway: a = 1, d·v = 2^-24 · odd-ish.
                a[0] = 1.0;
                let d = f32::EPSILON / 2.0;
                let got = super::fma4(d, i32x4(1, 3, 5, 7), f32x4(1.0, 1.0, 1.0, 1.0));
                let mut out = [0f32; 4];
                // SAFETY: four floats of room.
                unsafe { v128_store(out.as_mut_ptr().cast(), got) };
                for (l, m) in [1, 3, 5, 7].into_iter().enumerate() {
                    assert_eq!(out[l].to_bits(), crate::fma(d, m as f32, 1.0).to_bits());
                }
            }
            let got = super::fma4(
                d,
                i32x4(v[0], v[1], v[2], v[3]),
                f32x4(a[0], a[1], a[2], a[3]),
            );
            let mut out = [0f32; 4];
            // SAFETY: four floats of room.
            unsafe { v128_store(out.as_mut_ptr().cast(), got) };
            for l in 0..4 {
                let want = crate::fma(d, v[l] as f32, a[l]);
                assert_eq!(out[l].to_bits(), want.to_bits(), "{d} {} {}", v[l], a[l]);
            }
        }
    }
}
