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
//! summed in f64, ggml's SiLU and f16 flash-attention accumulation.
//!
//! A tenant's ops are queued, not launched: the queue is flushed on its own stream when
//! the guest reads a result. While queued, launches are merged where the result is the same
//! bits: a norm into the product after it, products of one input into one launch, an add
//! into the product that made its operand, the RoPE of q and k into one launch that stores
//! the keys and values, and that launch (normal mode) into the q/k/v product before it
//! (`REALM_CUDA_ROPE_FOLD=0`: not; the rules and their guards against races: `merge`); a
//! merged launch too large for one wave of blocks takes more columns a warp when sent
//! (`merge::one_wave`; `REALM_CUDA_ONE_WAVE=0`: not). A
//! step whose launches equal the previous step's (decoding: same kernels, buffers and
//! shapes; positions live in device memory) is captured once as a CUDA graph and replayed,
//! one launch per token instead of one per op. A step is sent in growing parts (one layer,
//! then 1.25 times as many launches as the part before, `send_part`), so that the GPU runs
//! the first layers while the guest queues the rest; each part has a graph of its own
//! (`REALM_CUDA_PARTS=0` sends whole steps, `=N` parts growing N-fold). On compute
//! capability 9.0+ a tenant's launches are programmatic dependent launches: a kernel is
//! scheduled while the one before it runs and waits for it in `step_start` (decode
//! 1.16-1.21× on the H200; `REALM_CUDA_PDL=0` turns it off). `REALM_CUDA_TRACE=1` prints
//! where each session's steps spent their time (`trace`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, LaunchConfig, sys,
};
use realm_compute::{
    Activation, Attention, Backend, CacheShape, Error, GgmlType, ModelBytes, Result, RopeMode,
    RopeParams, Shape, WeightData, WeightMeta,
};

mod merge;
mod trace;

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

/// The kernels, by index into [`CudaDevice::k`] (names as in `kernels.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum K {
    Matmul,
    QuantizeQ8,
    MatmulQ8,
    QuantizeQ8k,
    MatmulQ8k,
    Embed,
    RmsNorm,
    Rope,
    KvStore,
    Attention,
    Glu,
    Add,
    Scale,
    Softmax,
    LastRow,
    MatmulQ8Fused,
    MatmulQ8kFused,
    MatmulQ8Tiled,
    MatmulQ81Tiled,
    MatmulQ8kTiled,
    MatmulQ8kMma,
    AttentionTiled,
    AttentionTiled1,
    AttentionTiled2,
    AttentionRows,
}

const KERNEL_NAMES: [&str; 25] = [
    "matmul",
    "quantize_q8",
    "matmul_q8",
    "quantize_q8k",
    "matmul_q8k",
    "embed",
    "rms_norm",
    "rope",
    "kv_store",
    "attention",
    "glu",
    "add",
    "scale",
    "softmax",
    "last_row",
    "matmul_q8_fused",
    "matmul_q8k_fused",
    "matmul_q8_tiled",
    "matmul_q81_tiled",
    "matmul_q8k_tiled",
    "matmul_q8k_mma",
    "attention_tiled",
    "attention_tiled1",
    "attention_tiled2",
    "attention_rows",
];

/// Products of more rows than this run in tiles (`matmul_q8_tiled`, `matmul_q81_tiled`,
/// `matmul_q8k_tiled`: 32 rows × 32 columns per block); up to this many, one warp per
/// column.
const MATVEC_ROWS: usize = 8;
/// Query rows from which attention takes the CPU backend's tiled numerics
/// (`realm_kernels::kernels::FA_TILE`, ggml-cpu's `GGML_FA_TILE_Q`; a test checks they agree).
const FA_TILE_ROWS: usize = 64;
/// Dynamic shared memory of `attention_rows`: a chunk's values (`AR_TILE_BYTES`).
const ATTENTION_ROWS_TILE: u32 = 32 * 1024;
/// Rows and columns of a `matmul_q8_tiled` block.
const TILE: usize = 32;
/// Rows and columns of a `matmul_q8k_mma` block.
const MMA_TILE: usize = 64;

/// Quantized activations of up to this many rows and bytes are made inside the matmul's
/// blocks, in shared memory (one launch instead of two: decoding). Every block quantizes
/// all rows, so prompts keep their own quantization kernel.
const FUSED_ROWS: usize = 8;
const _: () = assert!(FUSED_ROWS <= MATVEC_ROWS);
const FUSED_SMEM: usize = 48 * 1024;
/// Super-blocks a warp of `matmul_q8k_fused` stages at a time: `K_CHUNK` in `kernels.cu`.
const K_CHUNK: usize = 8;

/// Warps (output columns) per block of a fused matvec, unless `REALM_CUDA_MATVEC_WARPS`
/// (1 to 16) says otherwise: more columns share each block's quantization of x, fewer
/// spread a small product over more of the GPU.
const MATVEC_WARPS: u32 = 8;

/// Dynamic shared memory of a fused matvec over `blocks` activation blocks: x's 40-byte q8
/// blocks (`matmul_q8_fused`), or the warps' weight chunks (super-blocks padded to 212
/// bytes) then x's Q8_K blocks. K-quant products of 8 rows take the tiled order, not
/// the fused kernel's.
fn fused_smem(warps: u32, blocks: usize, bytes: usize, q81: Option<i32>) -> usize {
    let warps = warps as usize;
    match q81 {
        Some(_) => blocks * 40,
        None => warps * K_CHUNK * 212 + blocks * bytes,
    }
}

/// One GPU: its context, kernels and the weights uploaded to it (shared by every tenant's
/// backend there; each tenant computes on a stream of its own).
pub struct CudaDevice {
    name: String,
    ctx: Arc<CudaContext>,
    /// The uploads' stream (each is waited for: tenants read weights from their streams).
    stream: Arc<CudaStream>,
    k: Vec<CudaFunction>,
    /// Uploaded weights by (file, offset, length): one copy per device however many
    /// tenants. Each entry holds its file, so that no other file can take its address.
    weights: Mutex<HashMap<WeightKey, (ModelBytes, DeviceBytes)>>,
    /// Steps replayed from a captured graph, and graphs captured, by all its tenants.
    replays: AtomicU64,
    captures: AtomicU64,
    /// Whether the GPU has int8 MMA (compute capability 8.0 or later): K-quant prompts
    /// then run on its tensor cores (`matmul_q8k_mma`), else in dp4a tiles.
    mma: bool,
    /// A tenant's launches may start while the one before finishes (programmatic dependent
    /// launch, compute capability 9.0+: each kernel waits in `step_start`).
    pdl: bool,
    /// Steps are sent in parts while the guest queues them (`send_part`), each part this
    /// many times as long as the one before: `PART_GROWTH`, or REALM_CUDA_PARTS (1 to 64;
    /// 0 sends whole steps).
    part_growth: f32,
    /// Normal-mode RoPE folded into the q/k/v launch before it (`merge::fold_rope`), unless
    /// REALM_CUDA_ROPE_FOLD=0.
    rope_fold: bool,
    /// Fused matvecs spread to run in one wave (`merge::one_wave`), unless
    /// `REALM_CUDA_ONE_WAVE=0` (for comparisons).
    one_wave: bool,
    /// Warps per block of the fused matvecs (`MATVEC_WARPS`).
    matvec_warps: u32,
    /// Warps of fused matvec blocks the GPU holds at once (two blocks a multiprocessor).
    resident_warps: usize,
}

/// NVRTC's options for a GPU of compute capability `major`: PTX for 9.0 (programmatic
/// dependent launch) or 8.0 (the tensor cores' int8 MMA) where the GPU has them, else
/// NVRTC's default.
fn nvrtc_options(major: i32) -> cudarc::nvrtc::CompileOptions {
    cudarc::nvrtc::CompileOptions {
        arch: match major {
            9.. => Some("compute_90"),
            8 => Some("compute_80"),
            _ => None,
        },
        ..Default::default()
    }
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
    // Every build: with programmatic dependent launch, with the tensor cores' MMA, neither.
    for major in [9, 8, 7] {
        cudarc::nvrtc::compile_ptx_with_opts(KERNELS, nvrtc_options(major))
            .map_err(|e| format!("compiling Realm's CUDA kernels: {e}"))?;
    }
    Ok(())
}

const NO_NVRTC: &str =
    "no NVRTC found (libnvrtc.so, from a CUDA toolkit: add its lib64 folder to LD_LIBRARY_PATH)";

impl CudaDevice {
    /// Opens GPU `ordinal`: the driver and NVRTC loaded, the kernels compiled. A machine
    /// without them gets a one-line error.
    pub fn open(ordinal: usize) -> std::result::Result<Arc<Self>, String> {
        Self::open_with(ordinal, true)
    }

    /// [`CudaDevice::open`], with the K-quant prompts in dp4a tiles even where the GPU has
    /// int8 MMA (the same bits; for tests and comparisons).
    pub fn open_without_tensor_cores(ordinal: usize) -> std::result::Result<Arc<Self>, String> {
        Self::open_with(ordinal, false)
    }

    fn open_with(ordinal: usize, tensor_cores: bool) -> std::result::Result<Arc<Self>, String> {
        // SAFETY: only tries to load the library (dlopen), calling nothing in it.
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
        // How a host thread waits for the GPU, for comparisons (REALM_CUDA_SCHED=spin, yield
        // or blocking; the driver's own choice otherwise: spinning while there are fewer
        // contexts than cores).
        if let Ok(how) = std::env::var("REALM_CUDA_SCHED") {
            use sys::CUctx_flags::*;
            let flags = match how.as_str() {
                "spin" => CU_CTX_SCHED_SPIN,
                "yield" => CU_CTX_SCHED_YIELD,
                "blocking" => CU_CTX_SCHED_BLOCKING_SYNC,
                _ => return Err(format!("REALM_CUDA_SCHED={how}: spin, yield or blocking")),
            };
            ctx.set_flags(flags)
                .map_err(|e| format!("REALM_CUDA_SCHED={how}: {e}"))?;
        }
        // Buffers are ordered by Realm itself (a tenant's on its stream; weights uploaded and
        // waited for before any tenant reads them): cudarc's per-use events would only add
        // host time to every op.
        // SAFETY: no buffer is created before this; see above for how each use is ordered.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let major = ctx.compute_capability().map_or(0, |(major, _)| major);
        let mma = tensor_cores && major >= 8;
        // Programmatic dependent launch, unless REALM_CUDA_PDL=0 (for comparisons).
        let pdl = major >= 9 && std::env::var("REALM_CUDA_PDL").map_or(true, |v| v != "0");
        let part_growth = std::env::var("REALM_CUDA_PARTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&g: &f32| g == 0.0 || (1.0..=64.0).contains(&g))
            .unwrap_or(PART_GROWTH);
        let rope_fold = std::env::var("REALM_CUDA_ROPE_FOLD").map_or(true, |v| v != "0");
        let mut options = nvrtc_options(major);
        // Kernel variants for comparisons: REALM_CUDA_DEFINES="NAME=VALUE,..." (macros that
        // kernels.cu tests with #ifndef, e.g. MV_CH).
        if let Ok(defines) = std::env::var("REALM_CUDA_DEFINES") {
            options.options = defines
                .split([' ', ','])
                .filter(|d| !d.is_empty())
                .map(|d| format!("-D{d}"))
                .collect();
        }
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNELS, options)
            .map_err(|e| format!("compiling Realm's CUDA kernels: {e}"))?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| format!("loading Realm's CUDA kernels: {e}"))?;
        let k = KERNEL_NAMES
            .iter()
            .map(|n| {
                module
                    .load_function(n)
                    .map_err(|e| format!("kernel {n}: {e}"))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let stream = ctx.default_stream();
        stream.synchronize().map_err(|e| format!("CUDA: {e}"))?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_or(1, |n| n.max(1) as usize);
        let matvec_warps = std::env::var("REALM_CUDA_MATVEC_WARPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|w| (1..=16).contains(w))
            .unwrap_or(MATVEC_WARPS);
        Ok(Arc::new(Self {
            name,
            ctx,
            stream,
            k,
            weights: Mutex::default(),
            replays: AtomicU64::new(0),
            captures: AtomicU64::new(0),
            mma,
            pdl,
            part_growth,
            rope_fold,
            one_wave: std::env::var("REALM_CUDA_ONE_WAVE").map_or(true, |v| v != "0"),
            matvec_warps,
            resident_warps: sms * 2 * matvec_warps as usize,
        }))
    }

    /// The GPU's name, as the driver gives it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Steps its tenants ran from a captured CUDA graph so far, and graphs captured.
    pub fn graph_stats(&self) -> (u64, u64) {
        (
            self.replays.load(Ordering::Relaxed),
            self.captures.load(Ordering::Relaxed),
        )
    }

    /// Bytes of weights uploaded to this device.
    pub fn weight_bytes(&self) -> usize {
        self.weights
            .lock()
            .map_or(0, |w| w.values().map(|(_, s)| s.len()).sum())
    }

    /// `w`'s bytes on the device, uploaded on first use (and waited for).
    fn weight(&self, w: &WeightData) -> Result<Arc<CudaSlice<u8>>> {
        let key = (w.file.bytes().as_ptr() as usize, w.offset, w.len);
        let mut map = self.weights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, s)) = map.get(&key) {
            return Ok(s.clone());
        }
        let s = Arc::new(self.stream.clone_htod(w.bytes()).map_err(gpu)?);
        self.stream.synchronize().map_err(gpu)?;
        map.insert(key, (w.file.clone(), s.clone()));
        Ok(s)
    }

    /// Values uploaded (and waited for) on the device's stream.
    fn upload(&self, v: &[f32]) -> Result<CudaSlice<f32>> {
        let s = self.stream.clone_htod(v).map_err(gpu)?;
        self.stream.synchronize().map_err(gpu)?;
        Ok(s)
    }

    /// Launches `k` now on the device's stream (the test helpers below).
    fn launch_now(&self, k: K, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        launch_on(&self.stream, &self.k[k as usize], cfg, args, false)
    }

    /// Rows of `x` quantized by the `quantize_q8` kernel (q8_0, or q8_1), read back: what
    /// the matmuls of quantized weights multiply.
    #[doc(hidden)]
    pub fn quantize_q8(&self, x: &[f32], k: usize, q81: bool) -> Result<Vec<u8>> {
        let rows = x.len() / k.max(1);
        let xd = self.stream.clone_htod(x).map_err(gpu)?;
        let blocks_n = rows * (k / 32);
        let out = self
            .stream
            .alloc_zeros::<u8>((blocks_n * if q81 { 36 } else { 34 }).max(1))
            .map_err(gpu)?;
        let args = [
            ptr(&xd, &self.stream),
            Arg::I(rows as i32),
            Arg::I(k as i32),
            Arg::I(i32::from(q81)),
            ptr(&out, &self.stream),
        ];
        self.launch_now(K::QuantizeQ8, blocks(blocks_n * 32, 256), &args)?;
        self.stream.clone_dtoh(&out).map_err(gpu)
    }

    /// Rows of `x` quantized by the `quantize_q8k` kernel (ggml's Q8_K), read back.
    #[doc(hidden)]
    pub fn quantize_q8k(&self, x: &[f32]) -> Result<Vec<u8>> {
        let blocks_n = x.len() / 256;
        let xd = self.stream.clone_htod(x).map_err(gpu)?;
        let out = self
            .stream
            .alloc_zeros::<u8>((blocks_n * Q8_K_BYTES).max(1))
            .map_err(gpu)?;
        let args = [
            ptr(&xd, &self.stream),
            Arg::I(blocks_n as i32),
            ptr(&out, &self.stream),
        ];
        self.launch_now(K::QuantizeQ8k, blocks(blocks_n * 32, 256), &args)?;
        self.stream.clone_dtoh(&out).map_err(gpu)
    }
}

/// A kernel argument as launched: a device address, or a 32-bit value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arg {
    P(u64),
    I(i32),
    /// An f32, by its bits (so that launches compare exactly).
    F(u32),
}

fn f(v: f32) -> Arg {
    Arg::F(v.to_bits())
}

/// `s`'s device address (no event is recorded: tracking is off).
fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> Arg {
    Arg::P(s.device_ptr(stream).0)
}

/// One queued launch.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Launch {
    k: K,
    grid: u32,
    block: u32,
    smem: u32,
    args: Vec<Arg>,
}

/// Launches `func` on `stream`; with `pdl`, as a programmatic dependent launch (it may
/// start while the kernel before it runs: each kernel waits for that one in `step_start`).
fn launch_on(
    stream: &Arc<CudaStream>,
    func: &CudaFunction,
    cfg: LaunchConfig,
    args: &[Arg],
    pdl: bool,
) -> Result<()> {
    // Each argument in 8 bytes; the driver reads a 4-byte one from the first four
    // (little-endian: its low half).
    let mut vals: Vec<u64> = args
        .iter()
        .map(|a| match *a {
            Arg::P(p) => p,
            Arg::I(i) => u64::from(i as u32),
            Arg::F(bits) => u64::from(bits),
        })
        .collect();
    let mut params: Vec<*mut std::ffi::c_void> = vals
        .iter_mut()
        .map(|v| (v as *mut u64).cast::<std::ffi::c_void>())
        .collect();
    let mut attr = sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value: sys::CUlaunchAttributeValue {
            programmaticStreamSerializationAllowed: 1,
        },
    };
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: u32::from(pdl),
    };
    stream.context().bind_to_thread().map_err(gpu)?;
    // SAFETY: every kernel's arguments are given in its signature's order and sizes
    // (`kernels.cu`: pointers as 64-bit addresses, ints and floats as 32 bits), over buffers
    // at least as large as the sizes passed (`ensure`) and alive until the launch has run
    // (buffers replaced in a step are kept until its flush: `retired`); `vals`, `params` and
    // `attr` outlive the call, which copies them.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            func.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
    .map_err(gpu)
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

/// Positions a step can pass to its kernels through device memory before it is flushed.
const POS_SLOTS: usize = 4096;
/// Each part of a step sent before its end has at least this many times the launches of
/// the part before it (`send_part`). Small, so that the guest (whose WIT calls queue a
/// SmolLM2 layer in 11-19 µs on the H200 machine, against 23-25 µs of the GPU's) has the
/// next part ready before the GPU has run the last one (`REALM_CUDA_TRACE`; SmolLM2 decode
/// 1,345 tok/s against 942-1,151 with growth 3, the 1B model 1,101 against 1,061-1,071).
const PART_GROWTH: f32 = 1.25;

/// A CUDA graph of one part of a step's launches, replayed while the steps stay the same.
struct Replay {
    launches: Vec<Launch>,
    graph: CudaGraph,
}

/// The step being queued.
#[derive(Default)]
struct Queue {
    launches: Vec<Launch>,
    /// The positions its kernels read (slot i of the backend's `pos` buffer).
    pos: Vec<i32>,
    /// Slots of `pos` already written to the device (by parts of the step sent before).
    written: usize,
    /// Launches of the step sent before (in parts).
    sent: usize,
    /// Buffers replaced during the step, freed after its launches.
    retired: Vec<CudaSlice<f32>>,
}

/// The CUDA backend of one tenant: its own stream, its queued step and the graph of its
/// last repeated step.
pub struct CudaBackend {
    dev: Arc<CudaDevice>,
    stream: Arc<CudaStream>,
    /// Graphs are captured only on a stream of the tenant's own.
    own_stream: bool,
    max_kv: u64,
    queue: RefCell<Queue>,
    /// The previous step's launches, part by part (a part seen twice in a row is captured).
    last: RefCell<Vec<Vec<Launch>>>,
    /// The graph of each part of the step, where one was captured.
    replay: RefCell<Vec<Option<Replay>>>,
    /// The part of the step being queued, and the launches it needs before it is sent.
    part: std::cell::Cell<(usize, usize)>,
    /// Positions read by the queued kernels, `POS_SLOTS` of them.
    pos: Option<CudaSlice<i32>>,
    /// Quantized activations, reused across matmuls.
    xq: RefCell<Option<CudaSlice<u8>>>,
    /// Token ids for `embed`, reused.
    ids: RefCell<Option<CudaSlice<u32>>>,
    /// RoPE's cos and sin per position, one table per set of parameters in use.
    ropes: RefCell<Vec<RopeTable>>,
    /// Step times, with `REALM_CUDA_TRACE=1` (`trace`).
    trace: Option<trace::Tracer>,
    /// Where rows read back land first (`read_row`); set once the host refused page-locked
    /// memory, so that reads do not ask again every token.
    pinned: RefCell<Option<Pinned>>,
    no_pinned: std::cell::Cell<bool>,
}

/// Page-locked host memory for rows read back: the GPU copies into it directly, where a
/// copy into pageable memory goes through the driver's own staging (40-70 µs for a
/// 49,152-value row on the H200 machine, `REALM_CUDA_TRACE`). Not write-combined: the host
/// reads it.
struct Pinned {
    ctx: Arc<CudaContext>,
    ptr: *mut f32,
    len: usize,
}

impl Pinned {
    fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self> {
        ctx.bind_to_thread().map_err(gpu)?;
        // SAFETY: a plain allocation of `len` f32s (flags 0: page-locked, cached), freed
        // once, on drop.
        let ptr = unsafe { cudarc::driver::result::malloc_host(len * 4, 0) }.map_err(gpu)?;
        Ok(Self {
            ctx: ctx.clone(),
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // (A tenant may be dropped on another thread than the one that made it.)
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` came from malloc_host and is freed only here; no copy into it is
        // pending (each read waits for its copy).
        let _ = unsafe { cudarc::driver::result::free_host(self.ptr.cast()) };
    }
}

/// RoPE's (cos, sin) pairs for positions `..positions` of one set of parameters, made on
/// the host by the CPU backend's code ([`RopeParams::angles`]) so that both rotate alike.
struct RopeTable {
    p: RopeParams,
    factors: Option<Vec<f32>>,
    positions: usize,
    buf: CudaSlice<f32>,
}

// SAFETY: the graph (raw driver handles, hence not `Send` by itself) is used only through
// `&self` methods of a backend, which is not `Sync`: one thread at a time.
unsafe impl Send for CudaBackend {}

impl CudaBackend {
    pub fn new(dev: Arc<CudaDevice>, max_kv: u64) -> Self {
        let (stream, own_stream) = match dev.ctx.new_stream() {
            Ok(s) => (s, true),
            Err(_) => (dev.stream.clone(), false),
        };
        let pos = stream.alloc_zeros::<i32>(POS_SLOTS).ok();
        let trace = trace::Tracer::from_env(&dev.ctx);
        Self {
            dev,
            stream,
            own_stream,
            max_kv,
            queue: RefCell::default(),
            last: RefCell::default(),
            replay: RefCell::default(),
            part: std::cell::Cell::new((0, 1)),
            pos,
            xq: RefCell::new(None),
            ids: RefCell::new(None),
            ropes: RefCell::default(),
            trace,
            pinned: RefCell::new(None),
            no_pinned: std::cell::Cell::new(false),
        }
    }

    /// The index of the RoPE table for `p` and `fac` covering positions `..need`, made (or
    /// remade larger: twice what is needed, at least 1024 positions) when there is none.
    /// Launches of the step so far, after merging (see `merge`): queued, or sent in parts.
    pub fn queued(&self) -> usize {
        let q = self.queue.borrow();
        q.sent + q.launches.len()
    }

    fn rope_table(&self, p: &RopeParams, fac: Option<&[f32]>, need: usize) -> Result<usize> {
        let ropes = self.ropes.borrow();
        let at = ropes
            .iter()
            .position(|t| t.p == *p && t.factors.as_deref() == fac);
        if let Some(i) = at
            && ropes[i].positions >= need
        {
            return Ok(i);
        }
        let positions = need.next_power_of_two().max(1024);
        let mut pairs = Vec::with_capacity(positions * (p.n_rot as usize / 2));
        for q in 0..positions {
            p.angles(fac, q as u32, &mut pairs);
        }
        let flat: Vec<f32> = pairs.iter().flat_map(|&(c, s)| [c, s]).collect();
        // Queued launches may read the old table: run them first.
        drop(ropes);
        self.flush()?;
        let table = RopeTable {
            p: *p,
            factors: fac.map(<[f32]>::to_vec),
            positions,
            buf: self.dev.upload(&flat)?,
        };
        let mut ropes = self.ropes.borrow_mut();
        Ok(match at {
            Some(i) => {
                ropes[i] = table;
                i
            }
            None => {
                ropes.push(table);
                ropes.len() - 1
            }
        })
    }

    /// Queues kernel `k`.
    fn rec(&self, k: K, cfg: LaunchConfig, args: Vec<Arg>) {
        if let Some(t) = &self.trace {
            t.queued();
        }
        self.queue.borrow_mut().launches.push(Launch {
            k,
            grid: cfg.grid_dim.0,
            block: cfg.block_dim.0,
            smem: cfg.shared_mem_bytes,
            args,
        });
    }

    /// A device address holding `pos` when the step runs.
    fn pos_arg(&self, pos: usize) -> Result<Arg> {
        let full = self.queue.borrow().pos.len() >= POS_SLOTS;
        if full {
            self.flush()?;
        }
        let Some(buf) = &self.pos else {
            return Err(gpu("no position buffer"));
        };
        let mut q = self.queue.borrow_mut();
        let pos =
            i32::try_from(pos).map_err(|_| Error::InvalidArgument(format!("position {pos}")))?;
        // The same position as the op before: its slot (so that merged launches can see it).
        if q.pos.last() != Some(&pos) {
            q.pos.push(pos);
        }
        let slot = q.pos.len() - 1;
        let Arg::P(base) = ptr(buf, &self.stream) else {
            return Err(gpu("no position buffer"));
        };
        Ok(Arg::P(base + 4 * slot as u64))
    }

    /// Runs the queued step: from its graph when the same launches ran as one before,
    /// captured when they repeat the previous step's, else launched one by one.
    fn flush(&self) -> Result<()> {
        self.send(true)
    }

    /// Sends the queued part of the step (ends it when `end`), each part as `flush` runs a
    /// step: replayed, captured or launched one by one.
    fn send(&self, end: bool) -> Result<()> {
        let mut q = self.queue.borrow_mut();
        let (part, _) = self.part.get();
        let mut launches = std::mem::take(&mut q.launches);
        if self.dev.one_wave {
            let resident = (self.dev.resident_warps / self.dev.matvec_warps as usize) as u32;
            for l in &mut launches {
                merge::one_wave(l, resident);
            }
        }
        let from = q.written;
        let pos = q.pos[from..].to_vec();
        if end {
            self.part.set((0, 1));
            q.pos.clear();
            (q.written, q.sent) = (0, 0);
        } else {
            q.written = q.pos.len();
            q.sent += launches.len();
            self.part.set((
                part + 1,
                (self.dev.part_growth * launches.len() as f32).ceil() as usize,
            ));
        }
        if launches.is_empty() {
            return Ok(());
        }
        let retired = std::mem::take(&mut q.retired);
        drop(q);
        if let Some(t) = &self.trace {
            t.sending(&self.stream);
        }
        if !pos.is_empty() {
            // The slots, written before the launches that read them (stream order).
            self.write_pos(from, &pos)?;
        }
        let mut replay = self.replay.borrow_mut();
        let mut last = self.last.borrow_mut();
        if replay.len() <= part {
            replay.resize_with(part + 1, || None);
            last.resize_with(part + 1, Vec::new);
        }
        let result = if let Some(r) = replay[part].as_ref().filter(|r| r.launches == launches) {
            self.dev.replays.fetch_add(1, Ordering::Relaxed);
            r.graph.launch().map_err(gpu)
        } else if self.own_stream && last[part] == launches {
            match self.capture(&launches) {
                Ok(graph) => {
                    self.dev.captures.fetch_add(1, Ordering::Relaxed);
                    let r = graph.launch().map_err(gpu);
                    replay[part] = Some(Replay {
                        launches: launches.clone(),
                        graph,
                    });
                    r
                }
                // A graph that cannot be made: the launches one by one, as before.
                Err(_) => self.run(&launches),
            }
        } else {
            self.run(&launches)
        };
        last[part] = launches;
        drop(retired);
        result
    }

    /// Sends what is queued of the step so far when it has grown enough (called after a
    /// layer's attention, where no merge looks back past the cut): the GPU starts on the
    /// first layers while the guest queues the rest. Parts grow by `PART_GROWTH`: the
    /// first is one layer, sent while the guest has barely begun, and each later one is
    /// queued while the GPU runs the part before it.
    fn send_part(&self) -> Result<()> {
        let (_, need) = self.part.get();
        if self.dev.part_growth > 0.0 && self.queue.borrow().launches.len() >= need {
            self.send(false)?;
        }
        Ok(())
    }

    fn write_pos(&self, from: usize, pos: &[i32]) -> Result<()> {
        let Some(buf) = &self.pos else {
            return Err(gpu("no position buffer"));
        };
        // SAFETY: `buf` is this backend's and lives as long as it (slots `from..` exist:
        // `pos_arg` flushes before POS_SLOTS); the copy is ordered on its stream before the
        // launches that read them.
        let dst = buf.device_ptr(&self.stream).0 + 4 * from as u64;
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, pos, self.stream.cu_stream()) }
            .map_err(gpu)
    }

    fn run(&self, launches: &[Launch]) -> Result<()> {
        for l in launches {
            launch_on(
                &self.stream,
                &self.dev.k[l.k as usize],
                cfg_of(l),
                &l.args,
                self.dev.pdl && self.own_stream,
            )?;
        }
        Ok(())
    }

    /// The launches captured from this backend's stream as a graph.
    fn capture(&self, launches: &[Launch]) -> Result<CudaGraph> {
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(gpu)?;
        let ran = self.run(launches);
        let graph = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(gpu);
        ran?;
        graph?.ok_or_else(|| gpu("an empty graph"))
    }

    /// A buffer of at least `rows × cols` for `t` (its contents kept only if large enough;
    /// a replaced buffer lives until the queued step that may use it has run).
    fn ensure(&self, m: &mut DevMat, rows: usize) -> Result<()> {
        let need = (rows * m.cols).max(1);
        if m.buf.as_ref().is_none_or(|b| b.len() < need) {
            let new = self.stream.alloc_zeros::<f32>(need).map_err(gpu)?;
            if let Some(old) = m.buf.replace(new) {
                self.queue.borrow_mut().retired.push(old);
            }
        }
        m.rows = rows;
        Ok(())
    }

    fn p<T>(&self, s: &CudaSlice<T>) -> Arg {
        ptr(s, &self.stream)
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Queued launches may use buffers about to be freed: run them first.
        let _ = self.flush();
        let _ = self.stream.synchronize();
        if let Some(t) = &self.trace {
            t.report(self.dev.graph_stats());
        }
    }
}

fn cfg_of(l: &Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (l.grid, 1, 1),
        block_dim: (l.block, 1, 1),
        shared_mem_bytes: l.smem,
    }
}

fn blocks(n: usize, per: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(per).max(1), 1, 1),
        block_dim: (per, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn grid(n: usize, per: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.max(1) as u32, 1, 1),
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
        self.flush()?;
        let m = t.0.try_borrow().map_err(|_| busy())?;
        let b = buf(&m)?;
        let cols = m.cols;
        if (row + 1) * cols > b.len() {
            return Err(Error::InvalidArgument(format!(
                "row {row} of a {}-row tensor",
                m.rows
            )));
        }
        if let Some(t) = &self.trace {
            t.reading(&self.stream);
        }
        let mut pinned = self.pinned.borrow_mut();
        if !self.no_pinned.get() && pinned.as_ref().is_none_or(|p| p.len < cols) {
            // Without page-locked memory (a host limit), through the driver's staging.
            *pinned = Pinned::new(&self.dev.ctx, cols.max(1)).ok();
            self.no_pinned.set(pinned.is_none());
        }
        let row = match pinned.as_mut() {
            Some(p) => {
                // SAFETY: `p` holds at least `cols` f32s and is this backend's alone; the
                // copy (queued after the step's launches, on its stream) is waited for
                // before the slice is read or the buffer reused.
                let dst = unsafe { std::slice::from_raw_parts_mut(p.ptr, cols) };
                let src = b.device_ptr(&self.stream).0 + (row * cols * 4) as u64;
                unsafe {
                    cudarc::driver::result::memcpy_dtoh_async(dst, src, self.stream.cu_stream())
                }
                .map_err(gpu)?;
                self.stream.synchronize().map_err(gpu)?;
                if let Some(t) = &self.trace {
                    t.synced();
                }
                dst.to_vec()
            }
            None => {
                let view = b.slice(row * cols..(row + 1) * cols);
                self.stream.clone_dtoh(&view).map_err(gpu)?
            }
        };
        if let Some(t) = &self.trace {
            t.read();
        }
        Ok(row)
    }

    fn write(&self, t: &CudaTensor, rows: usize, data: Vec<f32>) -> Result<()> {
        // Queued launches come first (they may read this tensor's old contents).
        self.flush()?;
        let mut m = t.0.try_borrow_mut().map_err(|_| busy())?;
        self.ensure(&mut m, rows)?;
        let b = m
            .buf
            .as_mut()
            .ok_or_else(|| Error::InvalidArgument("no buffer".into()))?;
        let mut view = b.slice_mut(0..data.len());
        self.stream.memcpy_htod(&data, &mut view).map_err(gpu)
    }

    fn weight(&self, w: WeightData) -> Result<CudaWeight> {
        if let Some(v) = &w.meta.values {
            let values = Some(self.dev.upload(v)?);
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
        let (data, ty) = match (&table.bytes, &table.values) {
            (Some(b), _) => (self.p(&**b), kernel_type(table.meta.ty).unwrap_or(0)),
            // Decoded tables (F32/F16 files, biases) are f32 values: read as F32 rows.
            (None, Some(v)) => (self.p(v), 0),
            (None, None) => return Err(Error::InvalidArgument("an empty weight".into())),
        };
        // The ids are copied now: queued launches that read the old ones run first.
        self.flush()?;
        let mut o = o.0.try_borrow_mut().map_err(|_| busy())?;
        self.ensure(&mut o, ids.len())?;
        let k = table.meta.row_len();
        let mut ids_buf = self.ids.borrow_mut();
        if ids_buf.as_ref().is_none_or(|b| b.len() < ids.len()) {
            *ids_buf = Some(
                self.stream
                    .alloc_zeros::<u32>(ids.len().max(1))
                    .map_err(gpu)?,
            );
        }
        let Some(ids_dev) = ids_buf.as_mut() else {
            return Err(Error::InvalidArgument("no id buffer".into()));
        };
        if !ids.is_empty() {
            let mut view = ids_dev.slice_mut(0..ids.len());
            self.stream.memcpy_htod(ids, &mut view).map_err(gpu)?;
        }
        let args = vec![
            data,
            Arg::I(ty),
            Arg::I(k as i32),
            self.p(ids_dev),
            Arg::I(ids.len() as i32),
            f(scale),
            self.p(buf(&o)?),
        ];
        self.rec(K::Embed, grid(ids.len(), 256), args);
        Ok(())
    }

    fn matmul(&self, x: &CudaTensor, w: &CudaWeight, o: &CudaTensor) -> Result<()> {
        let x = x.0.try_borrow().map_err(|_| busy())?;
        let mut o = o.0.try_borrow_mut().map_err(|_| busy())?;
        let (k, n, rows) = (w.meta.row_len(), w.meta.n_rows(), x.rows);
        self.ensure(&mut o, rows)?;
        let (xb, out) = (self.p(buf(&x)?), self.p(buf(&o)?));
        let (k_i, n_i, rows_i) = (Arg::I(k as i32), Arg::I(n as i32), Arg::I(rows as i32));
        // One warp per output column, 8 warps per block.
        let cfg = blocks(n * 32, 256);
        let ty = Arg::I(kernel_type(w.meta.ty).unwrap_or(0));
        // Quantized activations: Q8_K for the K-quants' integer products, else q8_0/q8_1.
        let quantized = match w.meta.ty {
            GgmlType::Q4_K | GgmlType::Q6_K => Some((rows * (k / 256), Q8_K_BYTES, None)),
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => {
                Some((rows * (k / 32), 34, Some(0)))
            }
            GgmlType::Q4_1 | GgmlType::Q5_1 => Some((rows * (k / 32), 36, Some(1))),
            _ => None,
        };
        match (&w.bytes, &w.values, quantized) {
            (Some(bytes), _, Some((blocks_n, bytes_per, q81)))
                if rows <= FUSED_ROWS
                    && (q81.is_some() || rows < MATVEC_ROWS)
                    && fused_smem(self.dev.matvec_warps, blocks_n, bytes_per, q81)
                        <= FUSED_SMEM =>
            {
                let k = if q81.is_some() {
                    K::MatmulQ8Fused
                } else {
                    K::MatmulQ8kFused
                };
                let warps = self.dev.matvec_warps;
                // Wide products: several columns a warp, so that the blocks (each quantizing
                // x) are no more than the GPU holds at once (a second wave of a few blocks
                // would take as long as the first). matmul_q8_fused takes four columns a
                // warp at a time.
                let cpw = match k {
                    K::MatmulQ8Fused => 4 * n.div_ceil(4 * self.dev.resident_warps).clamp(1, 8),
                    _ => n.div_ceil(self.dev.resident_warps).clamp(1, 32),
                };
                let cfg = LaunchConfig {
                    shared_mem_bytes: fused_smem(warps, blocks_n, bytes_per, q81) as u32,
                    ..blocks(n.div_ceil(cpw) * 32, 32 * warps)
                };
                let mut args = vec![self.p(&**bytes), ty, n_i, out];
                args.extend([Arg::P(0), Arg::I(0), Arg::I(0), Arg::P(0)].repeat(2));
                args.extend([k_i, xb, rows_i, Arg::P(0), f(0.0), Arg::P(0), Arg::P(0)]);
                args.extend([Arg::I(cpw as i32), Arg::I(-1)]);
                args.extend(merge::NO_ROPE);
                merge::push_matvec(&mut self.queue.borrow_mut().launches, k, cfg, args);
                Ok(())
            }
            (Some(bytes), _, Some((blocks_n, bytes_per, q81))) => {
                let need = (blocks_n * bytes_per).max(1);
                let mut xq = self.xq.borrow_mut();
                if xq.as_ref().is_none_or(|b| b.len() < need) {
                    // The old buffer may be read by queued launches: run them first.
                    drop(xq);
                    self.flush()?;
                    xq = self.xq.borrow_mut();
                    *xq = Some(self.stream.alloc_zeros::<u8>(need).map_err(gpu)?);
                }
                let Some(xq) = xq.as_ref() else {
                    return Err(Error::InvalidArgument("no activation buffer".into()));
                };
                let xq = self.p(xq);
                let mm = match q81 {
                    None => {
                        let args = vec![xb, Arg::I(blocks_n as i32), xq];
                        self.rec(K::QuantizeQ8k, blocks(blocks_n * 32, 256), args);
                        K::MatmulQ8k
                    }
                    Some(q81) => {
                        let args = vec![xb, rows_i, k_i, Arg::I(q81), xq];
                        self.rec(K::QuantizeQ8, blocks(blocks_n * 32, 256), args);
                        K::MatmulQ8
                    }
                };
                let (mm, cfg) = match mm {
                    K::MatmulQ8k if rows > MATVEC_ROWS && self.dev.mma => (
                        K::MatmulQ8kMma,
                        grid(n.div_ceil(MMA_TILE) * rows.div_ceil(MMA_TILE), 256),
                    ),
                    K::MatmulQ8k if rows > MATVEC_ROWS => (
                        K::MatmulQ8kTiled,
                        grid(n.div_ceil(TILE) * rows.div_ceil(TILE), 256),
                    ),
                    K::MatmulQ8 if rows > MATVEC_ROWS => {
                        let tiles = n.div_ceil(TILE) * rows.div_ceil(TILE);
                        let tiled = if q81 == Some(1) {
                            K::MatmulQ81Tiled
                        } else {
                            K::MatmulQ8Tiled
                        };
                        (tiled, grid(tiles, 256))
                    }
                    _ => (mm, cfg),
                };
                self.rec(
                    mm,
                    cfg,
                    vec![self.p(&**bytes), ty, k_i, n_i, xq, rows_i, out],
                );
                Ok(())
            }
            (Some(bytes), _, None) => {
                // F16, F32 and Q5_K: values decoded on the fly, products in f32.
                self.rec(
                    K::Matmul,
                    cfg,
                    vec![self.p(&**bytes), ty, k_i, n_i, xb, rows_i, out],
                );
                Ok(())
            }
            (None, Some(values), _) => {
                // f32 values, read as F32 blocks.
                let args = vec![self.p(values), Arg::I(0), k_i, n_i, xb, rows_i, out];
                self.rec(K::Matmul, cfg, args);
                Ok(())
            }
            (None, None, _) => Err(Error::InvalidArgument("an empty weight".into())),
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
        let args = vec![
            self.p(buf(&x)?),
            self.p(values),
            Arg::I(g as i32),
            f(eps),
            self.p(buf(&o)?),
            Arg::I(groups as i32),
        ];
        self.rec(K::RmsNorm, grid(groups, 256), args);
        Ok(())
    }

    fn rope(&self, x: &CudaTensor, pos: u32, p: &RopeParams, fac: Option<&[f32]>) -> Result<()> {
        let m = x.0.try_borrow_mut().map_err(|_| busy())?;
        let (rows, cols) = (m.rows, m.cols);
        // The table first: making it runs the queued step, whose position slots are then
        // free for other values.
        let t = self.rope_table(p, fac, pos as usize + rows)?;
        let pos_arg = self.pos_arg(pos as usize)?;
        let ropes = self.ropes.borrow();
        let Some(table) = ropes.get(t) else {
            return Err(Error::InvalidArgument("no RoPE table".into()));
        };
        let args = vec![
            self.p(buf(&m)?),
            Arg::I(cols as i32),
            Arg::P(0),
            Arg::I(0),
            Arg::I(rows as i32),
            Arg::I(p.head_dim as i32),
            Arg::I(p.n_rot as i32),
            Arg::I(i32::from(p.mode == RopeMode::Neox)),
            pos_arg,
            self.p(&table.buf),
            Arg::P(0),
            Arg::P(0),
            Arg::P(0),
        ];
        merge::push_rope(&mut self.queue.borrow_mut().launches, args);
        Ok(())
    }

    fn attention(&self, a: Attention<'_, Self>, o: &CudaTensor) -> Result<()> {
        let c = a.cache.shape;
        if c.head_dim > 512 {
            return Err(Error::Unsupported(format!(
                "attention heads of {} values on the CUDA backend (at most 512)",
                c.head_dim
            )));
        }
        let pos_arg = self.pos_arg(a.pos)?;
        let q = a.q.0.try_borrow().map_err(|_| busy())?;
        let k = a.k.0.try_borrow().map_err(|_| busy())?;
        let v = a.v.0.try_borrow().map_err(|_| busy())?;
        let mut o = o.0.try_borrow_mut().map_err(|_| busy())?;
        let width = c.n_head_kv * c.head_dim;
        let mut layers = a.cache.layers.borrow_mut();
        let slot = layers
            .get_mut(a.layer)
            .ok_or_else(|| Error::InvalidArgument(format!("layer {}", a.layer)))?;
        if slot.is_none() {
            let n = (c.n_ctx * width).max(1);
            let kc = self.stream.alloc_zeros::<u16>(n).map_err(gpu)?;
            let vc = self.stream.alloc_zeros::<u16>(n).map_err(gpu)?;
            *slot = Some((kc, vc));
        }
        let Some((kc, vc)) = slot.as_ref() else {
            return Err(Error::InvalidArgument("no cache".into()));
        };
        let rows = q.rows;
        let (kc, vc) = (self.p(kc), self.p(vc));
        let args = vec![
            self.p(buf(&k)?),
            self.p(buf(&v)?),
            Arg::I(rows as i32),
            Arg::I(width as i32),
            pos_arg,
            kc,
            vc,
        ];
        let mut queue = self.queue.borrow_mut();
        let folded = merge::fold_kv_store(&mut queue.launches, &args);
        if folded && self.dev.rope_fold {
            merge::fold_rope(&mut queue.launches);
        }
        drop(queue);
        if !folded {
            self.rec(K::KvStore, blocks(rows * width, 256), args);
        }
        if let Some(f) = a.cache.filled.borrow_mut().get_mut(a.layer) {
            *f = a.pos + rows;
        }
        self.ensure(&mut o, rows)?;
        let args = vec![
            self.p(buf(&q)?),
            kc,
            vc,
            Arg::I(rows as i32),
            Arg::I(a.n_head as i32),
            Arg::I(c.n_head_kv as i32),
            Arg::I(c.head_dim as i32),
            pos_arg,
            f(if a.softcap != 0.0 {
                a.scale / a.softcap
            } else {
                a.scale
            }),
            Arg::I(a.window as i32),
            f(a.softcap),
            self.p(buf(&o)?),
        ];
        // Batches of 64 rows or more: the CPU backend's tiled numerics (ggml-cpu's), 64
        // threads (a tile's positions) for each of up to 4 heads of a KV group a block.
        if rows >= FA_TILE_ROWS {
            let group = a.n_head / c.n_head_kv.max(1);
            let hpb = [4, 3, 2, 1]
                .into_iter()
                .find(|&d| group.is_multiple_of(d))
                .unwrap_or(1);
            // (Heads of an odd size: the general kernel; the others take values in pairs.)
            let k = match c.head_dim {
                h if !h.is_multiple_of(2) => K::AttentionTiled,
                0..=64 => K::AttentionTiled1,
                65..=128 => K::AttentionTiled2,
                _ => K::AttentionTiled,
            };
            let mut args = args;
            args.push(Arg::I(hpb as i32));
            self.rec(k, grid(rows * a.n_head / hpb, 64 * hpb as u32), args);
            return self.send_part();
        }
        // Prompts: blocks of 64 threads where the head fits two values a thread; decoding
        // (a block per head): 256, whose eight warps score the positions sooner.
        let threads: u32 = if rows >= 16 && c.head_dim <= 128 {
            64
        } else {
            256
        };
        // Heads of 64, 128 or 256 values: a thread a position (`attention_rows`).
        if threads == 256 && matches!(c.head_dim, 64 | 128 | 256) {
            let cfg = LaunchConfig {
                shared_mem_bytes: ATTENTION_ROWS_TILE,
                ..grid(rows * a.n_head, threads)
            };
            self.rec(K::AttentionRows, cfg, args);
            return self.send_part();
        }
        // Decoding: 16 KiB more for a tile of values, copied while the block scores (in
        // words: heads of an even size).
        let tile = if threads == 256 && c.head_dim.is_multiple_of(2) {
            16 * 1024
        } else {
            0
        };
        let cfg = LaunchConfig {
            shared_mem_bytes: 3 * 8 * threads * 4 + tile,
            ..grid(rows * a.n_head, threads)
        };
        self.rec(K::Attention, cfg, args);
        self.send_part()
    }

    fn glu(&self, gate: &CudaTensor, up: &CudaTensor, act: Activation) -> Result<()> {
        let g = gate.0.try_borrow().map_err(|_| busy())?;
        let u = up.0.try_borrow_mut().map_err(|_| busy())?;
        let n = u.rows * u.cols;
        let act_i = i32::from(act == Activation::GeluTanh);
        let folded = merge::fold_glu(
            &mut self.queue.borrow_mut().launches,
            self.p(buf(&g)?),
            self.p(buf(&u)?),
            n,
            act_i,
        );
        if folded {
            return Ok(());
        }
        let args = vec![
            self.p(buf(&g)?),
            self.p(buf(&u)?),
            Arg::I(n as i32),
            Arg::I(act_i),
        ];
        self.rec(K::Glu, blocks(n, 256), args);
        Ok(())
    }

    fn add(&self, acc: &CudaTensor, x: &CudaTensor) -> Result<()> {
        let a = acc.0.try_borrow_mut().map_err(|_| busy())?;
        let x = x.0.try_borrow().map_err(|_| busy())?;
        let n = a.rows * a.cols;
        let folded = merge::fold_add(
            &mut self.queue.borrow_mut().launches,
            self.p(buf(&a)?),
            self.p(buf(&x)?),
            n,
        );
        if folded {
            return Ok(());
        }
        let args = vec![self.p(buf(&a)?), self.p(buf(&x)?), Arg::I(n as i32)];
        self.rec(K::Add, blocks(n, 256), args);
        Ok(())
    }

    fn scale(&self, x: &CudaTensor, s: f32) -> Result<()> {
        let m = x.0.try_borrow_mut().map_err(|_| busy())?;
        let n = m.rows * m.cols;
        let args = vec![self.p(buf(&m)?), Arg::I(n as i32), f(s)];
        self.rec(K::Scale, blocks(n, 256), args);
        Ok(())
    }

    fn scale_rows(&self, x: &CudaTensor, s: &[f32]) -> Result<()> {
        let m = x.0.try_borrow_mut().map_err(|_| busy())?;
        let Arg::P(base) = self.p(buf(&m)?) else {
            return Err(Error::InvalidArgument("no tensor buffer".into()));
        };
        // One launch per run of rows with the same factor (a step crosses few).
        let mut r = 0;
        while r < s.len().min(m.rows) {
            let end = (r..s.len().min(m.rows))
                .find(|&e| s[e].to_bits() != s[r].to_bits())
                .unwrap_or(s.len().min(m.rows));
            let n = (end - r) * m.cols;
            let at = Arg::P(base + (r * m.cols * std::mem::size_of::<f32>()) as u64);
            self.rec(
                K::Scale,
                blocks(n, 256),
                vec![at, Arg::I(n as i32), f(s[r])],
            );
            r = end;
        }
        Ok(())
    }

    fn softmax(&self, x: &CudaTensor) -> Result<()> {
        let m = x.0.try_borrow_mut().map_err(|_| busy())?;
        let args = vec![self.p(buf(&m)?), Arg::I(m.cols as i32)];
        self.rec(K::Softmax, grid(m.rows, 256), args);
        Ok(())
    }

    fn keep_last_row(&self, x: &CudaTensor) -> Result<()> {
        let mut m = x.0.try_borrow_mut().map_err(|_| busy())?;
        if m.rows > 1 {
            let args = vec![
                self.p(buf(&m)?),
                Arg::I(m.rows as i32),
                Arg::I(m.cols as i32),
            ];
            self.rec(K::LastRow, blocks(m.cols, 256), args);
            m.rows = 1;
        }
        Ok(())
    }

    fn rest(&self) {
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    /// Attention switches to the tiled numerics at the CPU backend's batch size.
    #[test]
    fn tiled_attention_starts_where_the_cpu_backends_does() {
        assert_eq!(super::FA_TILE_ROWS, realm_kernels::kernels::FA_TILE);
    }
}
