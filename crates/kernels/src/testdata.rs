//! Random quantized weights and activations for the kernel tests, and the check every
//! SIMD kernel must pass: bit-identical to the portable `quant::dot`.

use realm_gguf::GgmlType;

use super::quant::{self, VecDot};

/// A small deterministic generator (64-bit LCG, high bits).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    fn small_f16(&mut self) -> [u8; 2] {
        half::f16::from_f32((self.next() % 1000) as f32 / 40000.0 - 0.0125).to_le_bytes()
    }
}

/// `rows` rows of `k` values of `ty`: random quants with small, finite f16 scales (and
/// mins, for the types that have them) where the block format keeps them.
pub fn weights(rng: &mut Lcg, ty: GgmlType, rows: usize, k: usize) -> (Vec<u8>, usize) {
    let (ts, bs) = (ty.type_size() as usize, ty.block_size() as usize);
    let wrow = k / bs * ts;
    let mut w: Vec<u8> = (0..rows * wrow).map(|_| rng.next() as u8).collect();
    for b in 0..rows * k / bs {
        let at = b * ts + if ty == GgmlType::Q6_K { 208 } else { 0 };
        let d = rng.small_f16();
        w[at..at + 2].copy_from_slice(&d);
        if matches!(ty, GgmlType::Q4_1 | GgmlType::Q4_K) {
            let m = rng.small_f16();
            w[at + 2..at + 4].copy_from_slice(&m);
        }
    }
    (w, wrow)
}

/// `n_tok` activation rows of `k` values in [-10, 10), quantized for `ty`'s kernel.
pub fn activations(rng: &mut Lcg, ty: GgmlType, n_tok: usize, k: usize) -> (Vec<u8>, usize) {
    let kind = VecDot::for_weight(ty).expect("a type with an integer kernel");
    let mut xq = Vec::new();
    for _ in 0..n_tok {
        let xs: Vec<f32> = (0..k)
            .map(|_| (rng.next() % 2000) as f32 / 100.0 - 10.0)
            .collect();
        quant::quantize_row(kind, &xs, &mut xq);
    }
    let qrow = xq.len() / n_tok.max(1);
    (xq, qrow)
}

/// `out[t * ld + j]` (token `t`, weight row `j` in `rows`; `ld = out.len() / n_tok`) must
/// equal the portable kernel's result bit for bit.
pub fn assert_tiles(
    ty: GgmlType,
    (w, wrow): (&[u8], usize),
    (xq, qrow): (&[u8], usize),
    rows: std::ops::Range<usize>,
    out: &[f32],
) {
    let n_tok = xq.len() / qrow;
    let ld = out.len() / n_tok;
    for t in 0..n_tok {
        for j in rows.clone() {
            let got = out[t * ld + j];
            let want = quant::dot(
                ty,
                &w[j * wrow..(j + 1) * wrow],
                &xq[t * qrow..(t + 1) * qrow],
            );
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{ty} row {j} token {t}: {got} vs {want}"
            );
        }
    }
}
