//! Partial offload (`--gpu-layers N`): the first `N` transformer blocks on one backend (the
//! GPU), everything else on another (the CPU), for models larger than the GPU's memory.
//!
//! A weight's place comes from its tensor's name in the file (`blk.{i}.…`, read from the
//! GGUF header once per file): blocks below `N` go to the first backend, other blocks and
//! the embedding, final norm and output to the second. An op runs where its weight is (a
//! matmul, a norm, an embedding) or where its first input is (the rest); inputs elsewhere
//! are copied over first, so activations cross the boundary once each way per step.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use realm_compute::{
    Activation, Attention, Backend, CacheShape, Result, RopeParams, Shape, WeightData, WeightMeta,
};

/// Two backends, the first taking the first `layers` blocks.
pub struct Split<G: Backend, C: Backend> {
    gpu: G,
    cpu: C,
    layers: usize,
    /// Per model file (by address): tensor offset → block index, from its header.
    blocks: RefCell<HashMap<usize, Arc<HashMap<usize, usize>>>>,
    placed: Arc<Placed>,
}

/// What a split backend placed and moved so far.
#[derive(Debug, Default)]
pub struct Placed {
    /// Weights on the first (GPU) side and on the second.
    pub gpu_weights: AtomicU64,
    pub cpu_weights: AtomicU64,
    /// Tensors copied from one side to the other.
    pub moves: AtomicU64,
}

/// A tensor with a home on each side; `on_gpu` says which holds its contents.
pub struct SplitTensor<G: Backend, C: Backend> {
    gpu: G::Tensor,
    cpu: C::Tensor,
    on_gpu: Cell<bool>,
}

/// A weight on one side.
pub enum SplitWeight<G: Backend, C: Backend> {
    Gpu(G::Weight),
    Cpu(C::Weight),
}

/// Each side's cache (each allocates only the layers it is given).
pub struct SplitCache<G: Backend, C: Backend> {
    gpu: G::Cache,
    cpu: C::Cache,
}

impl<G: Backend, C: Backend> Split<G, C> {
    pub fn new(gpu: G, cpu: C, layers: usize) -> Self {
        Self {
            gpu,
            cpu,
            layers,
            blocks: RefCell::default(),
            placed: Arc::default(),
        }
    }

    /// Its placement counters (shared: they stay readable after the backend moves).
    pub fn placed(&self) -> Arc<Placed> {
        self.placed.clone()
    }

    /// The block index of the tensor at `w.offset`, if it is in one.
    fn block_of(&self, w: &WeightData) -> Result<Option<usize>> {
        let key = w.file.bytes().as_ptr() as usize;
        let known = self.blocks.borrow().get(&key).cloned();
        let map = match known {
            Some(m) => m,
            None => {
                let file = realm_gguf::GgufFile::read(w.file.bytes()).map_err(|e| {
                    realm_compute::Error::InvalidArgument(format!("--gpu-layers: {e}"))
                })?;
                let m: HashMap<usize, usize> = file
                    .tensors
                    .iter()
                    .filter_map(|t| {
                        let i = t
                            .name
                            .strip_prefix("blk.")?
                            .split('.')
                            .next()?
                            .parse()
                            .ok()?;
                        Some((t.offset as usize, i))
                    })
                    .collect();
                let m = Arc::new(m);
                self.blocks.borrow_mut().insert(key, m.clone());
                m
            }
        };
        Ok(map.get(&w.offset).copied())
    }

    /// Moves `t`'s contents to the GPU side (`true`) or the CPU side.
    fn to(&self, t: &SplitTensor<G, C>, gpu: bool) -> Result<()> {
        if t.on_gpu.get() == gpu {
            return Ok(());
        }
        let (rows, data) = if gpu {
            read_all(&self.cpu, &t.cpu)?
        } else {
            read_all(&self.gpu, &t.gpu)?
        };
        if gpu {
            self.gpu.write(&t.gpu, rows, data)?;
        } else {
            self.cpu.write(&t.cpu, rows, data)?;
        }
        t.on_gpu.set(gpu);
        self.placed.moves.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Every row of `t` on `b`.
fn read_all<B: Backend>(b: &B, t: &B::Tensor) -> Result<(usize, Vec<f32>)> {
    let Shape { rows, cols } = b.shape(t);
    let mut data = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        data.extend(b.read_row(t, r)?);
    }
    Ok((rows, data))
}

impl<G: Backend, C: Backend> Backend for Split<G, C> {
    type Tensor = SplitTensor<G, C>;
    type Weight = SplitWeight<G, C>;
    type Cache = SplitCache<G, C>;

    fn name(&self) -> &'static str {
        "cuda+cpu"
    }

    fn max_kv_elements(&self) -> u64 {
        self.gpu.max_kv_elements().min(self.cpu.max_kv_elements())
    }

    fn tensor(&self, cols: usize) -> Self::Tensor {
        SplitTensor {
            gpu: self.gpu.tensor(cols),
            cpu: self.cpu.tensor(cols),
            on_gpu: Cell::new(false),
        }
    }

    fn shape(&self, t: &Self::Tensor) -> Shape {
        if t.on_gpu.get() {
            self.gpu.shape(&t.gpu)
        } else {
            self.cpu.shape(&t.cpu)
        }
    }

    fn read_row(&self, t: &Self::Tensor, row: usize) -> Result<Vec<f32>> {
        if t.on_gpu.get() {
            self.gpu.read_row(&t.gpu, row)
        } else {
            self.cpu.read_row(&t.cpu, row)
        }
    }

    fn write(&self, t: &Self::Tensor, rows: usize, data: Vec<f32>) -> Result<()> {
        t.on_gpu.set(false);
        self.cpu.write(&t.cpu, rows, data)
    }

    fn weight(&self, w: WeightData) -> Result<Self::Weight> {
        Ok(match self.block_of(&w)? {
            Some(i) if i < self.layers => {
                self.placed.gpu_weights.fetch_add(1, Ordering::Relaxed);
                SplitWeight::Gpu(self.gpu.weight(w)?)
            }
            _ => {
                self.placed.cpu_weights.fetch_add(1, Ordering::Relaxed);
                SplitWeight::Cpu(self.cpu.weight(w)?)
            }
        })
    }

    fn weight_meta<'a>(&self, w: &'a Self::Weight) -> &'a WeightMeta {
        match w {
            SplitWeight::Gpu(w) => self.gpu.weight_meta(w),
            SplitWeight::Cpu(w) => self.cpu.weight_meta(w),
        }
    }

    fn cache(&self, shape: CacheShape) -> Self::Cache {
        SplitCache {
            gpu: self.gpu.cache(shape),
            cpu: self.cpu.cache(shape),
        }
    }

    fn cache_shape(&self, c: &Self::Cache) -> CacheShape {
        self.cpu.cache_shape(&c.cpu)
    }

    fn cache_filled(&self, c: &Self::Cache, layer: usize) -> usize {
        self.gpu
            .cache_filled(&c.gpu, layer)
            .max(self.cpu.cache_filled(&c.cpu, layer))
    }

    fn embed(&self, table: &Self::Weight, ids: &[u32], scale: f32, o: &Self::Tensor) -> Result<()> {
        match table {
            SplitWeight::Gpu(w) => {
                o.on_gpu.set(true);
                self.gpu.embed(w, ids, scale, &o.gpu)
            }
            SplitWeight::Cpu(w) => {
                o.on_gpu.set(false);
                self.cpu.embed(w, ids, scale, &o.cpu)
            }
        }
    }

    fn matmul(&self, x: &Self::Tensor, w: &Self::Weight, o: &Self::Tensor) -> Result<()> {
        match w {
            SplitWeight::Gpu(w) => {
                self.to(x, true)?;
                o.on_gpu.set(true);
                self.gpu.matmul(&x.gpu, w, &o.gpu)
            }
            SplitWeight::Cpu(w) => {
                self.to(x, false)?;
                o.on_gpu.set(false);
                self.cpu.matmul(&x.cpu, w, &o.cpu)
            }
        }
    }

    fn rms_norm(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        eps: f32,
        o: &Self::Tensor,
    ) -> Result<()> {
        match w {
            SplitWeight::Gpu(w) => {
                self.to(x, true)?;
                o.on_gpu.set(true);
                self.gpu.rms_norm(&x.gpu, w, eps, &o.gpu)
            }
            SplitWeight::Cpu(w) => {
                self.to(x, false)?;
                o.on_gpu.set(false);
                self.cpu.rms_norm(&x.cpu, w, eps, &o.cpu)
            }
        }
    }

    fn rope(&self, x: &Self::Tensor, pos: u32, p: &RopeParams, f: Option<&[f32]>) -> Result<()> {
        if x.on_gpu.get() {
            self.gpu.rope(&x.gpu, pos, p, f)
        } else {
            self.cpu.rope(&x.cpu, pos, p, f)
        }
    }

    fn attention(&self, a: Attention<'_, Self>, o: &Self::Tensor) -> Result<()> {
        let gpu = a.q.on_gpu.get();
        self.to(a.k, gpu)?;
        self.to(a.v, gpu)?;
        o.on_gpu.set(gpu);
        // The same arguments on either side's tensors and cache.
        macro_rules! on {
            ($backend:expr, $side:ident) => {
                $backend.attention(
                    Attention {
                        q: &a.q.$side,
                        k: &a.k.$side,
                        v: &a.v.$side,
                        cache: &a.cache.$side,
                        layer: a.layer,
                        pos: a.pos,
                        n_head: a.n_head,
                        scale: a.scale,
                        window: a.window,
                        softcap: a.softcap,
                    },
                    &o.$side,
                )
            };
        }
        if gpu {
            on!(self.gpu, gpu)
        } else {
            on!(self.cpu, cpu)
        }
    }

    fn glu(&self, gate: &Self::Tensor, up: &Self::Tensor, act: Activation) -> Result<()> {
        let gpu = up.on_gpu.get();
        self.to(gate, gpu)?;
        if gpu {
            self.gpu.glu(&gate.gpu, &up.gpu, act)
        } else {
            self.cpu.glu(&gate.cpu, &up.cpu, act)
        }
    }

    fn add(&self, acc: &Self::Tensor, x: &Self::Tensor) -> Result<()> {
        let gpu = acc.on_gpu.get();
        self.to(x, gpu)?;
        if gpu {
            self.gpu.add(&acc.gpu, &x.gpu)
        } else {
            self.cpu.add(&acc.cpu, &x.cpu)
        }
    }

    fn scale_rows(&self, x: &Self::Tensor, s: &[f32]) -> Result<()> {
        if x.on_gpu.get() {
            self.gpu.scale_rows(&x.gpu, s)
        } else {
            self.cpu.scale_rows(&x.cpu, s)
        }
    }

    fn scale(&self, x: &Self::Tensor, s: f32) -> Result<()> {
        if x.on_gpu.get() {
            self.gpu.scale(&x.gpu, s)
        } else {
            self.cpu.scale(&x.cpu, s)
        }
    }

    fn softmax(&self, x: &Self::Tensor) -> Result<()> {
        if x.on_gpu.get() {
            self.gpu.softmax(&x.gpu)
        } else {
            self.cpu.softmax(&x.cpu)
        }
    }

    fn keep_last_row(&self, x: &Self::Tensor) -> Result<()> {
        if x.on_gpu.get() {
            self.gpu.keep_last_row(&x.gpu)
        } else {
            self.cpu.keep_last_row(&x.cpu)
        }
    }

    fn rest(&self) {
        self.gpu.rest();
        self.cpu.rest();
    }
}
