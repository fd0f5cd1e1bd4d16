//! Quantized matmul with ggml's numerics: each activation row is quantized to the weight
//! type's dot-product partner (Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1) exactly as
//! ggml's x86 `quantize_row_q8_*` does, then multiplied block by block in integers
//! (ggml-cpu `ggml_vec_dot_*`). Scalar for now; SIMD kernels come with the performance
//! work, each checked against these.

use half::f16;
use realm_gguf::GgmlType;

/// Bytes of one Q8_0 block: f16 scale + 32 × i8.
pub const Q8_0_BYTES: usize = 34;
/// Bytes of one Q8_1 block: f16 scale, f16 (scale × sum), 32 × i8.
pub const Q8_1_BYTES: usize = 36;

/// The activation format a weight type multiplies against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VecDot {
    Q8_0,
    Q8_1,
}

impl VecDot {
    pub fn for_weight(ty: GgmlType) -> Option<Self> {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => Some(VecDot::Q8_0),
            GgmlType::Q4_1 | GgmlType::Q5_1 => Some(VecDot::Q8_1),
            _ => None,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            VecDot::Q8_0 => Q8_0_BYTES,
            VecDot::Q8_1 => Q8_1_BYTES,
        }
    }
}

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Quantize one row (a multiple of 32 values) into `out`, ggml's AVX2 way: scale from the
/// block's absolute maximum, `127 / max` as the inverse, round half to even.
pub fn quantize_row(kind: VecDot, x: &[f32], out: &mut Vec<u8>) {
    out.clear();
    for block in x.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut qs = [0i8; 32];
        let mut sum = 0i32;
        for (q, &v) in qs.iter_mut().zip(block) {
            *q = (v * id).round_ties_even() as i8;
            sum += i32::from(*q);
        }
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        if kind == VecDot::Q8_1 {
            out.extend_from_slice(&f16::from_f32(d * sum as f32).to_le_bytes());
        }
        out.extend(qs.iter().map(|&q| q as u8));
    }
}

/// Dot product of one weight row (`w`, whole blocks of `ty`) with one quantized activation
/// row (`x`, from [`quantize_row`] with `VecDot::for_weight(ty)`).
pub fn dot(ty: GgmlType, w: &[u8], x: &[u8]) -> f32 {
    match ty {
        GgmlType::Q4_0 => dot_q4_0(w, x),
        GgmlType::Q4_1 => dot_q4_1(w, x),
        GgmlType::Q5_0 => dot_q5_0(w, x),
        GgmlType::Q5_1 => dot_q5_1(w, x),
        GgmlType::Q8_0 => dot_q8_0(w, x),
        _ => 0.0,
    }
}

fn i8s(b: &[u8]) -> impl Iterator<Item = i32> + '_ {
    b.iter().map(|&v| i32::from(v as i8))
}

fn dot_q4_0(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (wb, xb) in w.chunks_exact(18).zip(x.chunks_exact(Q8_0_BYTES)) {
        let (qs, ys) = (&wb[2..18], &xb[2..34]);
        let mut sumi = 0i32;
        for (j, y) in i8s(&ys[..16]).enumerate() {
            sumi += (i32::from(qs[j] & 0x0F) - 8) * y;
        }
        for (j, y) in i8s(&ys[16..]).enumerate() {
            sumi += (i32::from(qs[j] >> 4) - 8) * y;
        }
        sumf += sumi as f32 * (h(wb, 0) * h(xb, 0));
    }
    sumf
}

fn dot_q4_1(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (wb, xb) in w.chunks_exact(20).zip(x.chunks_exact(Q8_1_BYTES)) {
        let (qs, ys) = (&wb[4..20], &xb[4..36]);
        let mut sumi = 0i32;
        for (j, y) in i8s(&ys[..16]).enumerate() {
            sumi += i32::from(qs[j] & 0x0F) * y;
        }
        for (j, y) in i8s(&ys[16..]).enumerate() {
            sumi += i32::from(qs[j] >> 4) * y;
        }
        sumf += (h(wb, 0) * h(xb, 0)) * sumi as f32 + h(wb, 2) * h(xb, 2);
    }
    sumf
}

fn q5_high(qh: u32, j: usize) -> (i32, i32) {
    (
        (((qh >> j) << 4) & 0x10) as i32,
        ((qh >> (j + 12)) & 0x10) as i32,
    )
}

fn dot_q5_0(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (wb, xb) in w.chunks_exact(22).zip(x.chunks_exact(Q8_0_BYTES)) {
        let qh = u32::from_le_bytes([wb[2], wb[3], wb[4], wb[5]]);
        let (qs, ys) = (&wb[6..22], &xb[2..34]);
        let mut sumi = 0i32;
        for j in 0..16 {
            let (h0, h1) = q5_high(qh, j);
            let x0 = (i32::from(qs[j] & 0x0F) | h0) - 16;
            let x1 = (i32::from(qs[j] >> 4) | h1) - 16;
            sumi += x0 * i32::from(ys[j] as i8) + x1 * i32::from(ys[j + 16] as i8);
        }
        sumf += sumi as f32 * (h(wb, 0) * h(xb, 0));
    }
    sumf
}

fn dot_q5_1(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (wb, xb) in w.chunks_exact(24).zip(x.chunks_exact(Q8_1_BYTES)) {
        let qh = u32::from_le_bytes([wb[4], wb[5], wb[6], wb[7]]);
        let (qs, ys) = (&wb[8..24], &xb[4..36]);
        let mut sumi = 0i32;
        for j in 0..16 {
            let (h0, h1) = q5_high(qh, j);
            let x0 = i32::from(qs[j] & 0x0F) | h0;
            let x1 = i32::from(qs[j] >> 4) | h1;
            sumi += x0 * i32::from(ys[j] as i8) + x1 * i32::from(ys[j + 16] as i8);
        }
        sumf += (h(wb, 0) * h(xb, 0)) * sumi as f32 + h(wb, 2) * h(xb, 2);
    }
    sumf
}

fn dot_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (wb, xb) in w.chunks_exact(34).zip(x.chunks_exact(Q8_0_BYTES)) {
        let sumi: i32 = i8s(&wb[2..34])
            .zip(i8s(&xb[2..34]))
            .map(|(a, b)| a * b)
            .sum();
        sumf += sumi as f32 * (h(wb, 0) * h(xb, 0));
    }
    sumf
}

#[cfg(test)]
mod tests {
    use super::*;
    use realm_gguf::quant::dequantize;

    /// A deterministic pseudo-random stream for test data.
    fn noise(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn random_blocks(ty: GgmlType, n_blocks: usize, seed: u64) -> Vec<u8> {
        let mut bytes: Vec<u8> = noise(seed, n_blocks * ty.type_size() as usize)
            .iter()
            .map(|v| ((v + 1.0) * 127.5) as u8)
            .collect();
        // Sane f16 scales (and mins) in each block.
        let ts = ty.type_size() as usize;
        let scales: &[usize] = match ty {
            GgmlType::Q4_1 | GgmlType::Q5_1 => &[0, 2],
            _ => &[0],
        };
        for b in 0..n_blocks {
            for &at in scales {
                let v =
                    f16::from_f32(0.01 + 0.02 * (b % 7) as f32 - if at == 2 { 0.05 } else { 0.0 });
                bytes[b * ts + at..b * ts + at + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        bytes
    }

    /// Each kernel agrees with (reference dequantizer × f32 dot) within the error that
    /// quantizing the activations to 8 bits allows.
    #[test]
    fn kernels_match_the_reference_dequantizer() {
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
        ] {
            for seed in 0..20 {
                let n = 256;
                let w = random_blocks(ty, n / 32, seed);
                let x = noise(seed + 100, n);
                let mut wf = vec![0f32; n];
                dequantize(ty, &w, &mut wf).expect("dequantize");
                let want: f64 = wf
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum();
                let mut xq = Vec::new();
                quantize_row(VecDot::for_weight(ty).expect("vec dot"), &x, &mut xq);
                let got = dot(ty, &w, &xq);
                // 8-bit activations: error ≤ Σ|w| · max|x| / 254 per block, plus rounding.
                let budget: f64 =
                    wf.iter().map(|v| f64::from(v.abs())).sum::<f64>() / 254.0 * 1.05 + 1e-4;
                assert!(
                    (f64::from(got) - want).abs() <= budget,
                    "{ty} seed {seed}: {got} vs {want} (budget {budget})"
                );
            }
        }
    }

    #[test]
    fn q8_1_sum_is_scaled_before_rounding_to_f16() {
        let x: Vec<f32> = (0..32).map(|i| i as f32 * 0.5).collect();
        let mut q = Vec::new();
        quantize_row(VecDot::Q8_1, &x, &mut q);
        let d = h(&q, 0);
        let s = h(&q, 2);
        let sum: i32 = q[4..].iter().map(|&v| i32::from(v as i8)).sum();
        assert_eq!(s, f16::from_f32(d * sum as f32).to_f32());
        assert_eq!(q[4 + 31] as i8, 127);
    }
}
