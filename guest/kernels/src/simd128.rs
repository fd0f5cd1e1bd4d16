//! WebAssembly SIMD128 parts of the portable kernels (built when the target enables
//! `simd128`, as `.cargo/config.toml` does for wasm32-wasip2): integer sums only, so the
//! results are the scalar code's exactly; `quant`'s tests run on this code under wasm.

use std::arch::wasm32::*;

/// `quant::lane_sums`: lane `l` is `Σ q[k]·y[k]` over `k` in `4l..4l + 4`.
#[inline(always)]
pub fn lane_sums(q: &[i8; 32], y: &[u8]) -> [i32; 8] {
    assert!(y.len() >= 32);
    // SAFETY: 32 bytes in each (`q` by type, `y` checked); unaligned loads.
    let (q0, q1, y0, y1) = unsafe {
        (
            v128_load(q.as_ptr().cast()),
            v128_load(q.as_ptr().add(16).cast()),
            v128_load(y.as_ptr().cast()),
            v128_load(y.as_ptr().add(16).cast()),
        )
    };
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
    let (lo, hi) = (quad(p0, p1), quad(p2, p3));
    [
        i32x4_extract_lane::<0>(lo),
        i32x4_extract_lane::<1>(lo),
        i32x4_extract_lane::<2>(lo),
        i32x4_extract_lane::<3>(lo),
        i32x4_extract_lane::<0>(hi),
        i32x4_extract_lane::<1>(hi),
        i32x4_extract_lane::<2>(hi),
        i32x4_extract_lane::<3>(hi),
    ]
}

#[cfg(test)]
mod tests {
    /// The SIMD lane sums equal the scalar definition on random bytes, extremes included.
    #[test]
    fn lane_sums_equal_the_scalar_ones() {
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        for case in 0..20_000 {
            let mut q = [0i8; 32];
            let mut y = [0u8; 32];
            for k in 0..32 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                q[k] = if case % 3 == 0 { -128 } else { s as i8 };
                y[k] = if case % 5 == 0 { 0x80 } else { (s >> 8) as u8 };
            }
            let want: [i32; 8] = std::array::from_fn(|l| {
                (4 * l..4 * l + 4)
                    .map(|k| i32::from(q[k]) * i32::from(y[k] as i8))
                    .sum()
            });
            assert_eq!(super::lane_sums(&q, &y), want);
        }
    }
}
