//! e^x and tanh of an f32 rounded once from the f64 functions: the correctly rounded result
//! but in rare double-rounding cases (fewer than 1 in 2^28 arguments), whatever the C
//! library (glibc's, musl's, the WebAssembly build's own) or device (the CUDA backend
//! computes them the same way). ggml-cpu calls the C library's `expf` (attention's softmax
//! factors) and `tanhf` (the GELU table, soft caps), whose last bits differ between
//! libraries and versions: glibc 2.36's `expf` misses the correctly rounded value for about
//! 0.04 % of arguments in [-100, 0), its `tanhf` for about a quarter in [0.001, 10]. On a
//! host whose C library rounds them correctly these are ggml's. RoPE's angles still take the
//! C library's `cosf`/`sinf`/`powf`/`logf`, as ggml-cpu (`RopeParams::angles` says why).

/// e^x.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    f64::from(x).exp() as f32
}

/// tanh x.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    f64::from(x).tanh() as f32
}

#[cfg(test)]
mod tests {
    /// Arguments where glibc 2.36's f32 functions give a neighbouring float; the expected
    /// bits are the nearest floats to the exact values (computed with 60-digit decimals).
    #[test]
    fn correctly_rounded_where_glibc_2_36s_are_not() {
        let (x, want) = (f32::from_bits(0xb96a_aeb9), 0x3f7f_f155);
        assert_eq!(super::exp(x).to_bits(), want, "e^{x}");
        let (x, want) = (f32::from_bits(0x3a83_12d0), 0x3a83_12cd);
        assert_eq!(super::tanh(x).to_bits(), want, "tanh {x}");
        // The ends: e^-inf is 0, large arguments saturate.
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(100.0), f32::INFINITY);
        assert_eq!(super::tanh(20.0), 1.0);
    }
}
