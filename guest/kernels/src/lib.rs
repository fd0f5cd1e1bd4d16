//! Realm's compute kernels, in ggml's numerics (see each module).
//!
//! Pure code over slices: the native host provider runs them on its threads over mapped
//! weights, and the WebAssembly compute provider (`adapters/compute-wasm`) over weights in
//! its own memory. On x86-64 the SIMD families are picked at run time; everywhere else,
//! and below AVX2, the portable code runs. Every SIMD kernel is tested bit for bit
//! against the portable one.

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
pub mod kernels;
pub mod quant;
#[cfg(test)]
mod testdata;
