//! Block layouts of the quantized types and a scalar reference dequantizer for each.
//!
//! The formulas follow ggml's `ggml-quants.c` (`dequantize_row_*`); each is written to do
//! the same f32 operations in the same order, so results are bit-exact with ggml and with
//! gguf-py's numpy port (checked by `tests/dequant_reference.rs`). Speed is not the point
//! here: these are the reference the host's kernels are tested against.

mod blocks;

pub use blocks::*;

use crate::{GgmlType, GgufError, Result};
use half::{bf16, f16};

/// Elements per super-block of the K-quants.
pub const QK_K: usize = 256;

/// Dequantize `data` (whole blocks of `ty`) into `out`, which must hold exactly the
/// elements those blocks encode.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    let err = |reason: String| GgufError::Dequant { ty, reason };
    if !ty.is_supported() {
        return Err(err("no dequantizer for this type".into()));
    }
    let bs = ty.block_size() as usize;
    let ts = ty.type_size() as usize;
    if !data.len().is_multiple_of(ts) {
        return Err(err(format!(
            "{} bytes is not a whole number of {ts}-byte blocks",
            data.len()
        )));
    }
    let n_blocks = data.len() / ts;
    if n_blocks.checked_mul(bs) != Some(out.len()) {
        return Err(err(format!(
            "{n_blocks} blocks hold {} values but the output has room for {}",
            n_blocks.saturating_mul(bs),
            out.len()
        )));
    }
    let blocks = data.chunks_exact(ts).zip(out.chunks_exact_mut(bs));
    match ty {
        GgmlType::F32 => {
            blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::BF16 => {
            blocks.for_each(|(b, y)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32())
        }
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| BlockQ4_0::parse(b).dequantize(y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| BlockQ4_1::parse(b).dequantize(y)),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| BlockQ5_0::parse(b).dequantize(y)),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| BlockQ5_1::parse(b).dequantize(y)),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| BlockQ8_0::parse(b).dequantize(y)),
        GgmlType::Q8_1 => blocks.for_each(|(b, y)| BlockQ8_1::parse(b).dequantize(y)),
        GgmlType::Q2_K => blocks.for_each(|(b, y)| BlockQ2K::parse(b).dequantize(y)),
        GgmlType::Q3_K => blocks.for_each(|(b, y)| BlockQ3K::parse(b).dequantize(y)),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| BlockQ4K::parse(b).dequantize(y)),
        GgmlType::Q5_K => blocks.for_each(|(b, y)| BlockQ5K::parse(b).dequantize(y)),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| BlockQ6K::parse(b).dequantize(y)),
        GgmlType::Q8_K => blocks.for_each(|(b, y)| BlockQ8K::parse(b).dequantize(y)),
        _ => return Err(err("no dequantizer for this type".into())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_partial_blocks_and_wrong_output_sizes() {
        let mut out = vec![0f32; 32];
        assert!(dequantize(GgmlType::Q4_0, &[0u8; 17], &mut out).is_err());
        assert!(dequantize(GgmlType::Q4_0, &[0u8; 36], &mut out).is_err());
        assert!(dequantize(GgmlType::IQ2_XXS, &[0u8; 66], &mut vec![0f32; 256]).is_err());
        dequantize(GgmlType::Q4_0, &[0u8; 18], &mut out).expect("one block");
    }

    #[test]
    fn q4_0_known_block() {
        // d = 1.0 (f16 0x3c00); nibbles 0..15 in the low halves, 15..0 in the high halves.
        let mut b = vec![0x00, 0x3c];
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut y = [0f32; 32];
        dequantize(GgmlType::Q4_0, &b, &mut y).expect("one block");
        for j in 0..16 {
            assert_eq!(y[j], j as f32 - 8.0);
            assert_eq!(y[j + 16], (15 - j) as f32 - 8.0);
        }
    }
}
