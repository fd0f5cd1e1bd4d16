//! Realm's compute kernels, in ggml's numerics (see each module).
//!
//! Pure code over slices, and [`cpu::CpuBackend`], the `realm-compute` backend that runs
//! them: the native host provider on its threads over mapped weights, the WebAssembly
//! compute provider (`adapters/compute-wasm`) on one over weights in its own memory. On
//! x86-64 the SIMD families are picked at run time (`cpu.rs`); everywhere else, and below
//! AVX2, the portable code runs. Every SIMD kernel is tested bit for bit against the
//! portable one.

#[cfg(target_arch = "x86_64")]
pub mod amx;
#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
pub mod batch;
pub mod cpu;
pub mod kernels;
pub mod pool;
pub mod quant;
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd128;
#[doc(hidden)]
pub mod synthetic;
#[cfg(all(test, target_arch = "x86_64"))]
mod testdata;

/// `a·b + c` with one rounding (ggml's FMA). Native targets use the FMA instruction or libm.
/// WebAssembly has no scalar fused multiply-add, and libm's `fmaf` is a call per use (it
/// was 45 % of a token in the WebAssembly provider), so there it is inlined: the f64
/// product of two f32 is exact and the f64 sum is rounded once, so converting that to f32
/// is the fused result, except when the f64 sum lands exactly halfway between two f32
/// (or is tiny), where libm's `fmaf` decides. This is musl's `fmaf` algorithm.
#[inline(always)]
pub fn fma(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(target_arch = "wasm32")]
    {
        let (xy, z) = (f64::from(a) * f64::from(b), f64::from(c));
        let r = xy + z;
        let halfway = r.to_bits() & 0x1fff_ffff == 0x1000_0000;
        let tiny = r.abs() < f64::from(f32::MIN_POSITIVE);
        if r.is_nan() || (!halfway && !tiny) || (!tiny && r - xy == z && r - z == xy) {
            return r as f32;
        }
        a.mul_add(b, c)
    }
    #[cfg(not(target_arch = "wasm32"))]
    a.mul_add(b, c)
}

#[cfg(test)]
mod tests {
    /// The inlined FMA is the fused result, halfway and tiny cases included (natively it is
    /// `mul_add` itself; `cargo test --target wasm32-wasip2` exercises the inline path).
    #[test]
    fn fma_is_fused() {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            f32::from_bits((s as u32 & 0x807F_FFFF) | (((s >> 40) as u32 % 60 + 97) << 23))
        };
        for _ in 0..200_000 {
            let (a, b, c) = (next(), next(), next());
            assert_eq!(
                super::fma(a, b, c).to_bits(),
                a.mul_add(b, c).to_bits(),
                "{a} {b} {c}"
            );
        }
        // Exactly halfway after the f64 rounding: 1 + 2^-24 + 2^-60 style cases.
        let (a, b, c) = (1.0 + f32::EPSILON, 1.0 + f32::EPSILON, -1.0f32);
        assert_eq!(super::fma(a, b, c).to_bits(), a.mul_add(b, c).to_bits());
        let tiny = f32::from_bits(1);
        assert_eq!(
            super::fma(tiny, 0.5, tiny).to_bits(),
            tiny.mul_add(0.5, tiny).to_bits()
        );
    }
}
