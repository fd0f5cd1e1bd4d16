//! One struct per block type, with the byte layout of ggml's `ggml-common.h`.
//!
//! Fields are parsed from bytes rather than cast, so no alignment or `unsafe` is needed;
//! the size assertions pin each layout to ggml's.

#![allow(
    clippy::needless_range_loop,
    reason = "indexed loops mirror ggml's reference code line for line"
)]

use half::f16;

use super::QK_K;

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn arr<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

/// `d * (q - 8)`, 4-bit, 32 per block.
#[derive(Debug, Clone, Copy)]
pub struct BlockQ4_0 {
    pub d: f32,
    pub qs: [u8; 16],
}
pub const Q4_0_BYTES: usize = 2 + 16;

/// `d * q + m`, 4-bit, 32 per block.
#[derive(Debug, Clone, Copy)]
pub struct BlockQ4_1 {
    pub d: f32,
    pub m: f32,
    pub qs: [u8; 16],
}
pub const Q4_1_BYTES: usize = 2 + 2 + 16;

/// `d * (q - 16)`, 5-bit (fifth bits in `qh`), 32 per block.
#[derive(Debug, Clone, Copy)]
pub struct BlockQ5_0 {
    pub d: f32,
    pub qh: u32,
    pub qs: [u8; 16],
}
pub const Q5_0_BYTES: usize = 2 + 4 + 16;

/// `d * q + m`, 5-bit, 32 per block.
#[derive(Debug, Clone, Copy)]
pub struct BlockQ5_1 {
    pub d: f32,
    pub m: f32,
    pub qh: u32,
    pub qs: [u8; 16],
}
pub const Q5_1_BYTES: usize = 2 + 2 + 4 + 16;

/// `d * q`, 8-bit, 32 per block.
#[derive(Debug, Clone, Copy)]
pub struct BlockQ8_0 {
    pub d: f32,
    pub qs: [i8; 32],
}
pub const Q8_0_BYTES: usize = 2 + 32;

/// `d * q` with `s = d * sum(q)` kept for the Q4_1/Q5_1 dot products.
#[derive(Debug, Clone, Copy)]
pub struct BlockQ8_1 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; 32],
}
pub const Q8_1_BYTES: usize = 2 + 2 + 32;

/// 2-bit K-quant: 16 sub-blocks of 16 with 4-bit scale and min each.
#[derive(Debug, Clone, Copy)]
pub struct BlockQ2K {
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    pub d: f32,
    pub dmin: f32,
}
pub const Q2_K_BYTES: usize = QK_K / 16 + QK_K / 4 + 2 + 2;

/// 3-bit K-quant: high bits in `hmask`, 16 six-bit scales packed in 12 bytes.
#[derive(Debug, Clone, Copy)]
pub struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    pub scales: [u8; 12],
    pub d: f32,
}
pub const Q3_K_BYTES: usize = QK_K / 8 + QK_K / 4 + 12 + 2;

/// 4-bit K-quant: 8 sub-blocks of 32 with six-bit scale and min.
#[derive(Debug, Clone, Copy)]
pub struct BlockQ4K {
    pub d: f32,
    pub dmin: f32,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}
pub const Q4_K_BYTES: usize = 2 + 2 + 12 + QK_K / 2;

/// 5-bit K-quant: as Q4_K plus a fifth bit per value in `qh`.
#[derive(Debug, Clone, Copy)]
pub struct BlockQ5K {
    pub d: f32,
    pub dmin: f32,
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}
pub const Q5_K_BYTES: usize = 2 + 2 + 12 + QK_K / 8 + QK_K / 2;

/// 6-bit K-quant: low 4 bits in `ql`, high 2 in `qh`, 16 signed 8-bit scales.
#[derive(Debug, Clone, Copy)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f32,
}
pub const Q6_K_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;

/// 8-bit K-quant (activations for K-quant dot products): f32 scale, sums per 16.
#[derive(Debug, Clone, Copy)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}
pub const Q8_K_BYTES: usize = 4 + QK_K + 2 * (QK_K / 16);

const _: () = assert!(Q4_0_BYTES == 18);
const _: () = assert!(Q4_1_BYTES == 20);
const _: () = assert!(Q5_0_BYTES == 22);
const _: () = assert!(Q5_1_BYTES == 24);
const _: () = assert!(Q8_0_BYTES == 34);
const _: () = assert!(Q8_1_BYTES == 36);
const _: () = assert!(Q2_K_BYTES == 84);
const _: () = assert!(Q3_K_BYTES == 110);
const _: () = assert!(Q4_K_BYTES == 144);
const _: () = assert!(Q5_K_BYTES == 176);
const _: () = assert!(Q6_K_BYTES == 210);
const _: () = assert!(Q8_K_BYTES == 292);

fn i8s<const N: usize>(b: &[u8], at: usize) -> [i8; N] {
    arr::<N>(b, at).map(|x| x as i8)
}

impl BlockQ4_0 {
    /// Parse one block; `b` holds exactly [`Q4_0_BYTES`] (the dispatcher guarantees it).
    pub fn parse(b: &[u8]) -> Self {
        Self {
            d: h(b, 0),
            qs: arr(b, 2),
        }
    }

    pub fn dequantize(&self, y: &mut [f32]) {
        for j in 0..16 {
            let x0 = (self.qs[j] & 0x0F) as i32 - 8;
            let x1 = (self.qs[j] >> 4) as i32 - 8;
            y[j] = x0 as f32 * self.d;
            y[j + 16] = x1 as f32 * self.d;
        }
    }
}

impl BlockQ4_1 {
    pub fn parse(b: &[u8]) -> Self {
        Self {
            d: h(b, 0),
            m: h(b, 2),
            qs: arr(b, 4),
        }
    }

    pub fn dequantize(&self, y: &mut [f32]) {
        for j in 0..16 {
            let x0 = (self.qs[j] & 0x0F) as f32;
            let x1 = (self.qs[j] >> 4) as f32;
            y[j] = x0 * self.d + self.m;
            y[j + 16] = x1 * self.d + self.m;
        }
    }
}

impl BlockQ5_0 {
    pub fn parse(b: &[u8]) -> Self {
        Self {
            d: h(b, 0),
            qh: u32::from_le_bytes(arr(b, 2)),
            qs: arr(b, 6),
        }
    }

    pub fn dequantize(&self, y: &mut [f32]) {
        for j in 0..16 {
            let xh0 = ((self.qh >> j) << 4) & 0x10;
            let xh1 = (self.qh >> (j + 12)) & 0x10;
            let x0 = ((self.qs[j] as u32 & 0x0F) | xh0) as i32 - 16;
            let x1 = ((self.qs[j] as u32 >> 4) | xh1) as i32 - 16;
            y[j] = x0 as f32 * self.d;
            y[j + 16] = x1 as f32 * self.d;
        }
    }
}

impl BlockQ5_1 {
    pub fn parse(b: &[u8]) -> Self {
        Self {
            d: h(b, 0),
            m: h(b, 2),
            qh: u32::from_le_bytes(arr(b, 4)),
            qs: arr(b, 8),
        }
    }

    pub fn dequantize(&self, y: &mut [f32]) {
        for j in 0..16 {
            let xh0 = ((self.qh >> j) << 4) & 0x10;
            let xh1 = (self.qh >> (j + 12)) & 0x10;
            let x0 = (self.qs[j] as u32 & 0x0F) | xh0;
            let x1 = (self.qs[j] as u32 >> 4) | xh1;
            y[j] = x0 as f32 * self.d + self.m;
            y[j + 16] = x1 as f32 * self.d + self.m;
        }
    }
}

impl BlockQ8_0 {
    pub fn parse(b: &[u8]) -> Self {
        Self {
            d: h(b, 0),
            qs: i8s(b, 2),
        }
    }

    pub fn dequantize(&self, y: &mut [f32]) {
        for (y, &q) in y.iter_mut().zip(&self.qs) {
            *y = q as f32 * self.d;
        }
    }
}

impl BlockQ8_1 {
    pub fn parse(b: &[u8]) -> Self {
        Self {
            d: h(b, 0),
            s: h(b, 2),
            qs: i8s(b, 4),
        }
    }

    pub fn dequantize(&self, y: &mut [f32]) {
        for (y, &q) in y.iter_mut().zip(&self.qs) {
            *y = q as f32 * self.d;
        }
    }
}

impl BlockQ2K {
    pub fn parse(b: &[u8]) -> Self {
        Self {
            scales: arr(b, 0),
            qs: arr(b, 16),
            d: h(b, 80),
            dmin: h(b, 82),
        }
    }

    pub fn dequantize(&self, y: &mut [f32]) {
        let mut out = 0;
        let mut is = 0;
        for n in (0..QK_K).step_by(128) {
            let q = &self.qs[n / 4..n / 4 + 32];
            for shift in [0, 2, 4, 6] {
                for half in 0..2 {
                    let sc = self.scales[is];
                    is += 1;
                    let dl = self.d * (sc & 0x0F) as f32;
                    let ml = self.dmin * (sc >> 4) as f32;
                    for l in 0..16 {
                        let v = (q[l + 16 * half] >> shift) & 3;
                        y[out] = dl * v as f32 - ml;
                        out += 1;
                    }
                }
            }
        }
    }
}

impl BlockQ3K {
    pub fn parse(b: &[u8]) -> Self {
        Self {
            hmask: arr(b, 0),
            qs: arr(b, 32),
            scales: arr(b, 96),
            d: h(b, 108),
        }
    }

    /// The 16 six-bit scales, unpacked as ggml does with its `kmask1/kmask2` shuffle.
    pub fn unpacked_scales(&self) -> [i8; 16] {
        let s = &self.scales;
        let mut out = [0i8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            let low = if i < 8 { s[i] & 0x0F } else { s[i - 8] >> 4 };
            let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
            *o = (low | (high << 4)) as i8 - 32;
        }
        out
    }

    pub fn dequantize(&self, y: &mut [f32]) {
        let scales = self.unpacked_scales();
        let mut out = 0;
        let mut is = 0;
        let mut m = 1u8;
        for n in (0..QK_K).step_by(128) {
            let q = &self.qs[n / 4..n / 4 + 32];
            for shift in [0, 2, 4, 6] {
                for half in 0..2 {
                    let dl = self.d * scales[is] as f32;
                    is += 1;
                    for l in 0..16 {
                        let i = l + 16 * half;
                        let low = ((q[i] >> shift) & 3) as i8;
                        let v = low - if self.hmask[i] & m != 0 { 0 } else { 4 };
                        y[out] = dl * v as f32;
                        out += 1;
                    }
                }
                m <<= 1;
            }
        }
    }
}

/// Six-bit scale and min `j` of the 12 packed bytes shared by Q4_K and Q5_K
/// (ggml's `get_scale_min_k4`).
pub fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

impl BlockQ4K {
    pub fn parse(b: &[u8]) -> Self {
        Self {
            d: h(b, 0),
            dmin: h(b, 2),
            scales: arr(b, 4),
            qs: arr(b, 16),
        }
    }

    pub fn dequantize(&self, y: &mut [f32]) {
        let mut out = 0;
        for (chunk, is) in (0..QK_K / 64).map(|c| (c, 2 * c)) {
            let q = &self.qs[32 * chunk..32 * chunk + 32];
            let (sc1, m1) = scale_min_k4(is, &self.scales);
            let (sc2, m2) = scale_min_k4(is + 1, &self.scales);
            let (d1, min1) = (self.d * sc1 as f32, self.dmin * m1 as f32);
            let (d2, min2) = (self.d * sc2 as f32, self.dmin * m2 as f32);
            for &b in q {
                y[out] = d1 * (b & 0x0F) as f32 - min1;
                out += 1;
            }
            for &b in q {
                y[out] = d2 * (b >> 4) as f32 - min2;
                out += 1;
            }
        }
    }
}

impl BlockQ5K {
    pub fn parse(b: &[u8]) -> Self {
        Self {
            d: h(b, 0),
            dmin: h(b, 2),
            scales: arr(b, 4),
            qh: arr(b, 16),
            qs: arr(b, 48),
        }
    }

    pub fn dequantize(&self, y: &mut [f32]) {
        let mut out = 0;
        let (mut u1, mut u2) = (1u8, 2u8);
        for (chunk, is) in (0..QK_K / 64).map(|c| (c, 2 * c)) {
            let ql = &self.qs[32 * chunk..32 * chunk + 32];
            let (sc1, m1) = scale_min_k4(is, &self.scales);
            let (sc2, m2) = scale_min_k4(is + 1, &self.scales);
            let (d1, min1) = (self.d * sc1 as f32, self.dmin * m1 as f32);
            let (d2, min2) = (self.d * sc2 as f32, self.dmin * m2 as f32);
            for l in 0..32 {
                let hi = if self.qh[l] & u1 != 0 { 16 } else { 0 };
                y[out] = d1 * ((ql[l] & 0x0F) + hi) as f32 - min1;
                out += 1;
            }
            for l in 0..32 {
                let hi = if self.qh[l] & u2 != 0 { 16 } else { 0 };
                y[out] = d2 * ((ql[l] >> 4) + hi) as f32 - min2;
                out += 1;
            }
            u1 <<= 2;
            u2 <<= 2;
        }
    }
}

impl BlockQ6K {
    pub fn parse(b: &[u8]) -> Self {
        Self {
            ql: arr(b, 0),
            qh: arr(b, 128),
            scales: i8s(b, 192),
            d: h(b, 208),
        }
    }

    pub fn dequantize(&self, y: &mut [f32]) {
        for n in 0..QK_K / 128 {
            let ql = &self.ql[64 * n..64 * n + 64];
            let qh = &self.qh[32 * n..32 * n + 32];
            let sc = &self.scales[8 * n..8 * n + 8];
            let y = &mut y[128 * n..128 * n + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i8 - 32;
                let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                y[l] = self.d * sc[is] as f32 * q1 as f32;
                y[l + 32] = self.d * sc[is + 2] as f32 * q2 as f32;
                y[l + 64] = self.d * sc[is + 4] as f32 * q3 as f32;
                y[l + 96] = self.d * sc[is + 6] as f32 * q4 as f32;
            }
        }
    }
}

impl BlockQ8K {
    pub fn parse(b: &[u8]) -> Self {
        let mut bsums = [0i16; QK_K / 16];
        for (i, s) in bsums.iter_mut().enumerate() {
            *s = i16::from_le_bytes(arr(b, 4 + QK_K + 2 * i));
        }
        Self {
            d: f32::from_le_bytes(arr(b, 0)),
            qs: i8s(b, 4),
            bsums,
        }
    }

    pub fn dequantize(&self, y: &mut [f32]) {
        for (y, &q) in y.iter_mut().zip(&self.qs) {
            *y = self.d * q as f32;
        }
    }
}
