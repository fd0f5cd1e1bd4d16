//! The CPU backend: [`realm_compute::Backend`] over host memory, with these kernels.
//!
//! The native host runs it on a [`SpinPool`] of the machine's cores over memory-mapped
//! weights; the WebAssembly compute provider runs it on one share over weights in its own
//! linear memory. The kernel family (AMX, AVX-512, AVX2, portable) is chosen here, at run
//! time, from [`quant::kernel_level`]; every family gives the portable code's bits except
//! the opt-in AMX one (see `amx.rs`).
//!
//! Ops run as they are called, or, on a backend made with [`CpuBackend::batched`], are
//! recorded as one step (everything from the first op after a read to the next read) that
//! runs in a round with the other tenants' steps (see `batch.rs`): each tenant's ops in
//! order, every weight's matmuls of all of them as one product.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

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

/// A CPU tensor. Its row count is kept as of the last op recorded, so that the checks of
/// the next op see it before a batched step has run. Ops lock inputs and outputs apart;
/// one tensor as both is refused by the checks before a kernel runs, and by the lock here
/// if a caller skipped them.
#[derive(Debug)]
pub struct CpuTensor(Arc<TensorCell>);

#[derive(Debug)]
struct TensorCell {
    cols: usize,
    rows: AtomicUsize,
    mat: Mutex<Mat>,
}

impl CpuTensor {
    /// Its row count once the ops recorded so far have run.
    fn will_have(&self, rows: usize) {
        self.0.rows.store(rows, Ordering::Relaxed);
    }

    fn rows(&self) -> usize {
        self.0.rows.load(Ordering::Relaxed)
    }
}

/// A CPU weight: a checked range of the model's bytes, used in place.
#[derive(Debug)]
pub struct CpuWeight(Arc<WeightData>);

/// A CPU KV cache: per layer, f16 keys and values of every position so far (and the
/// positions each layer will hold once the ops recorded so far have run).
#[derive(Debug)]
pub struct CpuCache(Arc<CacheCell>);

#[derive(Debug)]
struct CacheCell {
    shape: CacheShape,
    filled: Vec<AtomicUsize>,
    layers: Mutex<Vec<LayerCache>>,
}

/// One recorded op, holding what it reads and writes.
#[derive(Debug)]
enum Op {
    Write {
        t: Arc<TensorCell>,
        rows: usize,
        data: Vec<f32>,
    },
    Embed {
        table: Arc<WeightData>,
        ids: Vec<u32>,
        scale: f32,
        o: Arc<TensorCell>,
    },
    Matmul {
        x: Arc<TensorCell>,
        w: Arc<WeightData>,
        o: Arc<TensorCell>,
    },
    RmsNorm {
        x: Arc<TensorCell>,
        w: Arc<WeightData>,
        eps: f32,
        o: Arc<TensorCell>,
    },
    Rope {
        x: Arc<TensorCell>,
        pos: u32,
        p: RopeParams,
        factors: Option<Vec<f32>>,
    },
    Attention {
        q: Arc<TensorCell>,
        k: Arc<TensorCell>,
        v: Arc<TensorCell>,
        cache: Arc<CacheCell>,
        layer: usize,
        pos: usize,
        n_head: usize,
        scale: f32,
        window: usize,
        softcap: f32,
        o: Arc<TensorCell>,
    },
    Glu {
        gate: Arc<TensorCell>,
        up: Arc<TensorCell>,
        act: Activation,
    },
    Add {
        acc: Arc<TensorCell>,
        x: Arc<TensorCell>,
    },
    Scale {
        x: Arc<TensorCell>,
        s: f32,
    },
    ScaleRows {
        x: Arc<TensorCell>,
        s: Vec<f32>,
    },
    Softmax {
        x: Arc<TensorCell>,
    },
    KeepLastRow {
        x: Arc<TensorCell>,
    },
}

impl Op {
    /// A matmul whose rows may share a product with other tenants' (an integer kernel
    /// over quantized weights: rows are bit-identical whatever the batch).
    fn batchable(&self) -> Option<&Arc<WeightData>> {
        match self {
            Op::Matmul { w, .. }
                if w.meta.values.is_none() && VecDot::for_weight(w.meta.ty).is_some() =>
            {
                Some(w)
            }
            _ => None,
        }
    }
}

/// A tenant's recorded ops, run in a round (see `batch.rs`).
#[derive(Debug, Default)]
pub struct Step(Vec<Op>);

/// Steps of at most this many rows run side by side in a round (see `run_round`).
const SIDE_BY_SIDE_ROWS: usize = 4;

impl Step {
    /// The rows (tokens) the step feeds in: its embeddings' or written inputs' rows.
    fn rows(&self) -> usize {
        self.0
            .iter()
            .map(|op| match op {
                Op::Embed { ids, .. } => ids.len(),
                Op::Write { rows, .. } => *rows,
                _ => 0,
            })
            .max()
            .unwrap_or(0)
    }
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

/// What runs ops: the pool and, per share of it, scratch (a round runs tenants' ops on
/// every share at once).
struct Exec {
    spin: Arc<SpinPool>,
    scratch: Vec<Mutex<Scratch>>,
    /// Per pool share: attention scratch (q in f16 and the f16 accumulator).
    attn: Vec<Mutex<Vec<f16>>>,
}

/// The CPU backend of one tenant (its scratch is its own; the pool is shared).
pub struct CpuBackend {
    exec: Exec,
    max_kv: u64,
    /// Shared with the engine's other tenants: steps run in rounds there.
    batcher: Option<(Arc<Batcher>, u64)>,
    /// The ops of the step being recorded (batched backends only).
    step: RefCell<Vec<Op>>,
    /// A step is open: an op was recorded since the last read.
    in_step: Cell<bool>,
}

impl CpuBackend {
    /// A backend on `spin`'s shares, holding KV caches of at most `max_kv` values.
    pub fn new(spin: Arc<SpinPool>, max_kv: u64) -> Self {
        let attn = (0..spin.size()).map(|_| Mutex::new(Vec::new())).collect();
        let scratch = (0..spin.size()).map(|_| Mutex::default()).collect();
        Self {
            exec: Exec {
                spin,
                scratch,
                attn,
            },
            max_kv,
            batcher: None,
            step: RefCell::default(),
            in_step: Cell::new(false),
        }
    }

    /// The same, its steps run in rounds with those of the other backends on `batcher`
    /// (see `batch.rs`). Under the opt-in AMX kernels, whose numerics depend on the rows
    /// multiplied together, a backend is never batched: this is [`CpuBackend::new`].
    pub fn batched(spin: Arc<SpinPool>, max_kv: u64, batcher: Arc<Batcher>) -> Self {
        let mut b = Self::new(spin, max_kv);
        if quant::kernel_level() != quant::KernelLevel::Amx {
            let id = batcher.register();
            b.batcher = Some((batcher, id));
        }
        b
    }

    /// Runs `op` now, or records it in the open step.
    fn submit(&self, op: Op) -> Result<()> {
        match &self.batcher {
            None => self.exec.exec(op, 0),
            Some((b, id)) => {
                if !self.in_step.replace(true) {
                    b.enter(*id);
                }
                self.step.borrow_mut().push(op);
                Ok(())
            }
        }
    }

    /// Runs the open step (in a round with the other tenants' steps) and closes it.
    fn flush(&self) -> Result<()> {
        let Some((b, id)) = &self.batcher else {
            return Ok(());
        };
        if !self.in_step.replace(false) {
            return Ok(());
        }
        let ops = std::mem::take(&mut *self.step.borrow_mut());
        b.submit(*id, Step(ops), &mut |steps| self.exec.run_round(b, steps))
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

/// A tensor's contents for an op (a poisoned lock only means a kernel panicked earlier;
/// the contents are whatever it left, as after any failed op).
fn lock(t: &TensorCell) -> Result<MutexGuard<'_, Mat>> {
    match t.mat.try_lock() {
        Ok(m) => Ok(m),
        Err(TryLockError::Poisoned(e)) => Ok(e.into_inner()),
        Err(TryLockError::WouldBlock) => Err(busy()),
    }
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
        CpuTensor(Arc::new(TensorCell {
            cols,
            rows: AtomicUsize::new(0),
            mat: Mutex::new(Mat {
                rows: 0,
                cols,
                data: Vec::new(),
            }),
        }))
    }

    fn shape(&self, t: &CpuTensor) -> Shape {
        Shape {
            rows: t.rows(),
            cols: t.0.cols,
        }
    }

    fn read_row(&self, t: &CpuTensor, row: usize) -> Result<Vec<f32>> {
        self.flush()?;
        let m = lock(&t.0)?;
        m.data
            .get(row * m.cols..(row + 1) * m.cols)
            .map(<[f32]>::to_vec)
            .ok_or_else(|| Error::InvalidArgument(format!("row {row} of {}", m.rows)))
    }

    fn write(&self, t: &CpuTensor, rows: usize, data: Vec<f32>) -> Result<()> {
        t.will_have(rows);
        self.submit(Op::Write {
            t: t.0.clone(),
            rows,
            data,
        })
    }

    fn weight(&self, w: WeightData) -> Result<CpuWeight> {
        Ok(CpuWeight(Arc::new(w)))
    }

    fn weight_meta<'a>(&self, w: &'a CpuWeight) -> &'a WeightMeta {
        &w.0.meta
    }

    fn cache(&self, shape: CacheShape) -> CpuCache {
        CpuCache(Arc::new(CacheCell {
            shape,
            filled: (0..shape.n_layer).map(|_| AtomicUsize::new(0)).collect(),
            layers: Mutex::new((0..shape.n_layer).map(|_| LayerCache::default()).collect()),
        }))
    }

    fn cache_shape(&self, c: &CpuCache) -> CacheShape {
        c.0.shape
    }

    fn cache_filled(&self, c: &CpuCache, layer: usize) -> usize {
        c.0.filled
            .get(layer)
            .map_or(0, |f| f.load(Ordering::Relaxed))
    }

    fn embed(&self, table: &CpuWeight, ids: &[u32], scale: f32, o: &CpuTensor) -> Result<()> {
        o.will_have(ids.len());
        self.submit(Op::Embed {
            table: table.0.clone(),
            ids: ids.to_vec(),
            scale,
            o: o.0.clone(),
        })
    }

    fn matmul(&self, x: &CpuTensor, w: &CpuWeight, o: &CpuTensor) -> Result<()> {
        o.will_have(x.rows());
        self.submit(Op::Matmul {
            x: x.0.clone(),
            w: w.0.clone(),
            o: o.0.clone(),
        })
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuWeight, eps: f32, o: &CpuTensor) -> Result<()> {
        o.will_have(x.rows());
        self.submit(Op::RmsNorm {
            x: x.0.clone(),
            w: w.0.clone(),
            eps,
            o: o.0.clone(),
        })
    }

    fn rope(&self, x: &CpuTensor, pos: u32, p: &RopeParams, f: Option<&[f32]>) -> Result<()> {
        self.submit(Op::Rope {
            x: x.0.clone(),
            pos,
            p: *p,
            factors: f.map(<[f32]>::to_vec),
        })
    }

    fn attention(&self, a: Attention<'_, Self>, o: &CpuTensor) -> Result<()> {
        let rows = a.q.rows();
        o.will_have(rows);
        if let Some(f) = a.cache.0.filled.get(a.layer) {
            f.store(a.pos + rows, Ordering::Relaxed);
        }
        self.submit(Op::Attention {
            q: a.q.0.clone(),
            k: a.k.0.clone(),
            v: a.v.0.clone(),
            cache: a.cache.0.clone(),
            layer: a.layer,
            pos: a.pos,
            n_head: a.n_head,
            scale: a.scale,
            window: a.window,
            softcap: a.softcap,
            o: o.0.clone(),
        })
    }

    fn glu(&self, gate: &CpuTensor, up: &CpuTensor, act: Activation) -> Result<()> {
        self.submit(Op::Glu {
            gate: gate.0.clone(),
            up: up.0.clone(),
            act,
        })
    }

    fn add(&self, acc: &CpuTensor, x: &CpuTensor) -> Result<()> {
        self.submit(Op::Add {
            acc: acc.0.clone(),
            x: x.0.clone(),
        })
    }

    fn scale(&self, x: &CpuTensor, s: f32) -> Result<()> {
        self.submit(Op::Scale { x: x.0.clone(), s })
    }

    fn scale_rows(&self, x: &CpuTensor, s: &[f32]) -> Result<()> {
        self.submit(Op::ScaleRows {
            x: x.0.clone(),
            s: s.to_vec(),
        })
    }

    fn softmax(&self, x: &CpuTensor) -> Result<()> {
        self.submit(Op::Softmax { x: x.0.clone() })
    }

    fn keep_last_row(&self, x: &CpuTensor) -> Result<()> {
        x.will_have(x.rows().min(1));
        self.submit(Op::KeepLastRow { x: x.0.clone() })
    }

    fn rest(&self) {
        if let Some((b, id)) = &self.batcher
            && !self.in_step.get()
        {
            b.leave(*id);
        }
    }
}

/// A share's scratch (a panic while it was held leaves nothing that matters: it is
/// rewritten before every use).
fn scratch(s: &Mutex<Scratch>) -> MutexGuard<'_, Scratch> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl Exec {
    /// Runs one op on the tensors it names, with share `share`'s scratch.
    fn exec(&self, op: Op, share: usize) -> Result<()> {
        match op {
            Op::Write { t, rows, data } => {
                let mut m = lock(&t)?;
                m.rows = rows;
                m.data = data;
            }
            Op::Embed {
                table,
                ids,
                scale,
                o,
            } => {
                let mut o = lock(&o)?;
                embed(&table, &ids, scale, &mut o)?;
            }
            Op::Matmul { x, w, o } => {
                let (x, mut o) = (lock(&x)?, lock(&o)?);
                self.matmul_into(&x, &w, &mut o, share, true)?;
            }
            Op::RmsNorm { x, w, eps, o } => {
                let (x, mut o) = (lock(&x)?, lock(&o)?);
                let wv = w.meta.values.as_deref().unwrap_or_default();
                o.set_rows(x.rows);
                kernels::rms_norm(&x.data, wv, eps, &mut o.data);
            }
            Op::Rope { x, pos, p, factors } => {
                let mut t = lock(&x)?;
                let mut scratch = scratch(&self.scratch[share]);
                let cache = &mut scratch.rope;
                let cols = t.cols;
                for (i, row) in t.data.chunks_exact_mut(cols).enumerate() {
                    kernels::rope(
                        row,
                        &p,
                        factors.as_deref(),
                        pos.saturating_add(i as u32),
                        cache,
                    );
                }
            }
            Op::Attention {
                q,
                k,
                v,
                cache,
                layer,
                pos,
                n_head,
                scale,
                window,
                softcap,
                o,
            } => {
                let (q, k, v) = (lock(&q)?, lock(&k)?, lock(&v)?);
                let mut o = lock(&o)?;
                let c = cache.shape;
                let kv_width = c.n_head_kv * c.head_dim;
                let mut layers = cache.layers.lock().unwrap_or_else(|e| e.into_inner());
                let lc = layers
                    .get_mut(layer)
                    .ok_or_else(|| Error::InvalidArgument(format!("layer {layer}")))?;
                // Keys and values of positions pos… (a lower pos overwrites the tail), as f16.
                lc.k.truncate(pos * kv_width);
                lc.v.truncate(pos * kv_width);
                lc.k.extend(k.data.iter().map(|&x| f16::from_f32(x)));
                lc.v.extend(v.data.iter().map(|&x| f16::from_f32(x)));
                o.set_rows(q.rows);
                let shape = AttnShape {
                    n_head,
                    n_head_kv: c.n_head_kv,
                    head_dim: c.head_dim,
                    scale,
                    window,
                    softcap,
                    tiled: q.rows >= kernels::FA_TILE,
                };
                self.attend(&q, lc, pos, shape, &mut o, share);
            }
            Op::Glu { gate, up, act } => {
                let (g, mut u) = (lock(&gate)?, lock(&up)?);
                let act = match act {
                    Activation::Silu => kernels::Gate::Silu,
                    Activation::GeluTanh => kernels::Gate::GeluTanh,
                };
                kernels::glu(&g.data, &mut u.data, act);
            }
            Op::Add { acc, x } => {
                let (mut a, x) = (lock(&acc)?, lock(&x)?);
                a.data.iter_mut().zip(&x.data).for_each(|(a, &b)| *a += b);
            }
            Op::Scale { x, s } => lock(&x)?.data.iter_mut().for_each(|v| *v *= s),
            Op::ScaleRows { x, s } => {
                let mut t = lock(&x)?;
                let cols = t.cols.max(1);
                for (row, &s) in t.data.chunks_exact_mut(cols).zip(&s) {
                    row.iter_mut().for_each(|v| *v *= s);
                }
            }
            Op::Softmax { x } => {
                let mut t = lock(&x)?;
                let cols = t.cols;
                t.data.chunks_exact_mut(cols).for_each(kernels::softmax);
            }
            Op::KeepLastRow { x } => {
                let mut t = lock(&x)?;
                if t.rows > 1 {
                    let start = (t.rows - 1) * t.cols;
                    t.data.drain(..start);
                    t.rows = 1;
                }
            }
        }
        Ok(())
    }

    /// Runs a round: every tenant's step, op by op, each tenant's ops up to its next
    /// batchable matmul, then those matmuls with one product per weight (every tenant's
    /// rows copied in, and only its own copied back out); until every step is done. A
    /// step whose op fails stops there, with that error.
    fn run_round(&self, b: &Batcher, steps: Vec<(u64, Step)>) -> Vec<(u64, Result<()>)> {
        struct Run {
            id: u64,
            ops: std::vec::IntoIter<Op>,
            at: Option<Op>,
            result: Result<()>,
        }
        // Steps of a few rows (decode tokens) run side by side, one per share, between
        // the shared matmuls; a longer step (a prompt chunk) runs alone with each op on the
        // whole pool. On 16 cores, 16 tenants each running every small op on the whole
        // pool paid a pool barrier per attention and ran the rest on one core.
        let (mut small, mut long) = (Vec::new(), Vec::new());
        for (id, s) in steps {
            let rows = s.rows();
            let r = Mutex::new(Run {
                id,
                ops: s.0.into_iter(),
                at: None,
                result: Ok(()),
            });
            if rows <= SIDE_BY_SIDE_ROWS {
                small.push(r);
            } else {
                long.push(r);
            }
        }
        let small_count = small.len();
        let side_by_side = small_count > 1 && self.spin.size() > 1;
        let runs: Vec<Mutex<Run>> = long.into_iter().chain(small).collect();
        fn run(r: &Mutex<Run>) -> MutexGuard<'_, Run> {
            r.lock().unwrap_or_else(|e| e.into_inner())
        }
        // A run's ops up to its next shared matmul, on `share`'s scratch.
        let advance = |r: &mut Run, share: usize| {
            while r.at.is_none() && r.result.is_ok() {
                match r.ops.next() {
                    None => break,
                    Some(op) if op.batchable().is_some() => r.at = Some(op),
                    Some(op) => r.result = self.exec(op, share),
                }
            }
        };
        loop {
            if side_by_side {
                let (long, small) = runs.split_at(runs.len() - small_count);
                for r in long {
                    advance(&mut run(r), 0);
                }
                let next = AtomicUsize::new(0);
                self.spin.run(&|share| {
                    while let Some(r) = small.get(next.fetch_add(1, Ordering::Relaxed)) {
                        advance(&mut run(r), share);
                    }
                });
            } else {
                for r in &runs {
                    advance(&mut run(r), 0);
                }
            }
            let mut runs_now: Vec<MutexGuard<'_, Run>> = runs.iter().map(run).collect();
            // The weights the runs wait at, each with the runs waiting there.
            let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
            for (i, r) in runs_now.iter().enumerate() {
                if let Some(w) = r.at.as_ref().and_then(Op::batchable) {
                    let key = w.bytes().as_ptr() as usize;
                    match groups.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, g)) => g.push(i),
                        None => groups.push((key, vec![i])),
                    }
                }
            }
            if groups.is_empty() {
                break;
            }
            for (_, group) in groups {
                let ops: Vec<Op> = group
                    .iter()
                    .filter_map(|&i| runs_now[i].at.take())
                    .collect();
                let start = std::time::Instant::now();
                let results = self.matmul_shared(b, ops);
                b.count_product_time(start.elapsed());
                for (&i, r) in group.iter().zip(results) {
                    runs_now[i].result = r;
                }
            }
        }
        runs.into_iter()
            .map(|r| {
                let r = r.into_inner().unwrap_or_else(|e| e.into_inner());
                (r.id, r.result)
            })
            .collect()
    }

    /// Matmuls by one weight, one per tenant, as one product.
    fn matmul_shared(&self, b: &Batcher, ops: Vec<Op>) -> Vec<Result<()>> {
        let parts: Vec<(Arc<TensorCell>, Arc<WeightData>, Arc<TensorCell>)> = ops
            .into_iter()
            .filter_map(|op| match op {
                Op::Matmul { x, w, o } => Some((x, w, o)),
                _ => None,
            })
            .collect();
        if let [(x, w, o)] = &parts[..] {
            let r = lock(x).and_then(|x| self.matmul_into(&x, w, &mut *lock(o)?, 0, true));
            return vec![r];
        }
        // A K-quant product of a prompt's rows has its own order (ggml's tiled kernel), so
        // such a part cannot share: every part runs as it would alone.
        let prompt = |x: &Arc<TensorCell>| lock(x).is_ok_and(|x| x.rows >= quant::K_TILED_ROWS);
        if let Some((_, w, _)) = parts.first()
            && quant::k_tiled(w.meta.ty, quant::K_TILED_ROWS)
            && parts.iter().any(|(x, _, _)| prompt(x))
        {
            return parts
                .iter()
                .map(|(x, w, o)| {
                    lock(x).and_then(|x| self.matmul_into(&x, w, &mut *lock(o)?, 0, true))
                })
                .collect();
        }
        let Some((_, w, _)) = parts.first() else {
            return Vec::new();
        };
        let (k, n) = (w.meta.row_len(), w.meta.n_rows());
        let mut all = Mat {
            rows: 0,
            cols: k,
            data: Vec::new(),
        };
        let mut rows = Vec::with_capacity(parts.len());
        for (x, _, _) in &parts {
            match lock(x) {
                Ok(x) => {
                    all.data.extend_from_slice(&x.data[..x.rows * k]);
                    all.rows += x.rows;
                    rows.push(Ok(x.rows));
                }
                Err(e) => rows.push(Err(e)),
            }
        }
        b.count_shared(all.rows);
        let mut outs = Mat {
            rows: 0,
            cols: n,
            data: Vec::new(),
        };
        let product = self.matmul_into(&all, w, &mut outs, 0, false);
        let mut start = 0;
        parts
            .iter()
            .zip(rows)
            .map(|((_, _, o), r)| {
                let r = r?;
                let at = start;
                start += r * n;
                product.clone()?;
                let mut o = lock(o)?;
                o.set_rows(r);
                o.data.copy_from_slice(&outs.data[at..at + r * n]);
                Ok(())
            })
            .collect()
    }

    /// `x` × `w` into `o`. `own_rows`: the rows are one tenant's step (so a K-quant product
    /// of [`quant::K_TILED_ROWS`] or more takes ggml's tiled order, as llama.cpp's prompt
    /// matmuls do), not several tenants' rows side by side (each as it would be alone).
    fn matmul_into(
        &self,
        x: &Mat,
        w: &WeightData,
        o: &mut Mat,
        share: usize,
        own_rows: bool,
    ) -> Result<()> {
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
        let mut scratch = scratch(&self.scratch[share]);
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
        if own_rows && quant::k_tiled(ty, rows) {
            // A prompt's K-quant product in ggml's tiled order, each share its weight rows.
            let dst = Shared::new(&mut o.data);
            let xq_ref = &xq;
            spin.run(&|share| {
                thread_local! {
                    static ROW: RefCell<quant::KRow> = RefCell::default();
                }
                ROW.with_borrow_mut(|row| {
                    for j in pool::part(n, shares, share, 4) {
                        row.unpack(ty, &wb[j * wrow..(j + 1) * wrow]);
                        let four = xq_ref.chunks_exact(4 * qrow);
                        let rest = four.remainder();
                        let full = xq_ref.len() / (4 * qrow) * 4;
                        for (g, x4) in four.enumerate() {
                            let x = |i: usize| &x4[i * qrow..(i + 1) * qrow];
                            let v = row.dot4([x(0), x(1), x(2), x(3)]);
                            for (i, v) in v.into_iter().enumerate() {
                                // SAFETY: shares own disjoint columns of every row.
                                let out = unsafe { dst.slice((4 * g + i) * n + j, 1) };
                                out[0] = v;
                            }
                        }
                        for (i, xr) in rest.chunks_exact(qrow).enumerate() {
                            // SAFETY: as above.
                            let out = unsafe { dst.slice((full + i) * n + j, 1) };
                            out[0] = row.dot(xr);
                        }
                    }
                });
            });
            scratch.quantized = xq;
            return Ok(());
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
    fn attend(
        &self,
        q: &Mat,
        lc: &LayerCache,
        pos: usize,
        shape: AttnShape,
        o: &mut Mat,
        share: usize,
    ) {
        let (n, n_head, hd, cols) = (q.rows, shape.n_head, shape.head_dim, q.cols);
        // Batches of 64 rows or more: ggml's tiled numerics over f32 copies of the cache,
        // made once for all rows.
        let mut scratch = scratch(&self.scratch[share]);
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
        // Inside a round's share (tenants side by side) the job runs here, whole: every
        // part on this share's buffer, which no other thread takes.
        let outer = pool::nested().then_some(share);
        spin.run(&|share| {
            let mut buf = attn[outer.unwrap_or(share) % attn.len()]
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

/// out[i] = scale × row `ids[i]` of `table`.
fn embed(table: &WeightData, ids: &[u32], scale: f32, o: &mut Mat) -> Result<()> {
    let meta = &table.meta;
    let row_len = meta.row_len();
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
