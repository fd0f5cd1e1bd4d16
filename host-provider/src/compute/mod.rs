//! The host side of `realm:compute`, generic over a [`Backend`]: model files (memory-mapped
//! once, shared by every tenant), the WIT handles, the checks ([`realm_compute::checked`],
//! through [`Compute`]), weight residency and statistics are written here once; a backend
//! brings only its tensors and kernels. [`CpuBackend`] is the one this host runs.

pub mod residency;
pub mod split;

pub use realm_kernels::cpu::CpuBackend;
pub use realm_kernels::pool;
pub use realm_kernels::{kernels, quant};

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Instant;

use memmap2::Mmap;
use realm_compute::{Backend, Compute, Erased, ModelBytes, checked};
use wasmtime::component::{HasData, Resource, ResourceTable};

use crate::bindings::realm::compute::{store, tensors, types};
use crate::bindings::{Activation, ComputeError, Dtype, RopeParams};

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

impl AsRef<[u8]> for MappedModel {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

/// The WIT `model-file`.
pub struct ModelFileRes {
    model: Arc<MappedModel>,
    bytes: ModelBytes,
}

/// The WIT `weight`, `tensor` and `kv-cache` handles. The table holds the backend's own
/// values ([`HostWeight`], `B::Tensor`, `B::Cache`) under these handles' numbers; a handle
/// of the wrong kind is refused by the table's type check.
pub enum WeightRes {}
pub enum TensorRes {}
pub enum KvCacheRes {}

/// A backend weight and its unit in the residency store (None for decoded weights).
pub struct HostWeight<W> {
    w: W,
    unit: Option<usize>,
}

/// Largest KV cache (f16 values, keys and values together) the native host allows.
pub const MAX_KV_ELEMENTS: u64 = 1 << 32;

/// Per-Store compute state: the resource table, the models this guest may open, the
/// backend (its scratch is this tenant's), statistics and the weight residency.
pub struct ComputeState<B: Backend = Erased> {
    pub table: ResourceTable,
    pub models: HashMap<String, Arc<MappedModel>>,
    pub backend: B,
    pub stats: Stats,
    /// The weight store: this tenant's own, or its engine's, shared by every tenant.
    pub store: residency::Shared,
    /// Whether the store is shared: then a guest's `set-max-resident` cannot change the
    /// budget (it is the host's, for the whole process).
    shared_store: bool,
    order: residency::Order,
}

/// Counters for `--json` and `realm bench`.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub calls: u64,
    pub matmul_ns: u64,
    pub attention_ns: u64,
    pub other_ns: u64,
    /// Reading results back: on a GPU, the wait for the ops queued before the read.
    pub read_ns: u64,
}

/// Which counter an op's time goes to.
#[derive(Clone, Copy)]
enum Bucket {
    Matmul,
    Attention,
    Other,
    Read,
}

impl Stats {
    fn record(&mut self, bucket: Bucket, since: Instant) {
        let ns = since.elapsed().as_nanos() as u64;
        self.calls += 1;
        *match bucket {
            Bucket::Matmul => &mut self.matmul_ns,
            Bucket::Attention => &mut self.attention_ns,
            Bucket::Other => &mut self.other_ns,
            Bucket::Read => &mut self.read_ns,
        } += ns;
    }
}

/// The devices this host runs, by name: one line per backend.
pub const DEVICES: &[&str] = &["cpu", "cuda", "cuda:N"];

/// The CUDA device `name` names (`cuda`: device 0; `cuda:N`), opened once per process and
/// shared by every engine and tenant on it (one copy of each model's weights per GPU).
pub fn cuda_device(name: &str) -> Result<Arc<realm_cuda::CudaDevice>, String> {
    use std::sync::OnceLock;
    static OPEN: OnceLock<std::sync::Mutex<HashMap<usize, Arc<realm_cuda::CudaDevice>>>> =
        OnceLock::new();
    let ordinal = match name.strip_prefix("cuda") {
        Some("") => 0,
        Some(n) => n
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| format!("'{name}' is not a device: use cuda or cuda:N"))?,
        None => return Err(format!("'{name}' is not a CUDA device")),
    };
    let mut open = OPEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(d) = open.get(&ordinal) {
        return Ok(d.clone());
    }
    let d = realm_cuda::CudaDevice::open(ordinal)?;
    open.insert(ordinal, d.clone());
    Ok(d)
}

/// The backend for `device` for one tenant, on `spin`'s shares where it computes on the
/// CPU, its decode matmuls batched with the other tenants' on `batcher` if given; with
/// `gpu_layers`, only that many blocks on the GPU and the rest on the CPU (`split`).
pub fn backend(
    device: &str,
    gpu_layers: Option<usize>,
    spin: &Arc<pool::SpinPool>,
    batcher: Option<&Arc<realm_kernels::batch::Batcher>>,
) -> Result<Erased, String> {
    if let Some(layers) = gpu_layers {
        if !device.starts_with("cuda") {
            return Err(format!(
                "--gpu-layers places blocks on a GPU: use it with --device cuda[:N], not '{device}'"
            ));
        }
        return Ok(Erased::new(split::Split::new(
            realm_cuda::CudaBackend::new(cuda_device(device)?, realm_cuda::MAX_KV_ELEMENTS),
            CpuBackend::new(spin.clone(), MAX_KV_ELEMENTS),
            layers,
        )));
    }
    match device {
        "cpu" => Ok(Erased::new(match batcher {
            Some(b) => CpuBackend::batched(spin.clone(), MAX_KV_ELEMENTS, b.clone()),
            None => CpuBackend::new(spin.clone(), MAX_KV_ELEMENTS),
        })),
        // The GPU computes each tenant's ops as they come (no cross-tenant batching yet).
        cuda if cuda.starts_with("cuda") => Ok(Erased::new(realm_cuda::CudaBackend::new(
            cuda_device(cuda)?,
            realm_cuda::MAX_KV_ELEMENTS,
        ))),
        other => Err(format!(
            "unknown device '{other}' (this host has: {})",
            DEVICES.join(", ")
        )),
    }
}

impl<B: Backend> ComputeState<B> {
    /// The tenant has no step coming (see [`Backend::rest`]).
    pub fn rest(&self) {
        self.backend.rest();
    }

    pub fn new(
        models: HashMap<String, Arc<MappedModel>>,
        backend: B,
        max_resident: Option<u64>,
    ) -> Self {
        Self {
            table: ResourceTable::new(),
            models,
            backend,
            stats: Stats::default(),
            store: residency::WeightStore::shared(max_resident),
            shared_store: false,
            order: residency::Order::default(),
        }
    }

    /// A tenant's state over its engine's weight store `store` (one budget for all).
    pub fn sharing(
        models: HashMap<String, Arc<MappedModel>>,
        backend: B,
        store: residency::Shared,
    ) -> Self {
        Self {
            shared_store: true,
            store,
            ..Self::new(models, backend, None)
        }
    }

    /// The weight store's counters (the whole engine's, where it is shared).
    pub fn store_stats(&self) -> residency::StoreStats {
        self.store
            .lock()
            .map_or_else(|e| e.into_inner().stats, |s| s.stats)
    }

    fn with_store<R>(&self, f: impl FnOnce(&mut residency::WeightStore) -> R) -> R {
        // The store's state is consistent between calls: a panic in one leaves it usable.
        let mut s = self.store.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s)
    }

    fn tensor(&self, t: &Resource<TensorRes>) -> Res<&B::Tensor> {
        self.table.get(&retype(t)).map_err(handle)
    }

    fn weight(&self, w: &Resource<WeightRes>) -> Res<&HostWeight<B::Weight>> {
        self.table.get(&retype(w)).map_err(handle)
    }

    fn cache(&self, c: &Resource<KvCacheRes>) -> Res<&B::Cache> {
        self.table.get(&retype(c)).map_err(handle)
    }

    /// A weight about to be read: keep it resident (and count it as recently used).
    fn touch(&mut self, w: &Resource<WeightRes>) -> Res<()> {
        if let Some(unit) = self.weight(w)?.unit {
            let mut order = self.order;
            self.with_store(|s| s.touch(unit, &mut order));
            self.order = order;
        }
        Ok(())
    }

    /// Runs `op` on the backend and counts its time in `bucket`.
    fn timed(&mut self, bucket: Bucket, op: impl FnOnce(&Self) -> Res<()>) -> Res<()> {
        let start = Instant::now();
        let r = op(self);
        self.stats.record(bucket, start);
        r
    }

    fn push<T: Send + 'static, M>(&mut self, value: T) -> Res<Resource<M>> {
        let r = self
            .table
            .push(value)
            .map_err(|e| ComputeError::ResourceExhausted(e.to_string()))?;
        Ok(Resource::new_own(r.rep()))
    }

    fn delete<T: 'static, M: 'static>(&mut self, r: Resource<M>) -> wasmtime::Result<()> {
        self.table.delete(Resource::<T>::new_own(r.rep()))?;
        Ok(())
    }
}

/// The same handle number, as a handle to the value type the table holds.
fn retype<T: 'static, M>(r: &Resource<M>) -> Resource<T> {
    if r.owned() {
        Resource::new_own(r.rep())
    } else {
        Resource::new_borrow(r.rep())
    }
}

type Res<T> = Result<T, ComputeError>;

fn handle<E: std::fmt::Display>(e: E) -> ComputeError {
    ComputeError::InvalidArgument(format!("bad handle: {e}"))
}

use crate::bindings::realm::compute::types as wit;
realm_compute::wit_conversions!(wit);

/// [`HasData`] for a [`ComputeState`] over `B`, to add the imports to a linker.
pub struct HasCompute<B>(PhantomData<B>);

impl<B: Backend> HasData for HasCompute<B> {
    type Data<'a> = &'a mut ComputeState<B>;
}

impl<B: Backend> types::Host for ComputeState<B> {}

impl<B: Backend> store::Host for ComputeState<B> {
    fn set_max_resident(&mut self, bytes: u64) {
        if self.shared_store {
            tracing::debug!(target: "realm::store", bytes, "set-max-resident ignored: the budget is the host's, shared by its tenants");
            return;
        }
        self.with_store(|s| s.set_budget((bytes > 0).then_some(bytes)));
    }

    fn prefetch(&mut self, w: Resource<WeightRes>) {
        if let Some(unit) = self.weight(&w).ok().and_then(|w| w.unit) {
            self.with_store(|s| s.prefetch(unit));
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
        let bytes = ModelBytes::new(model.clone());
        self.table
            .push(ModelFileRes { model, bytes })
            .map_err(|e| ComputeError::ResourceExhausted(e.to_string()))
    }
}

impl<B: Backend> store::HostModelFile for ComputeState<B> {
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
        let f = self.table.get(&f).map_err(handle)?;
        let model = f.model.clone();
        let data = checked::weight(&f.bytes, offset, from_wit_dtype(dtype), &dims)
            .map_err(to_wit_error)?;
        let unit = data
            .meta
            .values
            .is_none()
            .then(|| self.with_store(|s| s.register(model, data.offset, data.len)));
        let w = self.backend.weight(data).map_err(to_wit_error)?;
        self.push(HostWeight { w, unit })
    }

    fn drop(&mut self, f: Resource<ModelFileRes>) -> wasmtime::Result<()> {
        self.table.delete(f)?;
        Ok(())
    }
}

impl<B: Backend> store::HostWeight for ComputeState<B> {
    fn dims(&mut self, w: Resource<WeightRes>) -> Vec<u64> {
        self.weight(&w)
            .map(|w| self.backend.weight_meta(&w.w).dims.clone())
            .unwrap_or_default()
    }

    fn drop(&mut self, w: Resource<WeightRes>) -> wasmtime::Result<()> {
        self.delete::<HostWeight<B::Weight>, _>(w)
    }
}

impl<B: Backend> tensors::HostTensor for ComputeState<B> {
    fn new(&mut self, cols: u32) -> Resource<TensorRes> {
        // A zero-width tensor is allowed to exist; every op rejects it.
        let t = Backend::tensor(&self.backend, cols as usize);
        self.push(t).unwrap_or_else(|_| Resource::new_own(u32::MAX))
    }

    fn rows(&mut self, t: Resource<TensorRes>) -> u32 {
        self.tensor(&t)
            .map(|t| self.backend.shape(t).rows as u32)
            .unwrap_or(0)
    }

    fn cols(&mut self, t: Resource<TensorRes>) -> u32 {
        self.tensor(&t)
            .map(|t| self.backend.shape(t).cols as u32)
            .unwrap_or(0)
    }

    fn read_row(&mut self, t: Resource<TensorRes>, row: u32) -> Res<Vec<f32>> {
        let start = Instant::now();
        let r = Compute::read_row(&self.backend, self.tensor(&t)?, row).map_err(to_wit_error);
        self.stats.record(Bucket::Read, start);
        r
    }

    fn write(&mut self, t: Resource<TensorRes>, rows: u32, data: Vec<f32>) -> Res<()> {
        checked::write_tensor(&self.backend, self.tensor(&t)?, rows as usize, data)
            .map_err(to_wit_error)
    }

    fn drop(&mut self, t: Resource<TensorRes>) -> wasmtime::Result<()> {
        self.delete::<B::Tensor, _>(t)
    }
}

impl<B: Backend> tensors::HostKvCache for ComputeState<B> {
    fn new(
        &mut self,
        n_layer: u32,
        n_ctx: u32,
        n_head_kv: u32,
        head_dim: u32,
    ) -> Resource<KvCacheRes> {
        // Sizes are checked when the cache is first written (construction cannot fail).
        let c = Compute::cache(&self.backend, n_layer, n_ctx, n_head_kv, head_dim);
        self.push(c).unwrap_or_else(|_| Resource::new_own(u32::MAX))
    }

    fn capacity(&mut self, c: Resource<KvCacheRes>) -> u32 {
        self.cache(&c)
            .map(|c| self.backend.cache_shape(c).n_ctx as u32)
            .unwrap_or(0)
    }

    fn drop(&mut self, c: Resource<KvCacheRes>) -> wasmtime::Result<()> {
        self.delete::<B::Cache, _>(c)
    }
}

impl<B: Backend> tensors::Host for ComputeState<B> {
    fn embed(
        &mut self,
        table: Resource<WeightRes>,
        ids: Vec<u32>,
        scale: f32,
        out: Resource<TensorRes>,
    ) -> Res<()> {
        self.touch(&table)?;
        self.timed(Bucket::Other, |s| {
            let (w, o) = (s.weight(&table)?, s.tensor(&out)?);
            Compute::embed(&s.backend, &w.w, &ids, scale, o).map_err(to_wit_error)
        })
    }

    fn matmul(
        &mut self,
        x: Resource<TensorRes>,
        w: Resource<WeightRes>,
        out: Resource<TensorRes>,
    ) -> Res<()> {
        self.touch(&w)?;
        self.timed(Bucket::Matmul, |s| {
            let (x, w, o) = (s.tensor(&x)?, s.weight(&w)?, s.tensor(&out)?);
            Compute::matmul(&s.backend, x, &w.w, o).map_err(to_wit_error)
        })
    }

    fn rms_norm(
        &mut self,
        x: Resource<TensorRes>,
        w: Resource<WeightRes>,
        eps: f32,
        out: Resource<TensorRes>,
    ) -> Res<()> {
        self.timed(Bucket::Other, |s| {
            let (x, w, o) = (s.tensor(&x)?, s.weight(&w)?, s.tensor(&out)?);
            Compute::rms_norm(&s.backend, x, &w.w, eps, o).map_err(to_wit_error)
        })
    }

    fn rope(
        &mut self,
        x: Resource<TensorRes>,
        pos: u32,
        params: RopeParams,
        factors: Option<Resource<WeightRes>>,
    ) -> Res<()> {
        self.timed(Bucket::Other, |s| {
            let f = match &factors {
                Some(f) => Some(&s.weight(f)?.w),
                None => None,
            };
            let x = s.tensor(&x)?;
            Compute::rope(&s.backend, x, pos, &from_wit_rope(&params), f).map_err(to_wit_error)
        })
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
        softcap: f32,
        out: Resource<TensorRes>,
    ) -> Res<()> {
        self.timed(Bucket::Attention, |s| {
            let (q, k, v) = (s.tensor(&q)?, s.tensor(&k)?, s.tensor(&v)?);
            let (c, o) = (s.cache(&cache)?, s.tensor(&out)?);
            Compute::attention(
                &s.backend, q, k, v, c, layer, pos, n_head, scale, window, softcap, o,
            )
            .map_err(to_wit_error)
        })
    }

    fn glu(
        &mut self,
        gate: Resource<TensorRes>,
        up: Resource<TensorRes>,
        act: Activation,
    ) -> Res<()> {
        let act = from_wit_activation(act);
        self.timed(Bucket::Other, |s| {
            let (g, u) = (s.tensor(&gate)?, s.tensor(&up)?);
            Compute::glu(&s.backend, g, u, act).map_err(to_wit_error)
        })
    }

    fn add(&mut self, acc: Resource<TensorRes>, x: Resource<TensorRes>) -> Res<()> {
        self.timed(Bucket::Other, |s| {
            let (a, x) = (s.tensor(&acc)?, s.tensor(&x)?);
            Compute::add(&s.backend, a, x).map_err(to_wit_error)
        })
    }

    fn scale(&mut self, x: Resource<TensorRes>, v: f32) -> Res<()> {
        Compute::scale(&self.backend, self.tensor(&x)?, v).map_err(to_wit_error)
    }

    fn scale_rows(&mut self, x: Resource<TensorRes>, s: Vec<f32>) -> Res<()> {
        Compute::scale_rows(&self.backend, self.tensor(&x)?, &s).map_err(to_wit_error)
    }

    fn softmax(&mut self, x: Resource<TensorRes>) -> Res<()> {
        checked::softmax_rows(&self.backend, self.tensor(&x)?).map_err(to_wit_error)
    }

    fn keep_last_row(&mut self, x: Resource<TensorRes>) -> Res<()> {
        Compute::keep_last_row(&self.backend, self.tensor(&x)?).map_err(to_wit_error)
    }
}
