//! Weights with random quants for benchmarks and tests: every f16 scale a small normal
//! number, so products are finite.

use realm_gguf::GgmlType;

/// `rows` × `k` weights of `ty` (one of Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K), seeded.
pub fn weights(ty: GgmlType, k: usize, rows: usize, seed: u64) -> Vec<u8> {
    let row = ty.row_bytes(k as u64).unwrap_or(0) as usize;
    let block = row / (k / ty.block_size() as usize).max(1);
    let mut s = seed | 1;
    let mut bytes: Vec<u8> = (0..row * rows)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect();
    // Where each type keeps its f16 scales (d, and dmin or m where it has one).
    let halves: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => &[],
    };
    for b in bytes.chunks_exact_mut(block.max(1)) {
        for &at in halves {
            b[at..at + 2].copy_from_slice(&0x2000u16.to_le_bytes());
        }
    }
    bytes
}
