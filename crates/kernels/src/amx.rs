//! AMX-INT8 prompt tiles for Q4_1 weights, opt-in with `REALM_KERNELS=amx`.
//!
//! Realm's default numerics are ggml's AVX2 ones: per block, eight float partial sums, each
//! over a four-product integer sum. AMX's `tdpbusd` gives one integer per (row, token) over
//! a whole block, so it cannot reproduce those partial sums without throwing away 7/8 of its
//! work. This family therefore has its own numerics, the block order of ggml's scalar
//! formula with fused multiply-adds ([`quant::dot_q4_1_blocks`], which the tests check it
//! against bit for bit): the same on every AMX machine, but not bit-identical to the other
//! families. It is used for prompts (two or more rows); a decode step keeps the default
//! kernels.
//!
//! Layout: `tdpbusd` multiplies unsigned bytes (the weights' nibbles, 16 rows × one block
//! of 32) by signed bytes (the Q8_1 activations of 16 tokens, packed four bytes per token
//! per tile row), giving a 16 × 16 tile of exact block sums; AVX-512 then scales them
//! into per-(row, token) float accumulators.

use std::arch::asm;
use std::arch::x86_64::*;

use super::avx512;
use super::quant::{Q8_1_BYTES, TileOut};
use realm_gguf::GgmlType;

/// Tokens (and weight rows) per tile.
const T: usize = 16;
/// Bytes of one Q4_1 block.
const Q4_1_BYTES: usize = 20;

/// Whether this CPU and kernel run AMX-INT8 (asking Linux for the tile state once).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        if !avx512::available() || !cfg!(target_os = "linux") {
            return false;
        }
        // CPUID.(7, 0).EDX: bit 24 AMX-TILE, bit 25 AMX-INT8.
        let edx = __cpuid_count(7, 0).edx;
        edx >> 24 & 3 == 3 && request_tile_state()
    })
}

/// Linux's `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: the process may use the
/// tile registers from now on. `false` where the kernel says no (or predates the call).
fn request_tile_state() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a plain system call that only changes this process's permissions.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

/// Whether [`dot_tile`] has a kernel for `ty`.
pub fn has_tile(ty: GgmlType) -> bool {
    ty == GgmlType::Q4_1
}

/// One 64-byte-aligned tile of bytes (16 rows × 32 bytes, or 8 rows × 64).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Tile([u8; 512]);

/// A prompt's Q8_1 activations in tile layout: per group of 16 tokens (the last padded with
/// zeros) and per block, the quants as `tdpbusd`'s second source (row `k` holds bytes
/// `4k..4k + 4` of every token) and the tokens' scales and sums as f32.
#[derive(Default)]
pub struct Packed {
    q: Vec<Tile>,
    d: Vec<[f32; T]>,
    s: Vec<[f32; T]>,
    nb: usize,
    n_tok: usize,
}

impl Packed {
    /// Repacks `n_tok` Q8_1 rows of `xq`.
    pub fn pack(&mut self, xq: &[u8], n_tok: usize) {
        let nb = xq.len() / Q8_1_BYTES / n_tok.max(1);
        let n = n_tok.div_ceil(T) * nb;
        self.nb = nb;
        self.n_tok = n_tok;
        self.q.clear();
        self.q.resize(n, Tile([0; 512]));
        self.d.clear();
        self.d.resize(n, [0.0; T]);
        self.s.clear();
        self.s.resize(n, [0.0; T]);
        let h = |b: &[u8], at: usize| f32::from(half::f16::from_le_bytes([b[at], b[at + 1]]));
        for (i, xb) in xq.chunks_exact(Q8_1_BYTES).enumerate().take(n_tok * nb) {
            let (t, b) = (i / nb, i % nb);
            let at = t / T * nb + b;
            let l = t % T;
            for k in 0..8 {
                self.q[at].0[64 * k + 4 * l..64 * k + 4 * l + 4]
                    .copy_from_slice(&xb[4 + 4 * k..8 + 4 * k]);
            }
            self.d[at][l] = h(xb, 0);
            self.s[at][l] = h(xb, 2);
        }
    }
}

/// The tile configuration: palette 1; tmm0 the 16 × 16 sums, tmm1 16 weight rows × 32
/// bytes, tmm2 the activations as 8 rows × 64 bytes.
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: Config = {
    let mut c = Config {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    c.colsb[0] = 64;
    c.rows[0] = 16;
    c.colsb[1] = 32;
    c.rows[1] = 16;
    c.colsb[2] = 64;
    c.rows[2] = 8;
    // tmm3..5: the same three shapes, for the next block while this one is scaled.
    c.colsb[3] = 64;
    c.rows[3] = 16;
    c.colsb[4] = 32;
    c.rows[4] = 16;
    c.colsb[5] = 64;
    c.rows[5] = 8;
    c
};

/// Starts block sums into tmm0 (`second`: tmm3) from 16 weight rows × 32 bytes at `a` and
/// 8 × 64 activation bytes at `q`.
///
/// # Safety
/// The configuration is loaded, and both pointers have 512 readable bytes.
#[inline(always)]
unsafe fn start_sums(second: bool, a: *const u8, q: *const u8) {
    // SAFETY: the caller's contract.
    unsafe {
        if second {
            asm!(
                "tilezero tmm3",
                "tileloadd tmm4, [{a} + {s32}]",
                "tileloadd tmm5, [{q} + {s64}]",
                "tdpbusd tmm3, tmm4, tmm5",
                a = in(reg) a, q = in(reg) q, s32 = in(reg) 32usize, s64 = in(reg) 64usize,
                options(nostack, readonly),
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tileloadd tmm1, [{a} + {s32}]",
                "tileloadd tmm2, [{q} + {s64}]",
                "tdpbusd tmm0, tmm1, tmm2",
                a = in(reg) a, q = in(reg) q, s32 = in(reg) 32usize, s64 = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
    }
}

/// Stores the 16 × 16 sums of tmm0 (`second`: tmm3) at `c`.
///
/// # Safety
/// `c` has 1024 writable bytes.
#[inline(always)]
unsafe fn store_sums(second: bool, c: *mut u8) {
    // SAFETY: the caller's contract.
    unsafe {
        if second {
            asm!("tilestored [{c} + {s64}], tmm3", c = in(reg) c, s64 = in(reg) 64usize,
                 options(nostack));
        } else {
            asm!("tilestored [{c} + {s64}], tmm0", c = in(reg) c, s64 = in(reg) 64usize,
                 options(nostack));
        }
    }
}

/// Weight rows `rows` × every token of `prompt` into `out` (token-major, as
/// [`avx512::dot_tile`]). `false` if `ty` has no kernel here.
///
/// # Safety
/// [`available`] must have returned `true`, and no other thread may write the elements of
/// `out` in `rows` meanwhile.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_tile(
    ty: GgmlType,
    (w, wrow): (&[u8], usize),
    prompt: &Packed,
    rows: std::ops::Range<usize>,
    out: TileOut,
) -> bool {
    if !has_tile(ty) || prompt.n_tok == 0 || rows.is_empty() {
        return has_tile(ty);
    }
    let nb = prompt.nb;
    assert!(wrow >= nb * Q4_1_BYTES && w.len() >= rows.end * wrow);
    assert!(prompt.q.len() == prompt.n_tok.div_ceil(T) * nb);
    // Per 16 weight rows and block: the unpacked nibbles, and each row's d and m.
    let mut a = vec![Tile([0; 512]); nb];
    let mut dm = vec![([0f32; T], [0f32; T]); nb];
    // The 16 × 16 i32 sums.
    let mut sums = [Tile([0; 512]); 2];
    let mut acc = [[0f32; T]; T];
    // SAFETY: a valid palette-1 configuration (checked by the CPU; `available` asked for
    // the tile state); released below.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
    for j0 in rows.clone().step_by(T) {
        let n_rows = (rows.end - j0).min(T);
        // Row by row (each row's blocks are one sequential read of the weights).
        for r in 0..T {
            for (b, (ab, (d, m))) in a.iter_mut().zip(dm.iter_mut()).enumerate() {
                let dst = &mut ab.0[32 * r..32 * r + 32];
                if r >= n_rows {
                    dst.fill(0);
                    d[r] = 0.0;
                    m[r] = 0.0;
                    continue;
                }
                let at = (j0 + r) * wrow + b * Q4_1_BYTES;
                let blk = &w[at..at + Q4_1_BYTES];
                // SAFETY: 16 bytes read from the block, 32 written to `dst` (in bounds).
                unsafe {
                    let q = _mm_loadu_si128(blk[4..20].as_ptr().cast());
                    let m4 = _mm_set1_epi8(0x0F);
                    _mm_storeu_si128(dst.as_mut_ptr().cast(), _mm_and_si128(q, m4));
                    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
                    _mm_storeu_si128(dst[16..].as_mut_ptr().cast(), hi);
                }
                let h = |at: usize| f32::from(half::f16::from_le_bytes([blk[at], blk[at + 1]]));
                d[r] = h(0);
                m[r] = h(2);
            }
        }
        for g in 0..prompt.n_tok.div_ceil(T) {
            let mut v = [_mm512_setzero_ps(); T];
            // Block b + 1's sums run on the tile unit while block b's are scaled.
            // SAFETY: in-bounds tiles of 512 bytes (the asserts above).
            unsafe { start_sums(false, a[0].0.as_ptr(), prompt.q[g * nb].0.as_ptr()) };
            for b in 0..nb {
                let at = g * nb + b;
                // SAFETY: as above; `sums` takes 16 × 64 bytes.
                unsafe {
                    if b + 1 < nb {
                        let next = prompt.q[at + 1].0.as_ptr();
                        start_sums(b % 2 == 0, a[b + 1].0.as_ptr(), next);
                    }
                    store_sums(b % 2 == 1, sums.as_mut_ptr().cast());
                }
                // SAFETY: 16 floats each.
                let (dy, sy) = unsafe {
                    (
                        _mm512_loadu_ps(prompt.d[at].as_ptr()),
                        _mm512_loadu_ps(prompt.s[at].as_ptr()),
                    )
                };
                let (d, m) = &dm[b];
                for (r, vr) in v.iter_mut().enumerate() {
                    // SAFETY: row `r` of the sums is 16 i32s.
                    let isum = unsafe {
                        _mm512_loadu_si512(sums.as_ptr().cast::<u8>().add(64 * r).cast())
                    };
                    let scale = _mm512_mul_ps(_mm512_set1_ps(d[r]), dy);
                    *vr = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(isum), *vr);
                    *vr = _mm512_fmadd_ps(_mm512_set1_ps(m[r]), sy, *vr);
                }
            }
            for (r, vr) in v.iter().enumerate() {
                // SAFETY: 16 floats.
                unsafe { _mm512_storeu_ps(acc[r].as_mut_ptr(), *vr) };
            }
            let t0 = g * T;
            for t in t0..(t0 + T).min(prompt.n_tok) {
                let col: [f32; T] = std::array::from_fn(|r| acc[r][t - t0]);
                // SAFETY: this call owns rows `rows` (the caller's contract).
                unsafe { out.put(t, j0, &col[..n_rows]) };
            }
        }
    }
    // SAFETY: ends this thread's use of the tiles.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant;
    use crate::testdata::{self, Lcg};

    /// Every (row, token) equals the portable block-order formula bit for bit, whatever the
    /// token and row counts (partial tiles of both included). Without AMX the test says it
    /// skipped; `REALM_REQUIRE_AMX=1` makes that a failure.
    #[test]
    fn amx_tiles_equal_the_block_order_formula() {
        if !available() {
            assert!(
                std::env::var_os("REALM_REQUIRE_AMX").is_none(),
                "REALM_REQUIRE_AMX is set but this CPU or kernel has no AMX-INT8"
            );
            eprintln!("SKIPPED amx_tiles_equal_the_block_order_formula: no AMX-INT8 here");
            return;
        }
        let ty = GgmlType::Q4_1;
        let mut rng = Lcg(7);
        for (n_rows, n_tok, k) in [(16, 16, 32), (37, 21, 576), (5, 2, 96), (40, 33, 1536)] {
            let (w, wrow) = testdata::weights(&mut rng, ty, n_rows, k);
            let (xq, qrow) = testdata::activations(&mut rng, ty, n_tok, k);
            let mut packed = Packed::default();
            packed.pack(&xq, n_tok);
            let mut out = vec![f32::NAN; n_rows * n_tok];
            let to = TileOut::new(&mut out, n_rows);
            // Two calls over parts of the rows, as two shares would make them.
            let cut = n_rows / 2 / T * T;
            // SAFETY: `available` said yes; one thread.
            unsafe {
                assert!(dot_tile(ty, (&w, wrow), &packed, 0..cut, to));
                assert!(dot_tile(ty, (&w, wrow), &packed, cut..n_rows, to));
            }
            for t in 0..n_tok {
                for j in 0..n_rows {
                    let want = quant::dot_q4_1_blocks(
                        &w[j * wrow..(j + 1) * wrow],
                        &xq[t * qrow..(t + 1) * qrow],
                    );
                    let got = out[t * n_rows + j];
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "row {j} token {t}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
