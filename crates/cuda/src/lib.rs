//! The CUDA backend: [`realm_compute::Backend`] on an NVIDIA GPU through cudarc.
//!
//! Weights are uploaded once per device, as the file stores them, and shared by every
//! tenant's backend on that device ([`CudaDevice::weight`]); activations and KV caches
//! (f16, as the CPU backend's) live in device memory; only what a guest reads comes back.
//! The kernels (`kernels.cu`) are compiled at run time by NVRTC, so building Realm needs
//! no CUDA toolkit: the driver (`libcuda`) and NVRTC (`libnvrtc`) are loaded when a
//! device is opened, and their absence is a one-line error, not a crash.
//!
//! This first version follows the CPU backend's numerics where it can: activations
//! quantized to 8 bits as ggml does and integer products per block for Q4_0, Q4_1, Q5_0,
//! Q5_1 and Q8_0 weights, Q4_K and Q6_K against ggml's Q8_K activations (Q5_K, F16 and
//! F32 in f32 over values decoded on the fly, as the CPU backend does; other types are
//! refused by name), norms
//! summed in f64, ggml's SiLU and f16 flash-attention accumulation. It launches one
//! kernel per op and a warp per output column: correct, not yet fast.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use realm_compute::{
    Activation, Attention, Backend, CacheShape, Error, GgmlType, ModelBytes, Result, RopeMode,
    RopeParams, Shape, WeightData, WeightMeta,
};

/// Launches kernel `f` of `$dev` with the arguments in its signature's order.
macro_rules! launch {
    ($dev:expr, $f:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let mut b = $dev.stream.launch_builder(&$f);
        $( b.arg($arg); )*
        // SAFETY: every kernel's arguments are pushed in its signature's order and types
        // (kernels.cu), over buffers at least as large as the sizes passed (`ensure`).
        unsafe { b.launch($cfg) }.map(|_| ()).map_err(gpu)
    }};
}

const KERNELS: &str = include_str!("kernels.cu");

/// Bytes of one Q8_K activation block: f32 scale, 256 × i8, 16 × i16 sums.
const Q8_K_BYTES: usize = 292;

/// Largest KV cache (values) a CUDA backend holds.
pub const MAX_KV_ELEMENTS: u64 = 1 << 32;

fn gpu(e: impl std::fmt::Display) -> Error {
    Error::ResourceExhausted(format!("cuda: {e}"))
}

/// A weight's place: its file's address, offset and length.
type WeightKey = (usize, usize, usize);

/// A weight's bytes on a device, shared by the tenants there.
type DeviceBytes = Arc<CudaSlice<u8>>;

/// One layer's cached keys and values (f16 bits), allocated on first use.
type LayerKv = Option<(CudaSlice<u16>, CudaSlice<u16>)>;

/// The kernels of one device.
struct Kernels {
    matmul: CudaFunction,
    quantize_q8: CudaFunction,
    matmul_q8: CudaFunction,
    quantize_q8k: CudaFunction,
    matmul_q8k: CudaFunction,
    embed: CudaFunction,
    rms_norm: CudaFunction,
    rope: CudaFunction,
    kv_store: CudaFunction,
    attention: CudaFunction,
    glu: CudaFunction,
    add: CudaFunction,
    scale: CudaFunction,
    softmax: CudaFunction,
    last_row: CudaFunction,
}

/// One GPU: its context, stream, kernels and the weights uploaded to it (shared by every
/// tenant's backend there).
pub struct CudaDevice {
    name: String,
    stream: Arc<CudaStream>,
    k: Kernels,
    /// Uploaded weights by (file, offset, length): one copy per device however many
    /// tenants. Each entry holds its file, so that no other file can take its address.
    weights: Mutex<HashMap<WeightKey, (ModelBytes, DeviceBytes)>>,
    /// A one-value buffer standing for "no frequency factors".
    none: CudaSlice<f32>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("name", &self.name)
            .finish()
    }
}

/// Compiles Realm's kernels with NVRTC, as [`CudaDevice::open`] does first; needs NVRTC
/// (`libnvrtc.so`) but no GPU or driver, so machines without one can check the kernels.
pub fn compile_kernels() -> std::result::Result<(), String> {
    // SAFETY: only tries to load the library (dlopen), calling nothing in it.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(NO_NVRTC.into());
    }
    cudarc::nvrtc::compile_ptx(KERNELS)
        .map(|_| ())
        .map_err(|e| format!("compiling Realm's CUDA kernels: {e}"))
}

const NO_NVRTC: &str =
    "no NVRTC found (libnvrtc.so, from a CUDA toolkit: add its lib64 folder to LD_LIBRARY_PATH)";

impl CudaDevice {
    /// Opens GPU `ordinal`: the driver and NVRTC loaded, the kernels compiled. A machine
    /// without them gets a one-line error.
    pub fn open(ordinal: usize) -> std::result::Result<Arc<Self>, String> {
        // SAFETY: only tries to load the libraries (dlopen), calling nothing in them.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(
                "no CUDA driver found (libcuda.so: is an NVIDIA GPU and its driver installed?)"
                    .into(),
            );
        }
        // SAFETY: as above.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(NO_NVRTC.into());
        }
        let count = CudaContext::device_count().map_err(|e| format!("CUDA: {e}"))?;
        if ordinal >= count.max(0) as usize {
            return Err(format!(
                "no CUDA device {ordinal} (this machine has {count})"
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("CUDA device {ordinal}: {e}"))?;
        // Every buffer of this device is used on its one stream, in order: cudarc's
        // per-use events (two driver calls per kernel argument) would only add host time
        // to every op.
        // SAFETY: no buffer is created before this, and all of them are used on `stream`
        // below only, whose order makes each use follow its allocation and precede its free.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let ptx = cudarc::nvrtc::compile_ptx(KERNELS)
            .map_err(|e| format!("compiling Realm's CUDA kernels: {e}"))?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| format!("loading Realm's CUDA kernels: {e}"))?;
        let f = |n: &str| {
            module
                .load_function(n)
                .map_err(|e| format!("kernel {n}: {e}"))
        };
        let k = Kernels {
            matmul: f("matmul")?,
            quantize_q8: f("quantize_q8")?,
            matmul_q8: f("matmul_q8")?,
            quantize_q8k: f("quantize_q8k")?,
            matmul_q8k: f("matmul_q8k")?,
            embed: f("embed")?,
            rms_norm: f("rms_norm")?,
            rope: f("rope")?,
            kv_store: f("kv_store")?,
            attention: f("attention")?,
            glu: f("glu")?,
            add: f("add")?,
            scale: f("scale")?,
            softmax: f("softmax")?,
            last_row: f("last_row")?,
        };
        let stream = ctx.default_stream();
        let none = stream
            .alloc_zeros::<f32>(1)
            .map_err(|e| format!("CUDA: {e}"))?;
        Ok(Arc::new(Self {
            name,
            stream,
            k,
            weights: Mutex::default(),
            none,
        }))
    }

    /// The GPU's name, as the driver gives it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes of weights uploaded to this device.
    pub fn weight_bytes(&self) -> usize {
        self.weights
            .lock()
            .map_or(0, |w| w.values().map(|(_, s)| s.len()).sum())
    }

    /// `w`'s bytes on the device, uploaded on first use.
    fn weight(&self, w: &WeightData) -> Result<Arc<CudaSlice<u8>>> {
        let key = (w.file.bytes().as_ptr() as usize, w.offset, w.len);
        let mut map = self.weights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, s)) = map.get(&key) {
            return Ok(s.clone());
        }
        let s = Arc::new(self.stream.clone_htod(w.bytes()).map_err(gpu)?);
        map.insert(key, (w.file.clone(), s.clone()));
        Ok(s)
    }

    /// Rows of `x` quantized by the `quantize_q8` kernel (q8_0, or q8_1), read back: what
    /// the matmuls of quantized weights multiply.
    #[doc(hidden)]
    pub fn quantize_q8(&self, x: &[f32], k: usize, q81: bool) -> Result<Vec<u8>> {
        let rows = x.len() / k.max(1);
        let xd = self.stream.clone_htod(x).map_err(gpu)?;
        let blocks_n = rows * (k / 32);
        let mut out = self
            .stream
            .alloc_zeros::<u8>((blocks_n * if q81 { 36 } else { 34 }).max(1))
            .map_err(gpu)?;
        let (rows_i, k_i, q) = (rows as i32, k as i32, i32::from(q81));
        launch!(
            self,
            self.k.quantize_q8,
            blocks(blocks_n * 32, 256),
            &xd,
            &rows_i,
            &k_i,
            &q,
            &mut out
        )?;
        self.stream.clone_dtoh(&out).map_err(gpu)
    }

    /// Rows of `x` quantized by the `quantize_q8k` kernel (ggml's Q8_K), read back.
    #[doc(hidden)]
    pub fn quantize_q8k(&self, x: &[f32]) -> Result<Vec<u8>> {
        let blocks_n = x.len() / 256;
        let xd = self.stream.clone_htod(x).map_err(gpu)?;
        let mut out = self
            .stream
            .alloc_zeros::<u8>((blocks_n * Q8_K_BYTES).max(1))
            .map_err(gpu)?;
        let b = blocks_n as i32;
        launch!(
            self,
            self.k.quantize_q8k,
            blocks(blocks_n * 32, 256),
            &xd,
            &b,
            &mut out
        )?;
        self.stream.clone_dtoh(&out).map_err(gpu)
    }

    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream.alloc_zeros::<f32>(n.max(1)).map_err(gpu)
    }
}

/// Device memory for a tensor, grown as needed.
#[derive(Debug)]
struct DevMat {
    rows: usize,
    cols: usize,
    buf: Option<CudaSlice<f32>>,
}

/// A CUDA tensor.
#[derive(Debug)]
pub struct CudaTensor(RefCell<DevMat>);

/// A CUDA weight: the file's bytes on the device (quantized rows), or decoded values.
#[derive(Debug)]
pub struct CudaWeight {
    meta: WeightMeta,
    bytes: Option<Arc<CudaSlice<u8>>>,
    values: Option<CudaSlice<f32>>,
}

/// A CUDA KV cache: per layer, f16 keys and values of `n_ctx` positions.
#[derive(Debug)]
pub struct CudaCache {
    shape: CacheShape,
    filled: RefCell<Vec<usize>>,
    layers: RefCell<Vec<LayerKv>>,
}

/// The CUDA backend of one tenant.
pub struct CudaBackend {
    dev: Arc<CudaDevice>,
    max_kv: u64,
    /// Quantized activations, reused across matmuls.
    xq: RefCell<Option<CudaSlice<u8>>>,
    /// Token ids for `embed`, reused.
    ids: RefCell<Option<CudaSlice<u32>>>,
    /// The last RoPE frequency factors uploaded (every layer passes the same ones).
    factors: RefCell<Option<(Vec<f32>, CudaSlice<f32>)>>,
}

impl CudaBackend {
    pub fn new(dev: Arc<CudaDevice>, max_kv: u64) -> Self {
        Self {
            dev,
            max_kv,
            xq: RefCell::new(None),
            ids: RefCell::new(None),
            factors: RefCell::new(None),
        }
    }

    /// A buffer of at least `rows × cols` for `t` (its contents kept only if large enough).
    fn ensure(&self, m: &mut DevMat, rows: usize) -> Result<()> {
        let need = (rows * m.cols).max(1);
        if m.buf.as_ref().is_none_or(|b| b.len() < need) {
            m.buf = Some(self.dev.zeros(need)?);
        }
        m.rows = rows;
        Ok(())
    }
}

fn blocks(n: usize, per: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(per).max(1), 1, 1),
        block_dim: (per, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn busy() -> Error {
    Error::InvalidArgument("an op's output must be a different tensor from its inputs".into())
}

fn buf(m: &DevMat) -> Result<&CudaSlice<f32>> {
    m.buf
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("a tensor read before it was written".into()))
}

fn buf_mut(m: &mut DevMat) -> Result<&mut CudaSlice<f32>> {
    m.buf
        .as_mut()
        .ok_or_else(|| Error::InvalidArgument("a tensor read before it was written".into()))
}

/// ggml type ids the kernels read (`kernels.cu`).
fn kernel_type(ty: GgmlType) -> Option<i32> {
    Some(match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q5_0 => 6,
        GgmlType::Q5_1 => 7,
        GgmlType::Q8_0 => 8,
        GgmlType::Q4_K => 12,
        GgmlType::Q5_K => 13,
        GgmlType::Q6_K => 14,
        _ => return None,
    })
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type Cache = CudaCache;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn max_kv_elements(&self) -> u64 {
        self.max_kv
    }

    fn tensor(&self, cols: usize) -> CudaTensor {
        CudaTensor(RefCell::new(DevMat {
            rows: 0,
            cols,
            buf: None,
        }))
    }

    fn shape(&self, t: &CudaTensor) -> Shape {
        let m = t.0.borrow();
        Shape {
            rows: m.rows,
            cols: m.cols,
        }
    }

    fn read_row(&self, t: &CudaTensor, row: usize) -> Result<Vec<f32>> {
        let m = t.0.try_borrow().map_err(|_| busy())?;
        let b = buf(&m)?;
        let view = b.slice(row * m.cols..(row + 1) * m.cols);
        self.dev.stream.clone_dtoh(&view).map_err(gpu)
    }

    fn write(&self, t: &CudaTensor, rows: usize, data: Vec<f32>) -> Result<()> {
        let mut m = t.0.try_borrow_mut().map_err(|_| busy())?;
        self.ensure(&mut m, rows)?;
        let b = buf_mut(&mut m)?;
        let mut view = b.slice_mut(0..data.len());
        self.dev.stream.memcpy_htod(&data, &mut view).map_err(gpu)
    }

    fn weight(&self, w: WeightData) -> Result<CudaWeight> {
        if let Some(v) = &w.meta.values {
            let values = Some(self.dev.stream.clone_htod(v).map_err(gpu)?);
            return Ok(CudaWeight {
                meta: w.meta.clone(),
                bytes: None,
                values,
            });
        }
        if kernel_type(w.meta.ty).is_none() {
            return Err(Error::Unsupported(format!(
                "{} weights are not supported on the CUDA backend yet",
                w.meta.ty
            )));
        }
        Ok(CudaWeight {
            bytes: Some(self.dev.weight(&w)?),
            meta: w.meta,
            values: None,
        })
    }

    fn weight_meta<'a>(&self, w: &'a CudaWeight) -> &'a WeightMeta {
        &w.meta
    }

    fn cache(&self, shape: CacheShape) -> CudaCache {
        CudaCache {
            shape,
            filled: RefCell::new(vec![0; shape.n_layer]),
            layers: RefCell::new((0..shape.n_layer).map(|_| None).collect()),
        }
    }

    fn cache_shape(&self, c: &CudaCache) -> CacheShape {
        c.shape
    }

    fn cache_filled(&self, c: &CudaCache, layer: usize) -> usize {
        c.filled.borrow().get(layer).copied().unwrap_or(0)
    }

    fn embed(&self, table: &CudaWeight, ids: &[u32], scale: f32, o: &CudaTensor) -> Result<()> {
        let mut o = o.0.try_borrow_mut().map_err(|_| busy())?;
        self.ensure(&mut o, ids.len())?;
        let k = table.meta.row_len();
        let mut ids_buf = self.ids.borrow_mut();
        if ids_buf.as_ref().is_none_or(|b| b.len() < ids.len()) {
            *ids_buf = Some(
                self.dev
                    .stream
                    .alloc_zeros::<u32>(ids.len().max(1))
                    .map_err(gpu)?,
            );
        }
        let Some(ids_dev) = ids_buf.as_mut() else {
            return Err(Error::InvalidArgument("no id buffer".into()));
        };
        if !ids.is_empty() {
            let mut view = ids_dev.slice_mut(0..ids.len());
            self.dev.stream.memcpy_htod(ids, &mut view).map_err(gpu)?;
        }
        let ids_dev = &*ids_dev;
        let (data, ty): (&CudaSlice<u8>, i32) = match (&table.bytes, &table.values) {
            (Some(b), _) => (b, kernel_type(table.meta.ty).unwrap_or(0)),
            // Decoded tables are f32 values: the kernel reads them as F32 bytes.
            (None, Some(_)) => {
                return Err(Error::Unsupported(
                    "decoded embedding tables on the CUDA backend".into(),
                ));
            }
            (None, None) => return Err(Error::InvalidArgument("an empty weight".into())),
        };
        let out = buf_mut(&mut o)?;
        let (k_i, n_i) = (k as i32, ids.len() as i32);
        let cfg = LaunchConfig {
            grid_dim: (ids.len().max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self.dev,
            self.dev.k.embed,
            cfg,
            data,
            &ty,
            &k_i,
            ids_dev,
            &n_i,
            &scale,
            out
        )
    }

    fn matmul(&self, x: &CudaTensor, w: &CudaWeight, o: &CudaTensor) -> Result<()> {
        let x = x.0.try_borrow().map_err(|_| busy())?;
        let mut o = o.0.try_borrow_mut().map_err(|_| busy())?;
        let (k, n, rows) = (w.meta.row_len(), w.meta.n_rows(), x.rows);
        self.ensure(&mut o, rows)?;
        let xb = buf(&x)?;
        let out = buf_mut(&mut o)?;
        let (k_i, n_i, rows_i) = (k as i32, n as i32, rows as i32);
        // One warp per output column, 8 warps per block.
        let cfg = LaunchConfig {
            grid_dim: ((n as u32).div_ceil(8).max(1), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        match (&w.bytes, &w.values) {
            (Some(bytes), _) if matches!(w.meta.ty, GgmlType::Q4_K | GgmlType::Q6_K) => {
                // Activations in Q8_K, as the CPU backend's K-quant products.
                let ty = kernel_type(w.meta.ty).unwrap_or(0);
                let blocks_n = rows * (k / 256);
                let need = (blocks_n * Q8_K_BYTES).max(1);
                let mut xq = self.xq.borrow_mut();
                if xq.as_ref().is_none_or(|b| b.len() < need) {
                    *xq = Some(self.dev.stream.alloc_zeros::<u8>(need).map_err(gpu)?);
                }
                let Some(xq) = xq.as_mut() else {
                    return Err(Error::InvalidArgument("no activation buffer".into()));
                };
                let b_i = blocks_n as i32;
                launch!(
                    self.dev,
                    self.dev.k.quantize_q8k,
                    blocks(blocks_n * 32, 256),
                    xb,
                    &b_i,
                    &mut *xq
                )?;
                let xq = &*xq;
                launch!(
                    self.dev,
                    self.dev.k.matmul_q8k,
                    cfg,
                    &**bytes,
                    &ty,
                    &k_i,
                    &n_i,
                    xq,
                    &rows_i,
                    out
                )
            }
            (Some(bytes), _)
                if !matches!(w.meta.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::Q5_K) =>
            {
                // Quantized weights: activations quantized to 8 bits first, as the CPU
                // backend (and ggml) does, so that both compute the same integer products.
                let ty = kernel_type(w.meta.ty).unwrap_or(0);
                let q81 = i32::from(matches!(w.meta.ty, GgmlType::Q4_1 | GgmlType::Q5_1));
                let blocks_n = rows * (k / 32);
                let need = (blocks_n * if q81 == 1 { 36 } else { 34 }).max(1);
                let mut xq = self.xq.borrow_mut();
                if xq.as_ref().is_none_or(|b| b.len() < need) {
                    *xq = Some(self.dev.stream.alloc_zeros::<u8>(need).map_err(gpu)?);
                }
                let Some(xq) = xq.as_mut() else {
                    return Err(Error::InvalidArgument("no activation buffer".into()));
                };
                launch!(
                    self.dev,
                    self.dev.k.quantize_q8,
                    blocks(blocks_n * 32, 256),
                    xb,
                    &rows_i,
                    &k_i,
                    &q81,
                    &mut *xq
                )?;
                let xq = &*xq;
                launch!(
                    self.dev,
                    self.dev.k.matmul_q8,
                    cfg,
                    &**bytes,
                    &ty,
                    &k_i,
                    &n_i,
                    xq,
                    &rows_i,
                    out
                )
            }
            (Some(bytes), _) => {
                let ty = kernel_type(w.meta.ty).unwrap_or(0);
                launch!(
                    self.dev,
                    self.dev.k.matmul,
                    cfg,
                    &**bytes,
                    &ty,
                    &k_i,
                    &n_i,
                    xb,
                    &rows_i,
                    out
                )
            }
            (None, Some(values)) => {
                // f32 values, read as F32 blocks.
                let ty = 0i32;
                launch!(
                    self.dev,
                    self.dev.k.matmul,
                    cfg,
                    values,
                    &ty,
                    &k_i,
                    &n_i,
                    xb,
                    &rows_i,
                    out
                )
            }
            (None, None) => Err(Error::InvalidArgument("an empty weight".into())),
        }
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaWeight, eps: f32, o: &CudaTensor) -> Result<()> {
        let x = x.0.try_borrow().map_err(|_| busy())?;
        let mut o = o.0.try_borrow_mut().map_err(|_| busy())?;
        self.ensure(&mut o, x.rows)?;
        let values = w
            .values
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("a norm weight must be decoded".into()))?;
        let g = w.meta.values.as_ref().map_or(0, Vec::len);
        let groups = (x.rows * x.cols) / g.max(1);
        let (xb, out) = (buf(&x)?, buf_mut(&mut o)?);
        let (g_i, groups_i) = (g as i32, groups as i32);
        let cfg = LaunchConfig {
            grid_dim: (groups.max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self.dev,
            self.dev.k.rms_norm,
            cfg,
            xb,
            values,
            &g_i,
            &eps,
            out,
            &groups_i
        )
    }

    fn rope(&self, x: &CudaTensor, pos: u32, p: &RopeParams, f: Option<&[f32]>) -> Result<()> {
        let mut m = x.0.try_borrow_mut().map_err(|_| busy())?;
        let (rows, cols) = (m.rows, m.cols);
        let mut cached = self.factors.borrow_mut();
        if let Some(f) = f
            && cached.as_ref().is_none_or(|(v, _)| v.as_slice() != f)
        {
            *cached = Some((f.to_vec(), self.dev.stream.clone_htod(f).map_err(gpu)?));
        }
        let factors = f.and(cached.as_ref().map(|(_, d)| d));
        let corr = p.yarn_corr_dims();
        let xb = buf_mut(&mut m)?;
        let (rows_i, cols_i, hd, n_rot) =
            (rows as i32, cols as i32, p.head_dim as i32, p.n_rot as i32);
        let neox = i32::from(p.mode == RopeMode::Neox);
        let pos_i = pos as i32;
        let has = i32::from(factors.is_some());
        let fac = factors.unwrap_or(&self.dev.none);
        let n = rows * (cols / p.head_dim.max(1) as usize) * (p.n_rot as usize / 2);
        launch!(
            self.dev,
            self.dev.k.rope,
            blocks(n, 256),
            xb,
            &rows_i,
            &cols_i,
            &hd,
            &n_rot,
            &neox,
            &pos_i,
            &p.freq_base,
            &p.freq_scale,
            &p.ext_factor,
            &p.attn_factor,
            &corr[0],
            &corr[1],
            fac,
            &has
        )
    }

    fn attention(&self, a: Attention<'_, Self>, o: &CudaTensor) -> Result<()> {
        let q = a.q.0.try_borrow().map_err(|_| busy())?;
        let k = a.k.0.try_borrow().map_err(|_| busy())?;
        let v = a.v.0.try_borrow().map_err(|_| busy())?;
        let mut o = o.0.try_borrow_mut().map_err(|_| busy())?;
        let c = a.cache.shape;
        let width = c.n_head_kv * c.head_dim;
        let mut layers = a.cache.layers.borrow_mut();
        let slot = layers
            .get_mut(a.layer)
            .ok_or_else(|| Error::InvalidArgument(format!("layer {}", a.layer)))?;
        if slot.is_none() {
            let n = (c.n_ctx * width).max(1);
            let kc = self.dev.stream.alloc_zeros::<u16>(n).map_err(gpu)?;
            let vc = self.dev.stream.alloc_zeros::<u16>(n).map_err(gpu)?;
            *slot = Some((kc, vc));
        }
        let Some((kc, vc)) = slot.as_mut() else {
            return Err(Error::InvalidArgument("no cache".into()));
        };
        let rows = q.rows;
        let (rows_i, width_i, pos_i) = (rows as i32, width as i32, a.pos as i32);
        let (kb, vb) = (buf(&k)?, buf(&v)?);
        launch!(
            self.dev,
            self.dev.k.kv_store,
            blocks(rows * width, 256),
            kb,
            vb,
            &rows_i,
            &width_i,
            &pos_i,
            &mut *kc,
            &mut *vc
        )?;
        if let Some(f) = a.cache.filled.borrow_mut().get_mut(a.layer) {
            *f = a.pos + rows;
        }
        self.ensure(&mut o, rows)?;
        let qb = buf(&q)?;
        let out = buf_mut(&mut o)?;
        let (nh, nkv, hd) = (a.n_head as i32, c.n_head_kv as i32, c.head_dim as i32);
        let window = a.window as i32;
        let cfg = LaunchConfig {
            grid_dim: ((rows * a.n_head).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: ((a.pos + rows) * 4) as u32,
        };
        let (kc, vc) = (&*kc, &*vc);
        launch!(
            self.dev,
            self.dev.k.attention,
            cfg,
            qb,
            kc,
            vc,
            &rows_i,
            &nh,
            &nkv,
            &hd,
            &pos_i,
            &a.scale,
            &window,
            out
        )
    }

    fn glu(&self, gate: &CudaTensor, up: &CudaTensor, act: Activation) -> Result<()> {
        let g = gate.0.try_borrow().map_err(|_| busy())?;
        let mut u = up.0.try_borrow_mut().map_err(|_| busy())?;
        let n = u.rows * u.cols;
        let (gb, ub) = (buf(&g)?, buf_mut(&mut u)?);
        let (n_i, act_i) = (n as i32, i32::from(act == Activation::GeluTanh));
        launch!(
            self.dev,
            self.dev.k.glu,
            blocks(n, 256),
            gb,
            ub,
            &n_i,
            &act_i
        )
    }

    fn add(&self, acc: &CudaTensor, x: &CudaTensor) -> Result<()> {
        let mut a = acc.0.try_borrow_mut().map_err(|_| busy())?;
        let x = x.0.try_borrow().map_err(|_| busy())?;
        let n = a.rows * a.cols;
        let (ab, xb) = (buf_mut(&mut a)?, buf(&x)?);
        let n_i = n as i32;
        launch!(self.dev, self.dev.k.add, blocks(n, 256), ab, xb, &n_i)
    }

    fn scale(&self, x: &CudaTensor, s: f32) -> Result<()> {
        let mut m = x.0.try_borrow_mut().map_err(|_| busy())?;
        let n = m.rows * m.cols;
        let xb = buf_mut(&mut m)?;
        let n_i = n as i32;
        launch!(self.dev, self.dev.k.scale, blocks(n, 256), xb, &n_i, &s)
    }

    fn softmax(&self, x: &CudaTensor) -> Result<()> {
        let mut m = x.0.try_borrow_mut().map_err(|_| busy())?;
        let (rows, cols) = (m.rows, m.cols as i32);
        let xb = buf_mut(&mut m)?;
        let cfg = LaunchConfig {
            grid_dim: (rows.max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self.dev, self.dev.k.softmax, cfg, xb, &cols)
    }

    fn keep_last_row(&self, x: &CudaTensor) -> Result<()> {
        let mut m = x.0.try_borrow_mut().map_err(|_| busy())?;
        if m.rows > 1 {
            let (rows, cols) = (m.rows as i32, m.cols as i32);
            let n = m.cols;
            let xb = buf_mut(&mut m)?;
            launch!(
                self.dev,
                self.dev.k.last_row,
                blocks(n, 256),
                xb,
                &rows,
                &cols
            )?;
            m.rows = 1;
        }
        Ok(())
    }
}
