//! The CPU backend: [`realm_compute::Backend`] over host memory, with these kernels.
//!
//! The native host runs it on a [`SpinPool`] of the machine's cores over memory-mapped
//! weights; the WebAssembly compute provider runs it on one share over weights in its own
//! linear memory. The kernel family (AMX, AVX-512, AVX2, portable) is chosen here, at run
//! time, from [`quant::kernel_level`]; every family gives the portable code's bits except
//! the opt-in AMX one (see `amx.rs`).

use std::cell::{Cell, RefCell, RefMut};
use std::sync::{Arc, Mutex};

use half::f16;
use realm_compute::{
    Activation, Attention, Backend, CacheShape, Error, Result, RopeParams, Shape, WeightData,
    WeightMeta,
};

use crate::batch::Batcher;
use crate::kernels::{self, AttnShape, LayerCache, TiledKv};
use crate::pool::{self, SpinPool};
use crate::quant::{self, VecDot};
#[cfg(target_arch = "x86_64")]
use crate::{amx, avx2, avx512};

/// An f32 matrix, row-major.
#[derive(Debug, Default)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    /// `rows` rows (contents unspecified); the size was checked by the caller.
    fn set_rows(&mut self, rows: usize) {
        self.rows = rows;
        self.data.resize(rows * self.cols, 0.0);
    }
}

/// A CPU tensor. Ops borrow inputs and outputs apart; one tensor as both is refused by
/// the checks before a kernel runs, and by the borrow here if a caller skipped them.
#[derive(Debug)]
pub struct CpuTensor(RefCell<Mat>);

/// A CPU weight: a checked range of the model's bytes, used in place.
#[derive(Debug)]
pub struct CpuWeight(WeightData);

impl CpuWeight {
    fn bytes(&self) -> &[u8] {
        self.0.bytes()
    }
}

/// A CPU KV cache: per layer, f16 keys and values of every position so far.
#[derive(Debug)]
pub struct CpuCache {
    shape: CacheShape,
    layers: RefCell<Vec<LayerCache>>,
}

/// Scratch reused across calls (nothing allocated per token).
#[derive(Default)]
struct Scratch {
    quantized: Vec<u8>,
    /// A prompt's activations repacked for the AVX-512 tiles, and for the AMX ones.
    #[cfg(target_arch = "x86_64")]
    packed: avx512::Packed,
    #[cfg(target_arch = "x86_64")]
    packed_amx: amx::Packed,
    /// The cache in f32 for tiled attention (batches of 64 rows or more).
    tiled_kv: TiledKv,
    rope: Vec<(f32, f32)>,
}

/// The CPU backend of one tenant (its scratch is its own; the pool is shared).
pub struct CpuBackend {
    spin: Arc<SpinPool>,
    max_kv: u64,
    /// Shared with the engine's other tenants: matmuls by one weight meet there.
    batcher: Option<(Arc<Batcher>, u64)>,
    /// In a step (see `batch.rs`): the index of its next matmul.
    step: Cell<Option<u32>>,
    scratch: RefCell<Scratch>,
    /// Per pool share: attention scratch (q in f16 and the f16 accumulator).
    attn: Vec<Mutex<Vec<f16>>>,
}

impl CpuBackend {
    /// A backend on `spin`'s shares, holding KV caches of at most `max_kv` values.
    pub fn new(spin: Arc<SpinPool>, max_kv: u64) -> Self {
        let attn = (0..spin.size()).map(|_| Mutex::new(Vec::new())).collect();
        Self {
            spin,
            max_kv,
            batcher: None,
            step: Cell::new(None),
            scratch: RefCell::default(),
            attn,
        }
    }

    /// The same, its matmuls batched with those of the other backends on `batcher` (see
    /// `batch.rs`).
    pub fn batched(spin: Arc<SpinPool>, max_kv: u64, batcher: Arc<Batcher>) -> Self {
        let id = batcher.register();
        let mut b = Self::new(spin, max_kv);
        b.batcher = Some((batcher, id));
        b
    }
}

impl Drop for CpuBackend {
    fn drop(&mut self) {
        if let Some((b, id)) = &self.batcher {
            b.unregister(*id);
        }
    }
}

fn busy() -> Error {
    Error::InvalidArgument("an op's output must be a different tensor from its inputs".into())
}

fn out(t: &CpuTensor) -> Result<RefMut<'_, Mat>> {
    t.0.try_borrow_mut().map_err(|_| busy())
}

fn input(t: &CpuTensor) -> Result<std::cell::Ref<'_, Mat>> {
    t.0.try_borrow().map_err(|_| busy())
}

/// An output buffer the shares of a [`SpinPool`] job write disjoint parts of.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T, usize);

// SAFETY: used only to hand disjoint sub-slices to the shares of one job, which the
// job's owner waits for before touching the buffer again.
unsafe impl<T> Sync for Shared<T> {}
unsafe impl<T> Send for Shared<T> {}

impl<T> Shared<T> {
    fn new(v: &mut [T]) -> Self {
        Self(v.as_mut_ptr(), v.len())
    }

    /// `len` values from `start`.
    ///
    /// # Safety
    /// No other live slice may overlap this one.
    #[allow(clippy::mut_from_ref, reason = "disjointness is the caller's contract")]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.1, "slice past the buffer");
        // SAFETY: in bounds (checked); disjointness is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type Cache = CpuCache;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn max_kv_elements(&self) -> u64 {
        self.max_kv
    }

    fn tensor(&self, cols: usize) -> CpuTensor {
        CpuTensor(RefCell::new(Mat {
            rows: 0,
            cols,
            data: Vec::new(),
        }))
    }

    fn shape(&self, t: &CpuTensor) -> Shape {
        let m = t.0.borrow();
        Shape {
            rows: m.rows,
            cols: m.cols,
        }
    }

    fn read_row(&self, t: &CpuTensor, row: usize) -> Vec<f32> {
        self.leave();
        let m = t.0.borrow();
        m.data[row * m.cols..(row + 1) * m.cols].to_vec()
    }

    fn write(&self, t: &CpuTensor, rows: usize, data: Vec<f32>) -> Result<()> {
        self.enter();
        let mut m = out(t)?;
        m.rows = rows;
        m.data = data;
        Ok(())
    }

    fn weight(&self, w: WeightData) -> Result<CpuWeight> {
        Ok(CpuWeight(w))
    }

    fn weight_meta<'a>(&self, w: &'a CpuWeight) -> &'a WeightMeta {
        &w.0.meta
    }

    fn cache(&self, shape: CacheShape) -> CpuCache {
        CpuCache {
            shape,
            layers: RefCell::new((0..shape.n_layer).map(|_| LayerCache::default()).collect()),
        }
    }

    fn cache_shape(&self, c: &CpuCache) -> CacheShape {
        c.shape
    }

    fn cache_filled(&self, c: &CpuCache, layer: usize) -> usize {
        let width = (c.shape.n_head_kv * c.shape.head_dim).max(1);
        c.layers
            .borrow()
            .get(layer)
            .map_or(0, |l| l.k.len() / width)
    }

    fn embed(&self, table: &CpuWeight, ids: &[u32], scale: f32, o: &CpuTensor) -> Result<()> {
        self.enter();
        let meta = &table.0.meta;
        let row_len = meta.row_len();
        let mut o = out(o)?;
        o.set_rows(ids.len());
        let row_bytes = meta.ty.row_bytes(row_len as u64).unwrap_or(0) as usize;
        for (dst, &id) in o.data.chunks_exact_mut(row_len).zip(ids) {
            let id = id as usize;
            match &meta.values {
                Some(d) => dst.copy_from_slice(&d[id * row_len..][..row_len]),
                None => {
                    let src = &table.bytes()[id * row_bytes..][..row_bytes];
                    realm_gguf::quant::dequantize(meta.ty, src, dst)
                        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
                }
            }
            if scale != 1.0 {
                dst.iter_mut().for_each(|v| *v *= scale);
            }
        }
        Ok(())
    }

    fn matmul(&self, x: &CpuTensor, w: &CpuWeight, o: &CpuTensor) -> Result<()> {
        let (x, mut o) = (input(x)?, out(o)?);
        self.enter();
        if let Some((b, id)) = &self.batcher
            && let Some(index) = self.step.get()
            && w.0.meta.values.is_none()
            && VecDot::for_weight(w.0.meta.ty).is_some()
            && quant::kernel_level() != quant::KernelLevel::Amx
        {
            self.step.set(Some(index.saturating_add(1)));
            // A round this tenant runs may be at another tenant's weight: its shapes.
            let mut multiply = |w: &WeightData, xs: Vec<f32>, rows: usize| {
                let all = Mat {
                    rows,
                    cols: w.meta.row_len(),
                    data: xs,
                };
                let mut outs = Mat {
                    rows: 0,
                    cols: w.meta.n_rows(),
                    data: Vec::new(),
                };
                self.matmul_into(&all, w, &mut outs).map(|()| outs.data)
            };
            let rows = b.matmul(*id, index, &w.0, &x.data, x.rows, &mut multiply)?;
            o.set_rows(x.rows);
            o.data.copy_from_slice(&rows);
            return Ok(());
        }
        self.matmul_into(&x, &w.0, &mut o)
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuWeight, eps: f32, o: &CpuTensor) -> Result<()> {
        let (x, mut o) = (input(x)?, out(o)?);
        let wv = w.0.meta.values.as_deref().unwrap_or_default();
        o.set_rows(x.rows);
        kernels::rms_norm(&x.data, wv, eps, &mut o.data);
        Ok(())
    }

    fn rope(&self, x: &CpuTensor, pos: u32, p: &RopeParams, f: Option<&[f32]>) -> Result<()> {
        let mut t = out(x)?;
        let cache = &mut self.scratch.borrow_mut().rope;
        let cols = t.cols;
        for (i, row) in t.data.chunks_exact_mut(cols).enumerate() {
            kernels::rope(row, p, f, pos.saturating_add(i as u32), cache);
        }
        Ok(())
    }

    fn attention(&self, a: Attention<'_, Self>, o: &CpuTensor) -> Result<()> {
        let (q, k, v) = (input(a.q)?, input(a.k)?, input(a.v)?);
        let mut o = out(o)?;
        let c = a.cache.shape;
        let kv_width = c.n_head_kv * c.head_dim;
        let mut layers = a.cache.layers.borrow_mut();
        let lc = &mut layers[a.layer];
        // Keys and values of positions pos… (a lower pos overwrites the tail), as f16.
        lc.k.truncate(a.pos * kv_width);
        lc.v.truncate(a.pos * kv_width);
        lc.k.extend(k.data.iter().map(|&x| f16::from_f32(x)));
        lc.v.extend(v.data.iter().map(|&x| f16::from_f32(x)));
        o.set_rows(q.rows);
        let shape = AttnShape {
            n_head: a.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            scale: a.scale,
            window: a.window,
            tiled: q.rows >= kernels::FA_TILE,
        };
        self.attend(&q, lc, a.pos, shape, &mut o);
        Ok(())
    }

    fn glu(&self, gate: &CpuTensor, up: &CpuTensor, act: Activation) -> Result<()> {
        let (g, mut u) = (input(gate)?, out(up)?);
        let act = match act {
            Activation::Silu => kernels::Gate::Silu,
            Activation::GeluTanh => kernels::Gate::GeluTanh,
        };
        kernels::glu(&g.data, &mut u.data, act);
        Ok(())
    }

    fn add(&self, acc: &CpuTensor, x: &CpuTensor) -> Result<()> {
        let (mut a, x) = (out(acc)?, input(x)?);
        a.data.iter_mut().zip(&x.data).for_each(|(a, &b)| *a += b);
        Ok(())
    }

    fn scale(&self, x: &CpuTensor, s: f32) -> Result<()> {
        out(x)?.data.iter_mut().for_each(|v| *v *= s);
        Ok(())
    }

    fn softmax(&self, x: &CpuTensor) -> Result<()> {
        let mut t = out(x)?;
        let cols = t.cols;
        t.data.chunks_exact_mut(cols).for_each(kernels::softmax);
        Ok(())
    }

    fn keep_last_row(&self, x: &CpuTensor) -> Result<()> {
        let mut t = out(x)?;
        if t.rows > 1 {
            let start = (t.rows - 1) * t.cols;
            t.data.drain(..start);
            t.rows = 1;
        }
        Ok(())
    }
}

impl CpuBackend {
    /// A step begins at the first op after a result was read (see `batch.rs`).
    fn enter(&self) {
        if let Some((b, id)) = &self.batcher
            && self.step.get().is_none()
        {
            self.step.set(Some(0));
            b.enter(*id);
        }
    }

    /// The step ends when the guest reads a result.
    fn leave(&self) {
        if let Some((b, id)) = &self.batcher
            && self.step.take().is_some()
        {
            b.leave(*id);
        }
    }

    fn matmul_into(&self, x: &Mat, w: &WeightData, o: &mut Mat) -> Result<()> {
        let meta = &w.meta;
        let (k, n, rows) = (meta.row_len(), meta.n_rows(), x.rows);
        o.set_rows(rows);
        let spin = &*self.spin;
        let shares = spin.size();
        let (ty, wb) = (meta.ty, w.bytes());
        let wrow = ty.row_bytes(k as u64).unwrap_or(0) as usize;
        let Some(kind) = VecDot::for_weight(ty) else {
            // Decoded weights (f32, f16, bf16) and types without an integer kernel yet
            // (Q2_K, Q3_K, Q5_K, …): each weight row in f32, each share a range of them.
            let dst = Shared::new(&mut o.data);
            spin.run(&|share| {
                let cols = pool::part(n, shares, share, 4);
                let mut wf = vec![0f32; if meta.values.is_some() { 0 } else { k }];
                for (t, xrow) in x.data.chunks_exact(k).enumerate() {
                    // SAFETY: shares own disjoint column ranges of every row.
                    let part = unsafe { dst.slice(t * n + cols.start, cols.len()) };
                    for (j, ov) in cols.clone().zip(part) {
                        let wj: &[f32] = match &meta.values {
                            Some(v) => &v[j * k..(j + 1) * k],
                            None => {
                                let row = &wb[j * wrow..(j + 1) * wrow];
                                let _ = realm_gguf::quant::dequantize(ty, row, &mut wf);
                                &wf
                            }
                        };
                        *ov = wj.iter().zip(xrow).map(|(a, b)| a * b).sum();
                    }
                }
            });
            return Ok(());
        };
        if !k.is_multiple_of(kind.block_len()) {
            return Err(Error::InvalidArgument(format!(
                "rows of {k} are not whole {}-element activation blocks",
                kind.block_len()
            )));
        }
        let mut scratch = self.scratch.borrow_mut();
        let scratch = &mut *scratch;
        let mut xq = std::mem::take(&mut scratch.quantized);
        let qrow = k / kind.block_len() * kind.block_bytes();
        xq.clear();
        if rows < 8 {
            for xrow in x.data.chunks_exact(k) {
                quant::quantize_row(kind, xrow, &mut xq);
            }
        } else {
            // A prompt's rows quantized by all shares (each into its own rows).
            xq.resize(rows * qrow, 0);
            let dst = Shared::new(&mut xq);
            spin.run(&|share| {
                thread_local! {
                    static ROW: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
                }
                ROW.with_borrow_mut(|buf| {
                    for t in pool::part(rows, shares, share, 1) {
                        buf.clear();
                        quant::quantize_row(kind, &x.data[t * k..(t + 1) * k], buf);
                        // SAFETY: shares own disjoint rows of `xq`.
                        unsafe { dst.slice(t * qrow, qrow) }.copy_from_slice(buf);
                    }
                });
            });
        }
        #[cfg(target_arch = "x86_64")]
        let tiled = rows >= 2 && self.tiles(ty, scratch, &xq, (wb, wrow, qrow), rows, n, o);
        #[cfg(not(target_arch = "x86_64"))]
        let tiled = false;
        let dst = Shared::new(&mut o.data);
        let xq_ref = &xq;
        if tiled {
            // Written by the tiles.
        } else if rows >= 2 * shares {
            // A prompt without tiles: each share whole rows.
            spin.run(&|share| {
                for t in pool::part(rows, shares, share, 1) {
                    // SAFETY: shares own disjoint rows.
                    let orow = unsafe { dst.slice(t * n, n) };
                    quant::dot_rows(ty, wb, wrow, &xq_ref[t * qrow..(t + 1) * qrow], 0, orow);
                }
            });
        } else {
            // Decoding: each row's outputs split across the spinning pool.
            spin.run(&|share| {
                let r = pool::part(n, shares, share, 4);
                for (t, xr) in xq_ref.chunks_exact(qrow).enumerate() {
                    // SAFETY: shares own disjoint column ranges of every row.
                    let part = unsafe { dst.slice(t * n + r.start, r.len()) };
                    quant::dot_rows(ty, wb, wrow, xr, r.start, part);
                }
            });
        }
        scratch.quantized = xq;
        Ok(())
    }

    /// Prompt processing on the widest tiles this CPU and type have; false if none.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments, reason = "one matmul's operands")]
    fn tiles(
        &self,
        ty: realm_compute::GgmlType,
        scratch: &mut Scratch,
        xq: &[u8],
        (wb, wrow, qrow): (&[u8], usize, usize),
        rows: usize,
        n: usize,
        o: &mut Mat,
    ) -> bool {
        let level = quant::kernel_level();
        let spin = &*self.spin;
        let shares = spin.size();
        let out = quant::TileOut::new(&mut o.data, n);
        if level == quant::KernelLevel::Amx && amx::has_tile(ty) {
            // AMX tiles (opt-in: their own numerics, see `amx.rs`): each share 16-row
            // groups of weights against every token.
            let packed = &mut scratch.packed_amx;
            packed.pack(xq, rows);
            let packed = &*packed;
            spin.run(&|share| {
                let r = pool::part(n, shares, share, 16);
                // SAFETY: `kernel_level` returned `Amx` only after `amx::available`;
                // shares own disjoint weight rows of the output.
                unsafe { amx::dot_tile(ty, (wb, wrow), packed, r, out) };
            });
            return true;
        }
        let avx512 = level >= quant::KernelLevel::Avx512;
        let (wide, wide_k) = (
            avx512 && avx512::has_tile(ty),
            avx512
                && matches!(
                    ty,
                    realm_compute::GgmlType::Q4_K | realm_compute::GgmlType::Q6_K
                ),
        );
        if !(wide || (level >= quant::KernelLevel::Avx2 && avx2::has_tile(ty))) {
            return false;
        }
        // Tiles of four weight rows × several tokens, each share a range of weight rows
        // (kept in cache) against every token, written straight into the output.
        let packed = &mut scratch.packed;
        if wide {
            packed.pack(ty, xq, rows);
        }
        let packed = &*packed;
        spin.run(&|share| {
            let r = pool::part(n, shares, share, 4);
            // SAFETY: `kernel_level` checked the CPU features; shares own disjoint weight
            // rows of the output.
            unsafe {
                if wide {
                    avx512::dot_tile(ty, (wb, wrow), (xq, packed), r, out)
                } else if wide_k {
                    avx512::dot_tile_k(ty, (wb, wrow), (xq, qrow), r, out)
                } else {
                    avx2::dot_tile(ty, wb, wrow, (xq, qrow), r, out)
                }
            };
        });
        true
    }

    /// Attention of every row of `q` (row i at position `pos + i`) over `lc`.
    fn attend(&self, q: &Mat, lc: &LayerCache, pos: usize, shape: AttnShape, o: &mut Mat) {
        let (n, n_head, hd, cols) = (q.rows, shape.n_head, shape.head_dim, q.cols);
        // Batches of 64 rows or more: ggml's tiled numerics over f32 copies of the cache,
        // made once for all rows.
        let mut scratch = self.scratch.borrow_mut();
        let tiled = &mut scratch.tiled_kv;
        if shape.tiled {
            tiled.build(lc, shape, pos + n);
        }
        let tiled = &*tiled;
        // (row, head) items split evenly across the pool: one token's heads in parallel
        // when decoding, whole rows when processing a prompt.
        let spin = &*self.spin;
        let shares = spin.size();
        let attn = &self.attn;
        let dst = Shared::new(&mut o.data);
        spin.run(&|share| {
            let mut buf = attn[share % attn.len()]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let mut row = |i: usize, heads: std::ops::Range<usize>, orow: &mut [f32]| {
                let qrow = &q.data[i * cols..(i + 1) * cols];
                if shape.tiled {
                    kernels::attend_row_tiled(qrow, tiled, pos + i, shape, heads, orow);
                } else {
                    kernels::attend_row(qrow, lc, pos + i, shape, heads, &mut buf, orow);
                }
            };
            if n >= shares {
                // Later rows attend to more positions: deal rows out in turn so every
                // share gets a similar mix.
                for i in (share..n).step_by(shares) {
                    // SAFETY: shares own disjoint rows of the output.
                    row(i, 0..n_head, unsafe { dst.slice(i * cols, cols) });
                }
                return;
            }
            let items = pool::part(n * n_head, shares, share, 1);
            let mut item = items.start;
            while item < items.end {
                let (i, h0) = (item / n_head, item % n_head);
                let h1 = n_head.min(h0 + items.end - item);
                // SAFETY: shares own disjoint (row, head) ranges of the output.
                row(i, h0..h1, unsafe {
                    dst.slice(i * cols + h0 * hd, (h1 - h0) * hd)
                });
                item += h1 - h0;
            }
        });
    }
}
