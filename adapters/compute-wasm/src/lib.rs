//! `realm:compute` in WebAssembly.
//!
//! The native host provider keeps weights in a memory map outside the guest and runs SIMD
//! kernels on many threads. This component implements the same interface inside
//! WebAssembly, so that the Realm component plugged with it needs nothing but WASI: a stock
//! `wasmtime run`, Python's `wasmtime` or Node through `jco` can run it.
//!
//! - `open-model(name)` reads the file `name` through WASI (a path under a preopened
//!   directory) into this component's linear memory. A 32-bit component has 4 GiB at
//!   most, so larger files are refused with an error that says so.
//! - Every op has the native provider's semantics and checks, and the same kernels
//!   (`realm-kernels`, its portable code): quantized matmuls with ggml's numerics, ggml's
//!   flash attention, RMS norm, RoPE, GLU. Results are the native host's bit for bit where
//!   the C library's math functions agree (they are the same routines in glibc and
//!   wasi-libc); the greedy test checks the text.
//! - One thread; no weight budget (the weights are already in memory).

wit_bindgen::generate!({
    path: "wit",
    world: "provider",
    generate_all,
});

use std::cell::RefCell;
use std::rc::Rc;

use exports::realm::compute::store::{self, GuestModelFile, GuestWeight, WeightBorrow};
use exports::realm::compute::tensors::{self, GuestKvCache, GuestTensor, TensorBorrow};
use exports::realm::compute::types::{Activation, Dtype, Error, RopeMode, RopeParams};
use half::f16;
use realm_gguf::GgmlType;
use realm_kernels::kernels;
use realm_kernels::ops::{self, KvCache as KvData, OpError, Tensor as TensorData, WeightView};
use realm_kernels::quant::{self, VecDot};

/// Largest model file this component loads: what a 32-bit linear memory can hold with
/// room left for the activations, the KV cache and the guest's own state.
pub const MAX_MODEL_BYTES: u64 = 3 << 30;
/// Largest KV cache (f16 values, keys and values together) in this memory.
pub const MAX_KV_ELEMENTS: u64 = 1 << 28;

type Res<T> = Result<T, Error>;

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

fn op_error(e: OpError) -> Error {
    match e {
        OpError::InvalidArgument(m) => Error::InvalidArgument(m),
        OpError::OutOfBounds(m) => Error::OutOfBounds(m),
        OpError::Unsupported(m) => Error::Unsupported(m),
        OpError::ResourceExhausted(m) => Error::ResourceExhausted(m),
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

/// A model file's bytes, read once, shared by its weights.
pub struct ModelFile(Rc<Vec<u8>>);

/// A checked byte range of a model file; f32/f16/bf16 weights decoded once.
pub struct Weight {
    file: Rc<Vec<u8>>,
    offset: usize,
    len: usize,
    ty: GgmlType,
    dims: Vec<u64>,
    decoded: Option<Vec<f32>>,
}

impl Weight {
    fn view(&self) -> WeightView<'_> {
        WeightView {
            ty: self.ty,
            dims: &self.dims,
            bytes: self.bytes(),
            decoded: self.decoded.as_deref(),
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.file[self.offset..self.offset + self.len]
    }

    fn row_len(&self) -> usize {
        self.dims[0] as usize
    }

    fn n_rows(&self) -> usize {
        self.dims[1..].iter().product::<u64>() as usize
    }
}

pub struct Tensor(RefCell<TensorData>);

pub struct KvCache(RefCell<KvData>);

/// Scratch buffers reused across calls.
#[derive(Default)]
struct Scratch {
    quantized: Vec<u8>,
    attn: Vec<f16>,
    rope: Vec<(f32, f32)>,
    row: Vec<f32>,
    tiled_kv: kernels::TiledKv,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

struct Provider;

impl store::Guest for Provider {
    type ModelFile = ModelFile;
    type Weight = Weight;

    fn open_model(name: String) -> Res<store::ModelFile> {
        let size = std::fs::metadata(&name)
            .map_err(|e| Error::NotFound(format!("cannot open model file '{name}': {e}")))?
            .len();
        if size > MAX_MODEL_BYTES {
            return Err(Error::ResourceExhausted(format!(
                "'{name}' is {:.1} GiB: the self-contained component keeps the weights in its \
                 own 32-bit memory, which holds models up to {} GiB; run larger models with \
                 the native host (`realm run`)",
                size as f64 / f64::from(1u32 << 30),
                MAX_MODEL_BYTES >> 30
            )));
        }
        let bytes =
            std::fs::read(&name).map_err(|e| Error::Io(format!("cannot read '{name}': {e}")))?;
        Ok(store::ModelFile::new(ModelFile(Rc::new(bytes))))
    }

    /// The weights are in this component's memory already: nothing to budget.
    fn set_max_resident(_bytes: u64) {}

    fn prefetch(_w: WeightBorrow<'_>) {}
}

impl GuestModelFile for ModelFile {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read(&self, offset: u64, len: u32) -> Res<Vec<u8>> {
        let size = self.0.len() as u64;
        let end = offset
            .checked_add(u64::from(len))
            .filter(|&e| e <= size)
            .ok_or_else(|| {
                Error::OutOfBounds(format!(
                    "read of {len} bytes at {offset} passes the end of the file ({size} bytes)"
                ))
            })?;
        Ok(self.0[offset as usize..end as usize].to_vec())
    }

    fn weight(&self, offset: u64, dtype: Dtype, dims: Vec<u64>) -> Res<store::Weight> {
        let ty = ggml_type(dtype);
        let w = ops::check_weight(&self.0, offset, ty, &dims).map_err(op_error)?;
        Ok(store::Weight::new(Weight {
            file: self.0.clone(),
            offset: w.offset,
            len: w.len,
            ty,
            dims,
            decoded: w.decoded,
        }))
    }
}

impl GuestWeight for Weight {
    fn dims(&self) -> Vec<u64> {
        self.dims.clone()
    }
}

impl GuestTensor for Tensor {
    fn new(cols: u32) -> Self {
        Tensor(RefCell::new(TensorData::new(cols as usize)))
    }

    fn rows(&self) -> u32 {
        self.0.borrow().rows as u32
    }

    fn cols(&self) -> u32 {
        self.0.borrow().cols as u32
    }

    fn read_row(&self, row: u32) -> Res<Vec<f32>> {
        Ok(self
            .0
            .borrow()
            .row(row as usize)
            .map_err(op_error)?
            .to_vec())
    }

    fn write(&self, rows: u32, data: Vec<f32>) -> Res<()> {
        self.0
            .borrow_mut()
            .write(rows as usize, data)
            .map_err(op_error)
    }
}

impl GuestKvCache for KvCache {
    fn new(n_layer: u32, n_ctx: u32, n_head_kv: u32, head_dim: u32) -> Self {
        KvCache(RefCell::new(KvData::new(
            n_layer, n_ctx, n_head_kv, head_dim,
        )))
    }

    fn capacity(&self) -> u32 {
        self.0.borrow().n_ctx as u32
    }
}

/// An op's output must be another tensor than its inputs (as the native host requires;
/// here it also keeps the `RefCell` borrows apart).
fn distinct(a: &Tensor, b: &Tensor) -> Res<()> {
    if std::ptr::eq(a, b) {
        Err(invalid(
            "an op's output must be a different tensor from its inputs",
        ))
    } else {
        Ok(())
    }
}

fn matmul_into(x: &TensorData, w: &Weight, o: &mut TensorData, s: &mut Scratch) -> Res<()> {
    let (k, n) = (w.row_len(), w.n_rows());
    if x.cols != k || o.cols != n {
        return Err(invalid(format!(
            "matmul of a {}-wide input by a {k}→{n} weight into width {}",
            x.cols, o.cols
        )));
    }
    o.set_rows(x.rows).map_err(op_error)?;
    let wrow = w.ty.row_bytes(k as u64).unwrap_or(0) as usize;
    match (&w.decoded, VecDot::for_weight(w.ty)) {
        (Some(wf), _) => {
            for (orow, xrow) in o.data.chunks_exact_mut(n).zip(x.data.chunks_exact(k)) {
                for (j, ov) in orow.iter_mut().enumerate() {
                    *ov = wf[j * k..(j + 1) * k]
                        .iter()
                        .zip(xrow)
                        .map(|(a, b)| a * b)
                        .sum();
                }
            }
        }
        (None, Some(kind)) => {
            if !k.is_multiple_of(kind.block_len()) {
                return Err(invalid(format!(
                    "rows of {k} are not whole {}-element activation blocks",
                    kind.block_len()
                )));
            }
            let wb = w.bytes();
            for (orow, xrow) in o.data.chunks_exact_mut(n).zip(x.data.chunks_exact(k)) {
                s.quantized.clear();
                quant::quantize_row(kind, xrow, &mut s.quantized);
                quant::dot_rows(w.ty, wb, wrow, &s.quantized, 0, orow);
            }
        }
        (None, None) => {
            // Types without an integer kernel: each weight row dequantized, then f32.
            let wb = w.bytes();
            s.row.resize(k, 0.0);
            for (orow, xrow) in o.data.chunks_exact_mut(n).zip(x.data.chunks_exact(k)) {
                for (j, ov) in orow.iter_mut().enumerate() {
                    let row = &wb[j * wrow..(j + 1) * wrow];
                    let _ = realm_gguf::quant::dequantize(w.ty, row, &mut s.row);
                    *ov = s.row.iter().zip(xrow).map(|(a, b)| a * b).sum();
                }
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments, reason = "mirrors the WIT signature")]
fn attention_into(
    (q, k, v): (&TensorData, &TensorData, &TensorData),
    c: &mut KvData,
    layer: usize,
    pos: usize,
    n_head: usize,
    scale: f32,
    window: usize,
    o: &mut TensorData,
    s: &mut Scratch,
) -> Res<()> {
    let shape = ops::append_kv(
        c,
        (q, k, v),
        layer,
        pos,
        n_head,
        (scale, window),
        MAX_KV_ELEMENTS,
        o,
    )
    .map_err(op_error)?;
    let lc = &c.layers[layer];
    let cols = q.cols;
    if shape.tiled {
        s.tiled_kv.build(lc, shape, pos + q.rows);
    }
    for (i, (orow, qrow)) in o
        .data
        .chunks_exact_mut(cols)
        .zip(q.data.chunks_exact(cols))
        .enumerate()
    {
        if shape.tiled {
            kernels::attend_row_tiled(qrow, &s.tiled_kv, pos + i, shape, 0..n_head, orow);
        } else {
            kernels::attend_row(qrow, lc, pos + i, shape, 0..n_head, &mut s.attn, orow);
        }
    }
    Ok(())
}

impl tensors::Guest for Provider {
    type Tensor = Tensor;
    type KvCache = KvCache;

    fn embed(table: WeightBorrow<'_>, ids: Vec<u32>, scale: f32, out: TensorBorrow<'_>) -> Res<()> {
        let mut o = out.get::<Tensor>().0.borrow_mut();
        ops::embed(&table.get::<Weight>().view(), &ids, scale, &mut o).map_err(op_error)
    }

    fn matmul(x: TensorBorrow<'_>, w: WeightBorrow<'_>, out: TensorBorrow<'_>) -> Res<()> {
        let (x, out) = (x.get::<Tensor>(), out.get::<Tensor>());
        distinct(x, out)?;
        SCRATCH.with_borrow_mut(|s| {
            matmul_into(&x.0.borrow(), w.get::<Weight>(), &mut out.0.borrow_mut(), s)
        })
    }

    fn rms_norm(
        x: TensorBorrow<'_>,
        w: WeightBorrow<'_>,
        eps: f32,
        out: TensorBorrow<'_>,
    ) -> Res<()> {
        let (x, out) = (x.get::<Tensor>(), out.get::<Tensor>());
        distinct(x, out)?;
        let decoded = w.get::<Weight>().decoded.as_deref();
        ops::rms_norm(&x.0.borrow(), decoded, eps, &mut out.0.borrow_mut()).map_err(op_error)
    }

    fn rope(
        x: TensorBorrow<'_>,
        pos: u32,
        params: RopeParams,
        factors: Option<WeightBorrow<'_>>,
    ) -> Res<()> {
        let mut t = x.get::<Tensor>().0.borrow_mut();
        let p = kernels::RopeParams {
            head_dim: params.head_dim as usize,
            n_rot: params.n_rot as usize,
            neox: params.mode == RopeMode::Neox,
            freq_base: params.freq_base,
            freq_scale: params.freq_scale,
            ext_factor: params.ext_factor,
            attn_factor: params.attn_factor,
            beta_fast: params.beta_fast,
            beta_slow: params.beta_slow,
            n_ctx_orig: params.n_ctx_orig,
        };
        let f = factors
            .as_ref()
            .map(|w| w.get::<Weight>().decoded.as_deref());
        SCRATCH
            .with_borrow_mut(|s| ops::rope(&mut t, pos, &p, f, &mut s.rope))
            .map_err(op_error)
    }

    #[allow(clippy::too_many_arguments, reason = "mirrors the WIT signature")]
    fn attention(
        q: TensorBorrow<'_>,
        k: TensorBorrow<'_>,
        v: TensorBorrow<'_>,
        cache: tensors::KvCacheBorrow<'_>,
        layer: u32,
        pos: u32,
        n_head: u32,
        scale: f32,
        window: u32,
        out: TensorBorrow<'_>,
    ) -> Res<()> {
        let (q, k, v, out) = (
            q.get::<Tensor>(),
            k.get::<Tensor>(),
            v.get::<Tensor>(),
            out.get::<Tensor>(),
        );
        distinct(q, out)?;
        distinct(k, out)?;
        distinct(v, out)?;
        let mut c = cache.get::<KvCache>().0.borrow_mut();
        SCRATCH.with_borrow_mut(|s| {
            attention_into(
                (&q.0.borrow(), &k.0.borrow(), &v.0.borrow()),
                &mut c,
                layer as usize,
                pos as usize,
                n_head as usize,
                scale,
                window as usize,
                &mut out.0.borrow_mut(),
                s,
            )
        })
    }

    fn glu(gate: TensorBorrow<'_>, up: TensorBorrow<'_>, act: Activation) -> Res<()> {
        let (gate, up) = (gate.get::<Tensor>(), up.get::<Tensor>());
        distinct(gate, up)?;
        let f = match act {
            Activation::Silu => kernels::Gate::Silu,
            Activation::GeluTanh => kernels::Gate::GeluTanh,
        };
        ops::glu(&gate.0.borrow(), &mut up.0.borrow_mut(), f).map_err(op_error)
    }

    fn add(acc: TensorBorrow<'_>, x: TensorBorrow<'_>) -> Res<()> {
        let (acc, x) = (acc.get::<Tensor>(), x.get::<Tensor>());
        distinct(acc, x)?;
        ops::add(&mut acc.0.borrow_mut(), &x.0.borrow()).map_err(op_error)
    }

    fn scale(x: TensorBorrow<'_>, s: f32) -> Res<()> {
        x.get::<Tensor>()
            .0
            .borrow_mut()
            .data
            .iter_mut()
            .for_each(|v| *v *= s);
        Ok(())
    }

    fn softmax(x: TensorBorrow<'_>) -> Res<()> {
        ops::softmax(&mut x.get::<Tensor>().0.borrow_mut()).map_err(op_error)
    }

    fn keep_last_row(x: TensorBorrow<'_>) -> Res<()> {
        ops::keep_last_row(&mut x.get::<Tensor>().0.borrow_mut());
        Ok(())
    }
}

export!(Provider);
