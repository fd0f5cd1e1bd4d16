//! The host side of `realm:compute`: model files (memory-mapped once, shared by every
//! tenant), weights as validated ranges of them, f32 activation tensors and f16 KV caches,
//! and the ops. Every handle, shape and offset from the guest is checked here again.

pub mod residency;
pub mod spin;

#[cfg(target_arch = "x86_64")]
#[cfg(target_arch = "x86_64")]
use realm_kernels::amx;
use realm_kernels::{avx2, avx512};
pub use realm_kernels::{kernels, ops, quant};

use std::collections::HashMap;
use std::sync::Arc;

use half::f16;
use memmap2::Mmap;
use rayon::prelude::*;
use realm_gguf::GgmlType;
use wasmtime::component::{Resource, ResourceTable};

use crate::bindings::realm::compute::{store, tensors, types};
use crate::bindings::{Activation, ComputeError, Dtype, RopeMode, RopeParams};
use quant::VecDot;

/// A model file mapped into the host's memory, shared read-only.
#[derive(Debug)]
pub struct MappedModel {
    pub name: String,
    pub path: std::path::PathBuf,
    pub map: Mmap,
}

impl MappedModel {
    pub fn open(name: &str, path: &std::path::Path) -> std::io::Result<Arc<Self>> {
        let file = std::fs::File::open(path)?;
        // SAFETY: the map is read-only; Realm never writes model files, and a file truncated
        // underneath a running process is outside what any mmap-based runtime can defend.
        let map = unsafe { Mmap::map(&file)? };
        Ok(Arc::new(Self {
            name: name.into(),
            path: path.into(),
            map,
        }))
    }
}

pub struct ModelFileRes {
    model: Arc<MappedModel>,
}

/// A weight: a checked byte range of a mapped file. Small f32/f16 weights (norms) are
/// decoded once; quantized ones are used in place.
pub struct WeightRes {
    model: Arc<MappedModel>,
    offset: usize,
    len: usize,
    ty: GgmlType,
    dims: Vec<u64>,
    decoded: Option<Vec<f32>>,
    /// The weight store's unit for weights used in place (None once decoded).
    unit: Option<usize>,
}

impl WeightRes {
    fn view(&self) -> ops::WeightView<'_> {
        ops::WeightView {
            ty: self.ty,
            dims: &self.dims,
            bytes: self.bytes(),
            decoded: self.decoded.as_deref(),
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.model.map[self.offset..self.offset + self.len]
    }

    fn row_len(&self) -> usize {
        self.dims[0] as usize
    }

    fn n_rows(&self) -> usize {
        self.dims[1..].iter().product::<u64>() as usize
    }
}

/// An f32 activation tensor (shared with the WebAssembly provider).
pub type TensorRes = realm_kernels::ops::Tensor;

/// A KV cache (shared with the WebAssembly provider).
pub type KvCacheRes = realm_kernels::ops::KvCache;

/// Largest tensor a guest may make the host allocate (elements).
pub use realm_kernels::ops::MAX_TENSOR_ELEMENTS;
/// Largest KV cache (f16 values, keys and values together).
pub const MAX_KV_ELEMENTS: u64 = 1 << 32;

/// Per-Store compute state: the resource table, the models this guest may open, the
/// thread pool, and scratch buffers reused across calls (nothing allocated per token).
pub struct ComputeState {
    pub table: ResourceTable,
    pub models: HashMap<String, Arc<MappedModel>>,
    pub pool: Arc<rayon::ThreadPool>,
    /// Spinning workers for the per-token matmuls (see `spin`).
    pub spin: Arc<spin::SpinPool>,
    quantized: Vec<u8>,
    /// A prompt's activations repacked for the AVX-512 tiles.
    #[cfg(target_arch = "x86_64")]
    packed: avx512::Packed,
    /// The same for the AMX tiles (`REALM_KERNELS=amx`).
    #[cfg(target_arch = "x86_64")]
    packed_amx: amx::Packed,
    /// Per spin-pool share: attention scratch (q in f16 and the f16 accumulator).
    attn_scratch: Vec<std::sync::Mutex<Vec<f16>>>,
    /// The cache in f32 for tiled attention (batches of 64 rows or more).
    tiled_kv: kernels::TiledKv,
    rope_cache: Vec<(f32, f32)>,
    pub stats: Stats,
    pub store: residency::WeightStore,
}

/// Counters for `--json` and `realm bench`.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub calls: u64,
    pub matmul_ns: u64,
    pub attention_ns: u64,
    pub other_ns: u64,
}

impl ComputeState {
    pub fn new(
        models: HashMap<String, Arc<MappedModel>>,
        pool: Arc<rayon::ThreadPool>,
        spin: Arc<spin::SpinPool>,
        max_resident: Option<u64>,
    ) -> Self {
        let shares = spin.size();
        Self {
            table: ResourceTable::new(),
            models,
            pool,
            spin,
            quantized: Vec::new(),
            #[cfg(target_arch = "x86_64")]
            packed: avx512::Packed::default(),
            #[cfg(target_arch = "x86_64")]
            packed_amx: amx::Packed::default(),
            tiled_kv: kernels::TiledKv::default(),
            attn_scratch: (0..shares)
                .map(|_| std::sync::Mutex::new(Vec::new()))
                .collect(),
            rope_cache: Vec::new(),
            stats: Stats::default(),
            store: residency::WeightStore::new(max_resident),
        }
    }
}

type Res<T> = Result<T, ComputeError>;

fn invalid(msg: impl Into<String>) -> ComputeError {
    ComputeError::InvalidArgument(msg.into())
}

fn handle<E: std::fmt::Display>(e: E) -> ComputeError {
    invalid(format!("bad handle: {e}"))
}

fn op_error(e: ops::OpError) -> ComputeError {
    use ops::OpError;
    match e {
        OpError::InvalidArgument(m) => ComputeError::InvalidArgument(m),
        OpError::OutOfBounds(m) => ComputeError::OutOfBounds(m),
        OpError::Unsupported(m) => ComputeError::Unsupported(m),
        OpError::ResourceExhausted(m) => ComputeError::ResourceExhausted(m),
    }
}

fn ggml_type(d: Dtype) -> GgmlType {
    match d {
        Dtype::F32 => GgmlType::F32,
        Dtype::F16 => GgmlType::F16,
        Dtype::Bf16 => GgmlType::BF16,
        Dtype::Q40 => GgmlType::Q4_0,
        Dtype::Q41 => GgmlType::Q4_1,
        Dtype::Q50 => GgmlType::Q5_0,
        Dtype::Q51 => GgmlType::Q5_1,
        Dtype::Q80 => GgmlType::Q8_0,
        Dtype::Q81 => GgmlType::Q8_1,
        Dtype::Q2k => GgmlType::Q2_K,
        Dtype::Q3k => GgmlType::Q3_K,
        Dtype::Q4k => GgmlType::Q4_K,
        Dtype::Q5k => GgmlType::Q5_K,
        Dtype::Q6k => GgmlType::Q6_K,
        Dtype::Q8k => GgmlType::Q8_K,
    }
}

impl types::Host for ComputeState {}

impl store::Host for ComputeState {
    fn set_max_resident(&mut self, bytes: u64) {
        self.store.set_budget((bytes > 0).then_some(bytes));
    }

    fn prefetch(&mut self, w: Resource<WeightRes>) {
        if let Some(unit) = self.table.get(&w).ok().and_then(|w| w.unit) {
            self.store.prefetch(unit);
        }
    }

    fn open_model(&mut self, name: String) -> Res<Resource<ModelFileRes>> {
        let model = self.models.get(&name).cloned().ok_or_else(|| {
            let mut known: Vec<&str> = self.models.keys().map(String::as_str).collect();
            known.sort_unstable();
            ComputeError::NotFound(format!(
                "no model named '{name}' (available: {})",
                known.join(", ")
            ))
        })?;
        self.table
            .push(ModelFileRes { model })
            .map_err(|e| ComputeError::ResourceExhausted(e.to_string()))
    }
}

impl store::HostModelFile for ComputeState {
    fn size(&mut self, f: Resource<ModelFileRes>) -> u64 {
        self.table
            .get(&f)
            .map(|f| f.model.map.len() as u64)
            .unwrap_or(0)
    }

    fn read(&mut self, f: Resource<ModelFileRes>, offset: u64, len: u32) -> Res<Vec<u8>> {
        let f = self.table.get(&f).map_err(handle)?;
        let size = f.model.map.len() as u64;
        let end = offset
            .checked_add(u64::from(len))
            .filter(|&e| e <= size)
            .ok_or_else(|| {
                ComputeError::OutOfBounds(format!(
                    "read of {len} bytes at {offset} passes the end of the file ({size} bytes)"
                ))
            })?;
        Ok(f.model.map[offset as usize..end as usize].to_vec())
    }

    fn weight(
        &mut self,
        f: Resource<ModelFileRes>,
        offset: u64,
        dtype: Dtype,
        dims: Vec<u64>,
    ) -> Res<Resource<WeightRes>> {
        let model = self.table.get(&f).map_err(handle)?.model.clone();
        let ty = ggml_type(dtype);
        let ops::CheckedWeight {
            offset,
            len,
            decoded,
        } = ops::check_weight(&model.map, offset, ty, &dims).map_err(op_error)?;
        let unit = decoded
            .is_none()
            .then(|| self.store.register(model.clone(), offset, len));
        let w = WeightRes {
            model,
            offset,
            len,
            ty,
            dims,
            decoded,
            unit,
        };
        self.table
            .push(w)
            .map_err(|e| ComputeError::ResourceExhausted(e.to_string()))
    }

    fn drop(&mut self, f: Resource<ModelFileRes>) -> wasmtime::Result<()> {
        self.table.delete(f)?;
        Ok(())
    }
}

impl store::HostWeight for ComputeState {
    fn dims(&mut self, w: Resource<WeightRes>) -> Vec<u64> {
        self.table
            .get(&w)
            .map(|w| w.dims.clone())
            .unwrap_or_default()
    }

    fn drop(&mut self, w: Resource<WeightRes>) -> wasmtime::Result<()> {
        self.table.delete(w)?;
        Ok(())
    }
}

impl tensors::HostTensor for ComputeState {
    fn new(&mut self, cols: u32) -> Resource<TensorRes> {
        // A zero-width tensor is allowed to exist; every op rejects it.
        self.table
            .push(TensorRes::new(cols as usize))
            .unwrap_or_else(|_| Resource::new_own(u32::MAX))
    }

    fn rows(&mut self, t: Resource<TensorRes>) -> u32 {
        self.table.get(&t).map(|t| t.rows as u32).unwrap_or(0)
    }

    fn cols(&mut self, t: Resource<TensorRes>) -> u32 {
        self.table.get(&t).map(|t| t.cols as u32).unwrap_or(0)
    }

    fn read_row(&mut self, t: Resource<TensorRes>, row: u32) -> Res<Vec<f32>> {
        let t = self.table.get(&t).map_err(handle)?;
        Ok(t.row(row as usize).map_err(op_error)?.to_vec())
    }

    fn write(&mut self, t: Resource<TensorRes>, rows: u32, data: Vec<f32>) -> Res<()> {
        let t = self.table.get_mut(&t).map_err(handle)?;
        t.write(rows as usize, data).map_err(op_error)
    }

    fn drop(&mut self, t: Resource<TensorRes>) -> wasmtime::Result<()> {
        self.table.delete(t)?;
        Ok(())
    }
}

impl tensors::HostKvCache for ComputeState {
    fn new(
        &mut self,
        n_layer: u32,
        n_ctx: u32,
        n_head_kv: u32,
        head_dim: u32,
    ) -> Resource<KvCacheRes> {
        let c = KvCacheRes::new(n_layer, n_ctx, n_head_kv, head_dim);
        self.table
            .push(c)
            .unwrap_or_else(|_| Resource::new_own(u32::MAX))
    }

    fn capacity(&mut self, c: Resource<KvCacheRes>) -> u32 {
        self.table.get(&c).map(|c| c.n_ctx as u32).unwrap_or(0)
    }

    fn drop(&mut self, c: Resource<KvCacheRes>) -> wasmtime::Result<()> {
        self.table.delete(c)?;
        Ok(())
    }
}

fn distinct<A, B>(a: &Resource<A>, b: &Resource<B>) -> Res<()> {
    if a.rep() == b.rep() {
        Err(invalid(
            "an op's output must be a different tensor from its inputs",
        ))
    } else {
        Ok(())
    }
}

impl ComputeState {
    /// Take a tensor's buffer out of the table (to write it while reading others).
    fn take(&mut self, t: &Resource<TensorRes>) -> Res<TensorRes> {
        let t = self.table.get_mut(t).map_err(handle)?;
        Ok(std::mem::replace(t, TensorRes::new(t.cols)))
    }

    fn put(&mut self, t: &Resource<TensorRes>, value: TensorRes) -> Res<()> {
        *self.table.get_mut(t).map_err(handle)? = value;
        Ok(())
    }

    fn timed<T>(
        &mut self,
        bucket: fn(&mut Stats) -> &mut u64,
        f: impl FnOnce(&mut Self) -> T,
    ) -> T {
        let start = std::time::Instant::now();
        let r = f(self);
        self.stats.calls += 1;
        *bucket(&mut self.stats) += start.elapsed().as_nanos() as u64;
        r
    }
}

impl tensors::Host for ComputeState {
    fn embed(
        &mut self,
        table: Resource<WeightRes>,
        ids: Vec<u32>,
        scale: f32,
        out: Resource<TensorRes>,
    ) -> Res<()> {
        if let Some(unit) = self.table.get(&table).map_err(handle)?.unit {
            self.store.touch(unit);
        }
        self.timed(
            |s| &mut s.other_ns,
            |st| {
                let mut o = st.take(&out)?;
                let r = st
                    .table
                    .get(&table)
                    .map_err(handle)
                    .and_then(|w| ops::embed(&w.view(), &ids, scale, &mut o).map_err(op_error));
                st.put(&out, o)?;
                r
            },
        )
    }

    fn matmul(
        &mut self,
        x: Resource<TensorRes>,
        w: Resource<WeightRes>,
        out: Resource<TensorRes>,
    ) -> Res<()> {
        distinct(&x, &out)?;
        self.timed(
            |s| &mut s.matmul_ns,
            |st| {
                let mut o = st.take(&out)?;
                let r = st.matmul_into(&x, &w, &mut o);
                st.put(&out, o)?;
                r
            },
        )
    }

    fn rms_norm(
        &mut self,
        x: Resource<TensorRes>,
        w: Resource<WeightRes>,
        eps: f32,
        out: Resource<TensorRes>,
    ) -> Res<()> {
        distinct(&x, &out)?;
        self.timed(
            |s| &mut s.other_ns,
            |st| {
                let mut o = st.take(&out)?;
                let r = (|| {
                    let xt = st.table.get(&x).map_err(handle)?;
                    let wt = st.table.get(&w).map_err(handle)?;
                    ops::rms_norm(xt, wt.decoded.as_deref(), eps, &mut o).map_err(op_error)
                })();
                st.put(&out, o)?;
                r
            },
        )
    }

    fn rope(
        &mut self,
        x: Resource<TensorRes>,
        pos: u32,
        params: RopeParams,
        factors: Option<Resource<WeightRes>>,
    ) -> Res<()> {
        self.timed(
            |s| &mut s.other_ns,
            |st| {
                let mut cache = std::mem::take(&mut st.rope_cache);
                let mut t = st.take(&x)?;
                let r = (|| {
                    let f = match &factors {
                        Some(w) => Some(st.table.get(w).map_err(handle)?.decoded.as_deref()),
                        None => None,
                    };
                    ops::rope(&mut t, pos, &rope_params(&params), f, &mut cache).map_err(op_error)
                })();
                st.put(&x, t)?;
                st.rope_cache = cache;
                r
            },
        )
    }

    #[allow(clippy::too_many_arguments, reason = "mirrors the WIT signature")]
    fn attention(
        &mut self,
        q: Resource<TensorRes>,
        k: Resource<TensorRes>,
        v: Resource<TensorRes>,
        cache: Resource<KvCacheRes>,
        layer: u32,
        pos: u32,
        n_head: u32,
        scale: f32,
        window: u32,
        out: Resource<TensorRes>,
    ) -> Res<()> {
        distinct(&q, &out)?;
        distinct(&k, &out)?;
        distinct(&v, &out)?;
        self.timed(
            |s| &mut s.attention_ns,
            |st| {
                let mut o = st.take(&out)?;
                let r = st.attention_into(
                    &q,
                    &k,
                    &v,
                    &cache,
                    layer as usize,
                    pos as usize,
                    n_head as usize,
                    scale,
                    window as usize,
                    &mut o,
                );
                st.put(&out, o)?;
                r
            },
        )
    }

    fn glu(
        &mut self,
        gate: Resource<TensorRes>,
        up: Resource<TensorRes>,
        act: Activation,
    ) -> Res<()> {
        distinct(&gate, &up)?;
        self.timed(
            |s| &mut s.other_ns,
            |st| {
                let mut u = st.take(&up)?;
                let r = (|| {
                    let g = st.table.get(&gate).map_err(handle)?;
                    let f = match act {
                        Activation::Silu => kernels::Gate::Silu,
                        Activation::GeluTanh => kernels::Gate::GeluTanh,
                    };
                    ops::glu(g, &mut u, f).map_err(op_error)
                })();
                st.put(&up, u)?;
                r
            },
        )
    }

    fn add(&mut self, acc: Resource<TensorRes>, x: Resource<TensorRes>) -> Res<()> {
        distinct(&acc, &x)?;
        self.timed(
            |s| &mut s.other_ns,
            |st| {
                let mut a = st.take(&acc)?;
                let r = (|| {
                    let xt = st.table.get(&x).map_err(handle)?;
                    ops::add(&mut a, xt).map_err(op_error)
                })();
                st.put(&acc, a)?;
                r
            },
        )
    }

    fn scale(&mut self, x: Resource<TensorRes>, s: f32) -> Res<()> {
        let t = self.table.get_mut(&x).map_err(handle)?;
        t.data.iter_mut().for_each(|v| *v *= s);
        Ok(())
    }

    fn softmax(&mut self, x: Resource<TensorRes>) -> Res<()> {
        let t = self.table.get_mut(&x).map_err(handle)?;
        ops::softmax(t).map_err(op_error)
    }

    fn keep_last_row(&mut self, x: Resource<TensorRes>) -> Res<()> {
        let t = self.table.get_mut(&x).map_err(handle)?;
        ops::keep_last_row(t);
        Ok(())
    }
}

/// An output buffer the shares of a [`spin::SpinPool`] job write disjoint parts of.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32, usize);

// SAFETY: used only to hand disjoint sub-slices to the shares of one job, which the
// job's owner waits for before touching the buffer again.
unsafe impl Sync for SharedOut {}
unsafe impl Send for SharedOut {}

/// [`SharedOut`] for bytes.
#[derive(Clone, Copy)]
struct SharedBytes(*mut u8, usize);

// SAFETY: as for `SharedOut`.
unsafe impl Sync for SharedBytes {}
unsafe impl Send for SharedBytes {}

impl SharedBytes {
    /// # Safety
    /// No other live slice may overlap this one.
    #[allow(clippy::mut_from_ref, reason = "disjointness is the caller's contract")]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [u8] {
        assert!(start + len <= self.1, "slice past the buffer");
        // SAFETY: in bounds (checked); disjointness is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

impl SharedOut {
    /// `len` values from `start`.
    ///
    /// # Safety
    /// No other live slice may overlap this one.
    #[allow(clippy::mut_from_ref, reason = "disjointness is the caller's contract")]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start + len <= self.1, "slice past the buffer");
        // SAFETY: in bounds (checked); disjointness is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

impl ComputeState {
    fn matmul_into(
        &mut self,
        x: &Resource<TensorRes>,
        w: &Resource<WeightRes>,
        o: &mut TensorRes,
    ) -> Res<()> {
        if let Some(unit) = self.table.get(w).map_err(handle)?.unit {
            self.store.touch(unit);
        }
        let mut xq = std::mem::take(&mut self.quantized);
        let xt = self.table.get(x).map_err(handle)?;
        let wt = self.table.get(w).map_err(handle)?;
        let (k, n) = (wt.row_len(), wt.n_rows());
        if xt.cols != k || o.cols != n {
            return Err(invalid(format!(
                "matmul of a {}-wide input by a {k}→{n} weight into width {}",
                xt.cols, o.cols
            )));
        }
        o.set_rows(xt.rows).map_err(op_error)?;
        let rows = xt.rows;
        let pool = self.pool.clone();
        match (&wt.decoded, VecDot::for_weight(wt.ty)) {
            (Some(wf), _) => pool.install(|| {
                o.data
                    .par_chunks_mut(n)
                    .zip(xt.data.par_chunks(k))
                    .for_each(|(orow, xrow)| {
                        for (j, ov) in orow.iter_mut().enumerate() {
                            *ov = wf[j * k..(j + 1) * k]
                                .iter()
                                .zip(xrow)
                                .map(|(a, b)| a * b)
                                .sum();
                        }
                    })
            }),
            (None, Some(kind)) => {
                if !k.is_multiple_of(kind.block_len()) {
                    return Err(invalid(format!(
                        "rows of {k} are not whole {}-element activation blocks",
                        kind.block_len()
                    )));
                }
                let qrow = k / kind.block_len() * kind.block_bytes();
                xq.clear();
                if rows < 8 {
                    for xrow in xt.data.chunks_exact(k) {
                        quant::quantize_row(kind, xrow, &mut xq);
                    }
                } else {
                    // A prompt's rows quantized by all shares (each into its own rows).
                    xq.resize(rows * qrow, 0);
                    let spin = self.spin.clone();
                    let shares = spin.size();
                    let dst = SharedBytes(xq.as_mut_ptr(), xq.len());
                    spin.run(&|share| {
                        thread_local! {
                            static ROW: std::cell::RefCell<Vec<u8>> =
                                const { std::cell::RefCell::new(Vec::new()) };
                        }
                        ROW.with_borrow_mut(|buf| {
                            for t in spin::part(rows, shares, share, 1) {
                                buf.clear();
                                quant::quantize_row(kind, &xt.data[t * k..(t + 1) * k], buf);
                                // SAFETY: shares own disjoint rows of `xq`.
                                unsafe { dst.slice(t * qrow, qrow) }.copy_from_slice(buf);
                            }
                        });
                    });
                }
                let wrow = wt.ty.row_bytes(k as u64).unwrap_or(0) as usize;
                let (wb, ty) = (wt.bytes(), wt.ty);
                let threads = pool.current_num_threads().max(1);
                #[cfg(target_arch = "x86_64")]
                let avx512 = quant::kernel_level() >= quant::KernelLevel::Avx512;
                #[cfg(target_arch = "x86_64")]
                let (wide, wide_k) = (
                    avx512 && avx512::has_tile(ty),
                    avx512 && matches!(ty, GgmlType::Q4_K | GgmlType::Q6_K),
                );
                #[cfg(target_arch = "x86_64")]
                if rows >= 2
                    && quant::kernel_level() == quant::KernelLevel::Amx
                    && amx::has_tile(ty)
                {
                    // Prompt processing on AMX tiles (opt-in: its own numerics, see
                    // `amx.rs`): each share 16-row groups of weights against every token.
                    let mut packed = std::mem::take(&mut self.packed_amx);
                    packed.pack(&xq, rows);
                    let spin = self.spin.clone();
                    let shares = spin.size();
                    let out = quant::TileOut::new(&mut o.data, n);
                    spin.run(&|share| {
                        let r = spin::part(n, shares, share, 16);
                        // SAFETY: `kernel_level` returned `Amx` only after `amx::available`;
                        // shares own disjoint weight rows of the output.
                        unsafe { amx::dot_tile(ty, (wb, wrow), &packed, r, out) };
                    });
                    self.packed_amx = packed;
                    self.quantized = xq;
                    return Ok(());
                }
                #[cfg(target_arch = "x86_64")]
                if rows >= 2
                    && (wide
                        || (quant::kernel_level() >= quant::KernelLevel::Avx2
                            && avx2::has_tile(ty)))
                {
                    // Prompt processing: tiles of four weight rows × several tokens, each
                    // share a range of weight rows (kept in cache) against every token,
                    // written straight into the output.
                    let mut packed = std::mem::take(&mut self.packed);
                    if wide {
                        packed.pack(ty, &xq, rows);
                    }
                    let spin = self.spin.clone();
                    let shares = spin.size();
                    let out = quant::TileOut::new(&mut o.data, n);
                    spin.run(&|share| {
                        let r = spin::part(n, shares, share, 4);
                        // SAFETY: `kernel_level` checked the CPU features; shares own
                        // disjoint weight rows of the output.
                        unsafe {
                            if wide {
                                avx512::dot_tile(ty, (wb, wrow), (&xq, &packed), r, out)
                            } else if wide_k {
                                avx512::dot_tile_k(ty, (wb, wrow), (&xq, qrow), r, out)
                            } else {
                                avx2::dot_tile(ty, wb, wrow, (&xq, qrow), r, out)
                            }
                        };
                    });
                    self.packed = packed;
                    self.quantized = xq;
                    return Ok(());
                }
                pool.install(|| {
                    if rows >= 2 * threads {
                        o.data
                            .par_chunks_mut(n)
                            .zip(xq.par_chunks(qrow))
                            .for_each(|(orow, xr)| {
                                quant::dot_rows(ty, wb, wrow, xr, 0, orow);
                            });
                    }
                });
                if rows < 2 * threads {
                    // Decoding: each row's outputs split across the spinning pool.
                    let spin = self.spin.clone();
                    let shares = spin.size();
                    let out = SharedOut(o.data.as_mut_ptr(), o.data.len());
                    spin.run(&|share| {
                        let r = spin::part(n, shares, share, 4);
                        for (t, xr) in xq.chunks_exact(qrow).enumerate() {
                            // SAFETY: shares own disjoint column ranges of every row.
                            let part = unsafe { out.slice(t * n + r.start, r.len()) };
                            quant::dot_rows(ty, wb, wrow, xr, r.start, part);
                        }
                    });
                }
            }
            (None, None) => {
                // Types without an integer kernel yet (Q2_K, Q3_K, Q5_K, …): each weight row
                // is dequantized by the reference code and multiplied in f32.
                let wrow = wt.ty.row_bytes(k as u64).unwrap_or(0) as usize;
                let (wb, ty) = (wt.bytes(), wt.ty);
                pool.install(|| {
                    for (orow, xrow) in o.data.chunks_exact_mut(n).zip(xt.data.chunks_exact(k)) {
                        orow.par_chunks_mut(64).enumerate().for_each_init(
                            || vec![0f32; k],
                            |wf, (c, part)| {
                                for (i, ov) in part.iter_mut().enumerate() {
                                    let j = c * 64 + i;
                                    let row = &wb[j * wrow..(j + 1) * wrow];
                                    let _ = realm_gguf::quant::dequantize(ty, row, wf);
                                    *ov = wf.iter().zip(xrow).map(|(a, b)| a * b).sum();
                                }
                            },
                        );
                    }
                });
            }
        }
        self.quantized = xq;
        Ok(())
    }

    #[allow(clippy::too_many_arguments, reason = "mirrors the WIT signature")]
    fn attention_into(
        &mut self,
        q: &Resource<TensorRes>,
        k: &Resource<TensorRes>,
        v: &Resource<TensorRes>,
        cache: &Resource<KvCacheRes>,
        layer: usize,
        pos: usize,
        n_head: usize,
        scale: f32,
        window: usize,
        o: &mut TensorRes,
    ) -> Res<()> {
        // Append k and v to the cache (taken out of the table while we read the others).
        let mut c = {
            let c = self.table.get_mut(cache).map_err(handle)?;
            let shell = c.shell();
            std::mem::replace(c, shell)
        };
        let r = (|| {
            let (qt, kt, vt) = (
                self.table.get(q).map_err(handle)?,
                self.table.get(k).map_err(handle)?,
                self.table.get(v).map_err(handle)?,
            );
            let shape = ops::append_kv(
                &mut c,
                (qt, kt, vt),
                layer,
                pos,
                n_head,
                (scale, window),
                MAX_KV_ELEMENTS,
                o,
            )
            .map_err(op_error)?;
            let (n, hd) = (qt.rows, shape.head_dim);
            let lc = &c.layers[layer];
            // Batches of 64 rows or more: ggml's tiled numerics over f32 copies of the
            // cache, made once for all rows.
            let mut tiled = std::mem::take(&mut self.tiled_kv);
            if shape.tiled {
                tiled.build(lc, shape, pos + n);
            }
            let tiled_ref = &tiled;
            // (row, head) items split evenly across the spinning pool: one token's heads
            // in parallel when decoding, whole rows when processing a prompt.
            let spin = self.spin.clone();
            let shares = spin.size();
            let scratch = &self.attn_scratch;
            let out = SharedOut(o.data.as_mut_ptr(), o.data.len());
            let cols = qt.cols;
            spin.run(&|share| {
                let mut buf = scratch[share % scratch.len()]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if n >= shares {
                    // Later rows attend to more positions: deal rows out in turn so every
                    // share gets a similar mix.
                    for i in (share..n).step_by(shares) {
                        // SAFETY: shares own disjoint rows of the output.
                        let orow = unsafe { out.slice(i * cols, cols) };
                        let qrow = &qt.data[i * cols..(i + 1) * cols];
                        if shape.tiled {
                            kernels::attend_row_tiled(
                                qrow,
                                tiled_ref,
                                pos + i,
                                shape,
                                0..n_head,
                                orow,
                            );
                        } else {
                            kernels::attend_row(
                                qrow,
                                lc,
                                pos + i,
                                shape,
                                0..n_head,
                                &mut buf,
                                orow,
                            );
                        }
                    }
                    return;
                }
                let items = spin::part(n * n_head, shares, share, 1);
                let mut item = items.start;
                while item < items.end {
                    let (i, h0) = (item / n_head, item % n_head);
                    let h1 = n_head.min(h0 + items.end - item);
                    // SAFETY: shares own disjoint (row, head) ranges of the output.
                    let orow = unsafe { out.slice(i * cols + h0 * hd, (h1 - h0) * hd) };
                    let qrow = &qt.data[i * cols..(i + 1) * cols];
                    if shape.tiled {
                        kernels::attend_row_tiled(qrow, tiled_ref, pos + i, shape, h0..h1, orow);
                    } else {
                        kernels::attend_row(qrow, lc, pos + i, shape, h0..h1, &mut buf, orow);
                    }
                    item += h1 - h0;
                }
            });
            self.tiled_kv = tiled;
            Ok(())
        })();
        *self.table.get_mut(cache).map_err(handle)? = c;
        r
    }
}

/// The WIT `rope-params` as the kernels take them.
fn rope_params(p: &RopeParams) -> realm_kernels::kernels::RopeParams {
    realm_kernels::kernels::RopeParams {
        head_dim: p.head_dim as usize,
        n_rot: p.n_rot as usize,
        neox: p.mode == RopeMode::Neox,
        freq_base: p.freq_base,
        freq_scale: p.freq_scale,
        ext_factor: p.ext_factor,
        attn_factor: p.attn_factor,
        beta_fast: p.beta_fast,
        beta_slow: p.beta_slow,
        n_ctx_orig: p.n_ctx_orig,
    }
}
