//! Quantized matmul with ggml's numerics: each activation row is quantized to the weight
//! type's dot-product partner (Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1) exactly as
//! ggml's x86 `quantize_row_q8_*` does, then multiplied block by block in integers
//! (ggml-cpu `ggml_vec_dot_*`). This is the portable code; the SIMD kernels (`avx2`,
//! `avx512`) are picked at run time and checked against it bit for bit.

use half::f16;
use realm_gguf::GgmlType;

/// Bytes of one Q8_0 block: f16 scale + 32 × i8.
pub const Q8_0_BYTES: usize = 34;
/// Bytes of one Q8_1 block: f16 scale, f16 (scale × sum), 32 × i8.
pub const Q8_1_BYTES: usize = 36;

/// Bytes of one Q8_K block: f32 scale, 256 × i8, 16 × i16 sums of 16.
pub const Q8_K_BYTES: usize = 4 + 256 + 32;

/// The activation format a weight type multiplies against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VecDot {
    Q8_0,
    Q8_1,
    Q8K,
}

impl VecDot {
    pub fn for_weight(ty: GgmlType) -> Option<Self> {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => Some(VecDot::Q8_0),
            GgmlType::Q4_1 | GgmlType::Q5_1 => Some(VecDot::Q8_1),
            GgmlType::Q4_K | GgmlType::Q6_K => Some(VecDot::Q8K),
            _ => None,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            VecDot::Q8_0 => Q8_0_BYTES,
            VecDot::Q8_1 => Q8_1_BYTES,
            VecDot::Q8K => Q8_K_BYTES,
        }
    }

    /// Elements per activation block.
    pub fn block_len(self) -> usize {
        match self {
            VecDot::Q8K => 256,
            _ => 32,
        }
    }
}

fn h(b: &[u8], at: usize) -> f32 {
    let bits = f16::from_le_bytes([b[at], b[at + 1]]);
    // WebAssembly has no f16 conversion instruction: a table of every f16 (the same values).
    #[cfg(target_arch = "wasm32")]
    return crate::kernels::f16_to_f32(bits);
    #[cfg(not(target_arch = "wasm32"))]
    bits.to_f32()
}

/// Where the prompt tile kernels write: element (token `t`, weight row `j`) of a row-major
/// output `ld` values wide. The shares of one job write disjoint weight rows of it.
#[derive(Clone, Copy)]
pub struct TileOut {
    ptr: *mut f32,
    len: usize,
    ld: usize,
}

// SAFETY: writes go only to elements the caller owns (see `put`); the job's owner waits for
// every share before it reads the buffer again.
unsafe impl Send for TileOut {}
unsafe impl Sync for TileOut {}

impl TileOut {
    /// `out`, read as rows of `ld` values; it must outlive every `put`.
    pub fn new(out: &mut [f32], ld: usize) -> Self {
        TileOut {
            ptr: out.as_mut_ptr(),
            len: out.len(),
            ld,
        }
    }

    /// The same output from token `t0` on.
    pub fn skip(self, t0: usize) -> Self {
        let at = (t0 * self.ld).min(self.len);
        TileOut {
            // SAFETY: at most one past the end of the same buffer.
            ptr: unsafe { self.ptr.add(at) },
            len: self.len - at,
            ld: self.ld,
        }
    }

    /// Writes `v` at token `t`, rows `j..j + v.len()`.
    ///
    /// # Safety
    /// No other thread reads or writes those elements meanwhile, and the buffer given to
    /// [`TileOut::new`] is still alive.
    pub unsafe fn put(&self, t: usize, j: usize, v: &[f32]) {
        let at = t * self.ld + j;
        assert!(
            j + v.len() <= self.ld && at + v.len() <= self.len,
            "tile write out of bounds"
        );
        // SAFETY: in bounds (checked); exclusivity is the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), self.ptr.add(at), v.len()) };
    }
}

/// Quantize one row (a multiple of 32 values), appending to `out`, ggml's AVX2 way: scale from the
/// block's absolute maximum, `127 / max` as the inverse, round half to even.
pub fn quantize_row(kind: VecDot, x: &[f32], out: &mut Vec<u8>) {
    #[cfg(target_arch = "x86_64")]
    if kernel_level() >= KernelLevel::Avx512 {
        // SAFETY: `kernel_level` checked the CPU features.
        unsafe {
            match kind {
                VecDot::Q8K => super::avx512::quantize_q8_k(x, out),
                _ => super::avx512::quantize_q8_0(x, kind == VecDot::Q8_1, out),
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if kind != VecDot::Q8K && kernel_level() >= KernelLevel::Avx2 {
        // SAFETY: `kernel_level` checked the CPU features.
        unsafe { super::avx2::quantize_q8_0(x, kind == VecDot::Q8_1, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.1") && std::arch::is_x86_feature_detected!("avx2")
    {
        // SAFETY: the CPU has the features the function enables (checked just above).
        unsafe { quantize_row_simd(kind, x, out) };
        return;
    }
    quantize_row_body(kind, x, out);
}

/// The same code compiled with SSE4.1 (rounding in one instruction instead of a libm call)
/// and AVX2; IEEE arithmetic, so the same bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.1,avx2")]
fn quantize_row_simd(kind: VecDot, x: &[f32], out: &mut Vec<u8>) {
    quantize_row_body(kind, x, out);
}

/// The portable quantizer, whatever the CPU (for tests of the SIMD ones).
#[cfg(test)]
pub fn quantize_row_portable(kind: VecDot, x: &[f32], out: &mut Vec<u8>) {
    quantize_row_body(kind, x, out);
}

#[inline(always)]
fn quantize_row_body(kind: VecDot, x: &[f32], out: &mut Vec<u8>) {
    if kind == VecDot::Q8K {
        quantize_row_q8_k(x, out);
        return;
    }
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

/// ggml's `quantize_row_q8_K_ref`: scale from the signed value of largest magnitude
/// (`-127 / max`), round half to even, clamp at 127, sums of each 16.
#[inline(always)]
fn quantize_row_q8_k(x: &[f32], out: &mut Vec<u8>) {
    for block in x.chunks_exact(256) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in block {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            out.extend_from_slice(&[0u8; Q8_K_BYTES]);
            continue;
        }
        let iscale = -127.0 / max;
        let mut qs = [0i8; 256];
        for (q, &v) in qs.iter_mut().zip(block) {
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
        }
        out.extend_from_slice(&(1.0 / iscale).to_le_bytes());
        out.extend(qs.iter().map(|&q| q as u8));
        for sixteen in qs.chunks_exact(16) {
            let sum: i32 = sixteen.iter().map(|&q| i32::from(q)).sum();
            out.extend_from_slice(&(sum as i16).to_le_bytes());
        }
    }
}

/// Dot products of weight rows `j0..j0 + out.len()` (each `wrow` bytes of `ty` blocks in
/// `w`) with one quantized activation row `x`.
///
/// The arithmetic is ggml's x86 AVX2 `ggml_vec_dot_*` order, which llama.cpp runs on this
/// class of machine: per block, eight lanes each summing four consecutive integer products,
/// `acc[lane] = fma(d_w · d_x, lane_sum, acc[lane])`, the eight lanes reduced as ggml's
/// `hsum_float_8`, and for Q4_1/Q5_1 the `m · s` terms summed (fused) on the side. Matching
/// the rounding, not just the math, is what keeps greedy outputs token-exact with llama.cpp.
pub fn dot_rows(ty: GgmlType, w: &[u8], wrow: usize, x: &[u8], j0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        let level = kernel_level();
        // SAFETY: `kernel_level` checked the CPU features the kernels enable.
        if level >= KernelLevel::Avx512
            && unsafe { super::avx512::dot_rows(ty, w, wrow, x, j0, out) }
        {
            return;
        }
        // SAFETY: as above.
        if level >= KernelLevel::Avx2 && unsafe { super::avx2::dot_rows(ty, w, wrow, x, j0, out) } {
            return;
        }
        if level >= KernelLevel::Fma {
            // SAFETY: as above; the function only enables FMA.
            unsafe { dot_rows_fma(ty, w, wrow, x, j0, out) };
            return;
        }
    }
    dot_rows_portable(ty, w, wrow, x, j0, out);
}

/// The widest kernel family the CPU runs, lowered by `REALM_KERNELS=avx2|fma|portable`
/// (for comparing them in one benchmark run; every level gives the same bits). `Amx` is
/// never picked by itself: `REALM_KERNELS=amx` asks for it, and it changes the numbers of
/// prompts (see `amx.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KernelLevel {
    Portable,
    Fma,
    Avx2,
    Avx512,
    Amx,
}

pub fn kernel_level() -> KernelLevel {
    static LEVEL: std::sync::OnceLock<KernelLevel> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("REALM_KERNELS").as_deref() {
            Ok("amx") => KernelLevel::Amx,
            Ok("avx2") => KernelLevel::Avx2,
            Ok("fma") => KernelLevel::Fma,
            Ok("portable") => KernelLevel::Portable,
            _ => KernelLevel::Avx512,
        };
        #[cfg(target_arch = "x86_64")]
        let cpu = if cap == KernelLevel::Amx && super::amx::available() {
            KernelLevel::Amx
        } else if super::avx512::available() {
            KernelLevel::Avx512
        } else if super::avx2::available() {
            KernelLevel::Avx2
        } else if std::arch::is_x86_feature_detected!("fma") {
            KernelLevel::Fma
        } else {
            KernelLevel::Portable
        };
        #[cfg(not(target_arch = "x86_64"))]
        let cpu = KernelLevel::Portable;
        cpu.min(cap)
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
fn dot_rows_fma(ty: GgmlType, w: &[u8], wrow: usize, x: &[u8], j0: usize, out: &mut [f32]) {
    dot_rows_portable(ty, w, wrow, x, j0, out);
}

#[inline(always)]
fn dot_rows_portable(ty: GgmlType, w: &[u8], wrow: usize, x: &[u8], j0: usize, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        let row = &w[(j0 + i) * wrow..(j0 + i + 1) * wrow];
        *o = dot(ty, row, x);
    }
}

/// Rows of activations from which a K-quant (Q4_K, Q6_K) product takes ggml-cpu's tiled
/// order ([`dot_k_tiled`]): llama.cpp's `ggml_compute_forward_mul_mat_tiled` takes every
/// K-quant matmul of at least this many rows (a prompt's), the per-row `vec_dot` below.
pub const K_TILED_ROWS: usize = 8;

/// Whether a product of `rows` activation rows by a `ty` weight takes [`dot_k_tiled`].
pub fn k_tiled(ty: GgmlType, rows: usize) -> bool {
    rows >= K_TILED_ROWS && matches!(ty, GgmlType::Q4_K | GgmlType::Q6_K)
}

/// One Q4_K or Q6_K weight row unpacked for [`KRow::dot`]: per super-block its 256 values
/// times their sub-block's scale (Q6_K's -32 applied first; they fit in 16 bits), the
/// sub-blocks' mins (Q4_K), d and dmin.
#[derive(Default)]
pub struct KRow {
    qs: Vec<i16>,
    /// Per super-block: 8 mins (Q4_K).
    mn: Vec<i32>,
    d: Vec<f32>,
    dmin: Vec<f32>,
    q6: bool,
}

impl KRow {
    /// Unpacks `w` (one row of `ty`, Q4_K or Q6_K), reusing this one's buffers.
    pub fn unpack(&mut self, ty: GgmlType, w: &[u8]) {
        self.qs.clear();
        self.mn.clear();
        self.d.clear();
        self.dmin.clear();
        self.q6 = ty == GgmlType::Q6_K;
        match ty {
            GgmlType::Q4_K => {
                for wb in w.chunks_exact(144) {
                    let scales: [u8; 12] = wb[4..16].try_into().unwrap_or([0; 12]);
                    for j in 0..4 {
                        let (sl, ml) = realm_gguf::quant::scale_min_k4(2 * j, &scales);
                        let (sh, mh) = realm_gguf::quant::scale_min_k4(2 * j + 1, &scales);
                        let qs = &wb[16 + 32 * j..16 + 32 * j + 32];
                        self.qs
                            .extend(qs.iter().map(|&b| i16::from(b & 0x0F) * i16::from(sl)));
                        self.qs
                            .extend(qs.iter().map(|&b| i16::from(b >> 4) * i16::from(sh)));
                        self.mn.extend([i32::from(ml), i32::from(mh)]);
                    }
                    self.d.push(h(wb, 0));
                    self.dmin.push(h(wb, 2));
                }
            }
            GgmlType::Q6_K => {
                for wb in w.chunks_exact(210) {
                    let start = self.qs.len();
                    self.qs.resize(start + 256, 0);
                    let out = &mut self.qs[start..];
                    let sc = |i: usize| i16::from(wb[192 + i] as i8);
                    for n in 0..2 {
                        let (ql, qh) = (&wb[64 * n..], &wb[128 + 32 * n..]);
                        let out = &mut out[128 * n..];
                        for l in 0..32 {
                            let v = [
                                (ql[l] & 0x0F) | ((qh[l] & 3) << 4),
                                (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4),
                                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                            ];
                            for (k, v) in v.into_iter().enumerate() {
                                // Value 128n + 32k + l, in sub-block of 16 (8n + 2k + l/16).
                                out[32 * k + l] = (i16::from(v) - 32) * sc(8 * n + 2 * k + l / 16);
                            }
                        }
                    }
                    self.d.push(h(wb, 208));
                }
            }
            _ => {}
        }
    }

    /// This row × one Q8_K row in ggml-cpu's tiled order (its AVX-512 VNNI microkernel,
    /// which llama.cpp runs for prompts on AVX-512 machines): per super-block the exact
    /// integer sums — s1 = Σ scale·(q·x), s2 = Σ min·bsum (Q4_K) — then `r = s1 · d`
    /// rounded, `r = r − dmin · s2` fused, and `acc = acc + r · d_x` with the product
    /// rounded before the sum. (ggml's AVX2 build fuses that last step, so on AVX2-only
    /// machines llama.cpp's own prompt products differ from these in last bits.)
    #[inline]
    pub fn dot(&self, x: &[u8]) -> f32 {
        let mut acc = 0f32;
        for (b, xb) in x.chunks_exact(Q8_K_BYTES).enumerate().take(self.d.len()) {
            let s1 = scaled_dot(&self.qs[256 * b..256 * b + 256], &xb[4..260]);
            acc = self.epilogue(b, xb, s1, acc);
        }
        acc
    }
}

impl KRow {
    /// [`KRow::dot`] of four activation rows (the same bits as four calls).
    pub fn dot4(&self, x: [&[u8]; 4]) -> [f32; 4] {
        #[cfg(target_arch = "x86_64")]
        if kernel_level() >= KernelLevel::Avx2 {
            let nb = self.d.len();
            if x.iter().all(|x| x.len() >= nb * Q8_K_BYTES) && self.qs.len() >= 256 * nb {
                let avx512 = kernel_level() >= KernelLevel::Avx512;
                let mut acc = [0f32; 4];
                for b in 0..nb {
                    let at = b * Q8_K_BYTES;
                    let q8 = |t: usize| -> &[u8; 256] {
                        x[t][at + 4..at + 260]
                            .first_chunk::<256>()
                            .unwrap_or(&[0; 256])
                    };
                    let qs = self.qs[256 * b..].first_chunk::<256>().unwrap_or(&[0; 256]);
                    let x4 = [q8(0), q8(1), q8(2), q8(3)];
                    // SAFETY: each level is chosen only where the CPU has its features.
                    let s1 = unsafe {
                        if avx512 {
                            super::avx512::scaled_dot4(qs, x4)
                        } else {
                            super::avx2::scaled_dot4(qs, x4)
                        }
                    };
                    for t in 0..4 {
                        acc[t] = self.epilogue(b, &x[t][at..at + Q8_K_BYTES], s1[t], acc[t]);
                    }
                }
                return acc;
            }
        }
        x.map(|x| self.dot(x))
    }

    /// One super-block's float steps (see [`KRow::dot`]).
    #[inline(always)]
    fn epilogue(&self, b: usize, xb: &[u8], s1: i32, acc: f32) -> f32 {
        let dx = f32::from_le_bytes([xb[0], xb[1], xb[2], xb[3]]);
        if self.q6 {
            return acc + s1 as f32 * self.d[b] * dx;
        }
        let mn = &self.mn[8 * b..8 * b + 8];
        let bsum = |k: usize| i32::from(i16::from_le_bytes([xb[260 + 2 * k], xb[261 + 2 * k]]));
        let s2 = (0..8).fold(0i32, |a, j| {
            a.wrapping_add(mn[j] * (bsum(2 * j) + bsum(2 * j + 1)))
        });
        let r = (-self.dmin[b]).mul_add(s2 as f32, s1 as f32 * self.d[b]);
        acc + r * dx
    }
}

/// Σ qs[i]·x[i] over a super-block's 256 values (an exact integer: any order).
#[inline(always)]
fn scaled_dot(qs: &[i16], x: &[u8]) -> i32 {
    let (Some(qs), Some(x)) = (qs.first_chunk::<256>(), x.first_chunk::<256>()) else {
        return 0;
    };
    #[cfg(target_arch = "x86_64")]
    if kernel_level() >= KernelLevel::Avx2 {
        // SAFETY: the AVX2 level is chosen only where the CPU has AVX2 (`kernel_level`).
        return unsafe { super::avx2::scaled_dot(qs, x) };
    }
    let mut lanes = [0i32; 16];
    for (q, x) in qs.chunks_exact(16).zip(x.chunks_exact(16)) {
        for l in 0..16 {
            lanes[l] = lanes[l].wrapping_add(i32::from(q[l]) * i32::from(x[l] as i8));
        }
    }
    lanes.iter().fold(0i32, |a, &v| a.wrapping_add(v))
}

/// One Q4_1 row × one Q8_1 row in block order, the numerics of the AMX prompt tiles
/// (`amx.rs`): per block the exact integer sum, then `acc = fma(d·dy, sum, acc)` and
/// `acc = fma(m, s, acc)` — ggml's scalar formula, with its products fused.
pub fn dot_q4_1_blocks(w: &[u8], x: &[u8]) -> f32 {
    let mut acc = 0f32;
    for (wb, xb) in w.chunks_exact(20).zip(x.chunks_exact(Q8_1_BYTES)) {
        let mut sum = 0i32;
        for i in 0..16 {
            let q = wb[4 + i];
            sum += i32::from(q & 0x0F) * i32::from(xb[4 + i] as i8);
            sum += i32::from(q >> 4) * i32::from(xb[20 + i] as i8);
        }
        acc = crate::fma(h(wb, 0) * h(xb, 0), sum as f32, acc);
        acc = crate::fma(h(wb, 2), h(xb, 2), acc);
    }
    acc
}

/// One row's dot product, in ggml's AVX2 order (see [`dot_rows`]).
#[inline(always)]
pub fn dot(ty: GgmlType, w: &[u8], x: &[u8]) -> f32 {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    if let Some(v) = simd_blocks(ty, w, x) {
        return v;
    }
    dot_scalar(ty, w, x)
}

/// [`dot`] without any SIMD.
#[inline(always)]
fn dot_scalar(ty: GgmlType, w: &[u8], x: &[u8]) -> f32 {
    match ty {
        GgmlType::Q4_0 => blocks(w, x, 18, Q8_0_BYTES, 2, |b, q| {
            for j in 0..16 {
                q[j] = (b[2 + j] & 0x0F) as i8 - 8;
                q[j + 16] = (b[2 + j] >> 4) as i8 - 8;
            }
            (h(b, 0), None)
        }),
        GgmlType::Q4_1 => blocks(w, x, 20, Q8_1_BYTES, 4, |b, q| {
            for j in 0..16 {
                q[j] = (b[4 + j] & 0x0F) as i8;
                q[j + 16] = (b[4 + j] >> 4) as i8;
            }
            (h(b, 0), Some(h(b, 2)))
        }),
        GgmlType::Q5_0 => blocks(w, x, 22, Q8_0_BYTES, 2, |b, q| {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for j in 0..16 {
                let (h0, h1) = q5_high(qh, j);
                q[j] = ((b[6 + j] & 0x0F) | h0) as i8 - 16;
                q[j + 16] = ((b[6 + j] >> 4) | h1) as i8 - 16;
            }
            (h(b, 0), None)
        }),
        GgmlType::Q5_1 => blocks(w, x, 24, Q8_1_BYTES, 4, |b, q| {
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            for j in 0..16 {
                let (h0, h1) = q5_high(qh, j);
                q[j] = ((b[8 + j] & 0x0F) | h0) as i8;
                q[j + 16] = ((b[8 + j] >> 4) | h1) as i8;
            }
            (h(b, 0), Some(h(b, 2)))
        }),
        GgmlType::Q8_0 => blocks(w, x, 34, Q8_0_BYTES, 2, |b, q| {
            for (q, &v) in q.iter_mut().zip(&b[2..34]) {
                *q = v as i8;
            }
            (h(b, 0), None)
        }),
        GgmlType::Q4_K => dot_q4_k(w, x),
        GgmlType::Q6_K => dot_q6_k(w, x),
        _ => 0.0,
    }
}

/// Q4_K × Q8_K in ggml's AVX2 order: per super-block, the scaled integer sums in eight
/// lanes (four consecutive bytes each) fused into `acc` with `d = d_x · d_w`, and the mins
/// (`-d_x · dmin · Σ min·sum8`) in four lanes of their own.
#[inline(always)]
fn dot_q4_k(w: &[u8], x: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    let mut acc_m = [0f32; 4];
    for (wb, xb) in w.chunks_exact(144).zip(x.chunks_exact(Q8_K_BYTES)) {
        let dy = f32::from_le_bytes([xb[0], xb[1], xb[2], xb[3]]);
        let d = dy * h(wb, 0);
        let dmin = -dy * h(wb, 2);
        let scales: [u8; 12] = wb[4..16].try_into().unwrap_or([0; 12]);
        let mut sc = [0i32; 8];
        let mut mn = [0i32; 8];
        for j in 0..8 {
            let (s, m) = realm_gguf::quant::scale_min_k4(j, &scales);
            (sc[j], mn[j]) = (i32::from(s), i32::from(m));
        }
        let q8 = &xb[4..260];
        let bsum = |k: usize| i32::from(i16::from_le_bytes([xb[260 + 2 * k], xb[261 + 2 * k]]));
        for (l, a) in acc_m.iter_mut().enumerate() {
            let q8s = |k: usize| bsum(2 * k) + bsum(2 * k + 1);
            let prod = mn[2 * l] * q8s(2 * l) + mn[2 * l + 1] * q8s(2 * l + 1);
            *a = crate::fma(dmin, prod as f32, *a);
        }
        // Per 64 values: the low nibbles against the first 32 activations, the high
        // against the next, each lane's integer sum times its sub-block scale.
        let mut sumi = [0i32; 8];
        let (mut lo, mut hi) = ([0i8; 32], [0i8; 32]);
        for j in 0..4 {
            let qs = &wb[16 + 32 * j..16 + 32 * j + 32];
            for ((l, h), &b) in lo.iter_mut().zip(hi.iter_mut()).zip(qs) {
                (*l, *h) = ((b & 0x0F) as i8, (b >> 4) as i8);
            }
            let (sl, sh) = (
                lane_sums(&lo, &q8[64 * j..]),
                lane_sums(&hi, &q8[64 * j + 32..]),
            );
            for ((s, a), b) in sumi.iter_mut().zip(sl).zip(sh) {
                *s += sc[2 * j] * a + sc[2 * j + 1] * b;
            }
        }
        for (a, &s) in acc.iter_mut().zip(&sumi) {
            *a = crate::fma(d, s as f32, *a);
        }
    }
    let m = (acc_m[0] + acc_m[2]) + (acc_m[1] + acc_m[3]);
    hsum8(acc) + m
}

/// Q6_K × Q8_K in ggml's AVX2 order: the six-bit values taken unsigned (0..63), then the
/// -32 offset per lane from the activations' 16-value sums (lane L: 32 · (bsum[2L] ·
/// sc[2L] + bsum[2L+1] · sc[2L+1]), a different split of the same integer than per value,
/// which matters once the lanes are f32).
#[inline(always)]
fn dot_q6_k(w: &[u8], x: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, xb) in w.chunks_exact(210).zip(x.chunks_exact(Q8_K_BYTES)) {
        let dy = f32::from_le_bytes([xb[0], xb[1], xb[2], xb[3]]);
        let d = dy * h(wb, 208);
        let (ql, qh, sc) = (&wb[0..128], &wb[128..192], &wb[192..208]);
        let q8 = &xb[4..260];
        // Per 128 values, four runs of 32 six-bit values (-32..31) against their 32
        // activations; lanes 0-3 take the run's first scale, lanes 4-7 its second.
        let mut sumi = [0i32; 8];
        let mut q = [[0i8; 32]; 4];
        for n in 0..2 {
            let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
            for l in 0..32 {
                q[0][l] = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i8;
                q[1][l] = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i8;
                q[2][l] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8;
                q[3][l] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8;
            }
            for (k, q) in q.iter().enumerate() {
                let sums = lane_sums(q, &q8[128 * n + 32 * k..]);
                for (lane, (s, v)) in sumi.iter_mut().zip(sums).enumerate() {
                    *s += i32::from(sc[lane / 4 + 2 * k] as i8) * v;
                }
            }
        }
        let scales = &wb[192..208];
        let bsum = |k: usize| i32::from(i16::from_le_bytes([xb[260 + 2 * k], xb[261 + 2 * k]]));
        for (lane, s) in sumi.iter_mut().enumerate() {
            let (a, b) = (2 * lane, 2 * lane + 1);
            let sub = bsum(a) * i32::from(scales[a] as i8) + bsum(b) * i32::from(scales[b] as i8);
            *s = s.wrapping_sub(sub.wrapping_mul(32));
        }
        for (a, &s) in acc.iter_mut().zip(&sumi) {
            *a = crate::fma(d, s as f32, *a);
        }
    }
    hsum8(acc)
}

/// ggml's AVX2 block loop. `unpack` writes a weight block's 32 quants (as signed integers)
/// and returns its scale and, for the Q*_1 types, its min.
#[inline(always)]
fn blocks(
    w: &[u8],
    x: &[u8],
    w_bytes: usize,
    x_bytes: usize,
    x_quants_at: usize,
    unpack: impl Fn(&[u8], &mut [i8; 32]) -> (f32, Option<f32>),
) -> f32 {
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    let mut q = [0i8; 32];
    for (wb, xb) in w.chunks_exact(w_bytes).zip(x.chunks_exact(x_bytes)) {
        let (dw, m) = unpack(wb, &mut q);
        if let Some(m) = m {
            summs = crate::fma(m, h(xb, 2), summs);
        }
        let d = dw * h(xb, 0);
        let ys = &xb[x_quants_at..x_quants_at + 32];
        for (a, sum) in acc.iter_mut().zip(lane_sums(&q, ys)) {
            *a = crate::fma(d, sum as f32, *a);
        }
    }
    hsum8(acc) + summs
}

/// [`blocks`] with SIMD128 unpacking, lane sums and fused multiply-adds, for the types
/// with 32-value blocks; the same arithmetic, so the same result. `None` for other types.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline(always)]
fn simd_blocks(ty: GgmlType, w: &[u8], x: &[u8]) -> Option<f32> {
    use crate::simd128::{fma4, lane_sums_v, unpack};
    use std::arch::wasm32::*;
    let (w_bytes, x_bytes, x_at, min) = match ty {
        GgmlType::Q4_0 => (18, Q8_0_BYTES, 2, false),
        GgmlType::Q4_1 => (20, Q8_1_BYTES, 4, true),
        GgmlType::Q5_0 => (22, Q8_0_BYTES, 2, false),
        GgmlType::Q5_1 => (24, Q8_1_BYTES, 4, true),
        GgmlType::Q8_0 => (34, Q8_0_BYTES, 2, false),
        _ => return None,
    };
    let (mut lo, mut hi) = (f32x4_splat(0.0), f32x4_splat(0.0));
    let mut summs = 0f32;
    for (wb, xb) in w.chunks_exact(w_bytes).zip(x.chunks_exact(x_bytes)) {
        if min {
            summs = crate::fma(h(wb, 2), h(xb, 2), summs);
        }
        let d = h(wb, 0) * h(xb, 0);
        let (q0, q1) = unpack(ty, wb);
        let (s0, s1) = lane_sums_v(q0, q1, &xb[x_at..x_at + 32]);
        lo = fma4(d, s0, lo);
        hi = fma4(d, s1, hi);
    }
    let mut acc = [0f32; 8];
    // SAFETY: eight floats of room; unaligned stores.
    unsafe {
        v128_store(acc.as_mut_ptr().cast(), lo);
        v128_store(acc.as_mut_ptr().add(4).cast(), hi);
    }
    Some(hsum8(acc) + summs)
}

/// The eight lane sums of ggml's AVX2 kernels: lane `l` is `Σ q[k]·y[k]` over the four
/// `k` in `4l..4l + 4` (integers, so any order gives the same).
#[inline(always)]
fn lane_sums(q: &[i8; 32], y: &[u8]) -> [i32; 8] {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return crate::simd128::lane_sums(q, y);
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    {
        let mut s = [0i32; 8];
        for (l, s) in s.iter_mut().enumerate() {
            for k in 4 * l..4 * l + 4 {
                *s += i32::from(q[k]) * i32::from(y[k] as i8);
            }
        }
        s
    }
}

/// ggml's `hsum_float_8`: upper half onto lower, then pairs, then the last two.
#[inline(always)]
fn hsum8(a: [f32; 8]) -> f32 {
    let r = [a[4] + a[0], a[5] + a[1], a[6] + a[2], a[7] + a[3]];
    (r[0] + r[2]) + (r[1] + r[3])
}

fn q5_high(qh: u32, j: usize) -> (u8, u8) {
    (
        (((qh >> j) << 4) & 0x10) as u8,
        ((qh >> (j + 12)) & 0x10) as u8,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ggml's tiled K-quant order written out plainly (each sub-block's integer sum, then
    /// the float steps), against `KRow::dot` and `dot4` (SIMD where the CPU has it).
    #[test]
    fn k_tiled_rows_follow_the_plain_formula() {
        let k = 512;
        let xs: Vec<f32> = (0..4 * k)
            .map(|i| ((i * 29 % 83) as f32 - 41.0) / 17.0)
            .collect();
        let mut xq = Vec::new();
        for r in xs.chunks_exact(k) {
            quantize_row(VecDot::Q8K, r, &mut xq);
        }
        let qrow = xq.len() / 4;
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
            let w = crate::synthetic::weights(ty, k, 3, 11);
            let wrow = w.len() / 3;
            let mut row = KRow::default();
            for j in 0..3 {
                let wj = &w[j * wrow..(j + 1) * wrow];
                row.unpack(ty, wj);
                let x = |t: usize| &xq[t * qrow..(t + 1) * qrow];
                let four = row.dot4([x(0), x(1), x(2), x(3)]);
                for (t, got) in four.iter().enumerate() {
                    let want = plain_k_tiled(ty, wj, x(t));
                    assert_eq!(row.dot(x(t)).to_bits(), want.to_bits(), "{ty} row {j}");
                    assert_eq!(got.to_bits(), want.to_bits(), "{ty} row {j}, dot4");
                }
            }
        }
    }

    fn plain_k_tiled(ty: GgmlType, w: &[u8], x: &[u8]) -> f32 {
        let mut acc = 0f32;
        let bb = if ty == GgmlType::Q4_K { 144 } else { 210 };
        for (wb, xb) in w.chunks_exact(bb).zip(x.chunks_exact(Q8_K_BYTES)) {
            let dx = f32::from_le_bytes([xb[0], xb[1], xb[2], xb[3]]);
            let q8 = |i: usize| i32::from(xb[4 + i] as i8);
            let bsum = |k: usize| i32::from(i16::from_le_bytes([xb[260 + 2 * k], xb[261 + 2 * k]]));
            if ty == GgmlType::Q4_K {
                let scales: [u8; 12] = wb[4..16].try_into().expect("12 bytes");
                let (mut s1, mut s2) = (0i32, 0i32);
                for sub in 0..8 {
                    let (sc, m) = realm_gguf::quant::scale_min_k4(sub, &scales);
                    let mut dot = 0;
                    for i in 0..32 {
                        let byte = wb[16 + 32 * (sub / 2) + i];
                        let q = if sub % 2 == 0 { byte & 15 } else { byte >> 4 };
                        dot += i32::from(q) * q8(32 * sub + i);
                    }
                    s1 += i32::from(sc) * dot;
                    s2 += i32::from(m) * (bsum(2 * sub) + bsum(2 * sub + 1));
                }
                let r = (-h(wb, 2)).mul_add(s2 as f32, s1 as f32 * h(wb, 0));
                acc += r * dx;
            } else {
                let mut s1 = 0i32;
                for i in 0..256 {
                    let (n, l) = (i / 128, i % 128);
                    let (k, l) = (l / 32, l % 32);
                    let ql = wb[64 * n + l + if k % 2 == 1 { 32 } else { 0 }];
                    let lo = if k < 2 { ql & 15 } else { ql >> 4 };
                    let hi = (wb[128 + 32 * n + l] >> (2 * k)) & 3;
                    let q = i32::from(lo | (hi << 4)) - 32;
                    let sc = i32::from(wb[192 + 8 * n + 2 * k + l / 16] as i8);
                    s1 += sc * q * q8(i);
                }
                acc += s1 as f32 * h(wb, 208) * dx;
            }
        }
        acc
    }
    use realm_gguf::quant::dequantize;

    /// The SIMD128 block loop (unpacking, lane sums, fused multiply-adds) gives the
    /// scalar code's bits for every 32-value type, on random blocks and activations.
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    #[test]
    fn simd128_blocks_equal_the_scalar_ones() {
        let mut seed = 0x853c_49e6_748f_ea9bu64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
        ] {
            let kind = VecDot::for_weight(ty).expect("kind");
            let (ts, k) = (ty.type_size() as usize, 256);
            for _ in 0..200 {
                let mut w: Vec<u8> = (0..k / 32 * ts).map(|_| next() as u8).collect();
                for b in w.chunks_exact_mut(ts) {
                    let small = |r: u64| f16::from_f32((r % 1000) as f32 / 40000.0 - 0.0125);
                    b[..2].copy_from_slice(&small(next()).to_le_bytes());
                    if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                        b[2..4].copy_from_slice(&small(next()).to_le_bytes());
                    }
                }
                let xs: Vec<f32> = (0..k)
                    .map(|_| (next() % 2000) as f32 / 100.0 - 10.0)
                    .collect();
                let mut xq = Vec::new();
                quantize_row(kind, &xs, &mut xq);
                let (got, want) = (dot(ty, &w, &xq), dot_scalar(ty, &w, &xq));
                assert_eq!(got.to_bits(), want.to_bits(), "{ty}: {got} vs {want}");
            }
        }
    }

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
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K => &[0, 2],
            GgmlType::Q6_K => &[208],
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
    /// quantizing the activations to 8 bits allows: at most half a quantization step per
    /// activation, |x|max / 254, times Σ|w|, plus 5 % for rounding of the scales.
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
