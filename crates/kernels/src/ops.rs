//! Checks shared by the compute providers (the native host and the WebAssembly one), so
//! both refuse the same requests with the same messages.

use half::f16;
use realm_gguf::GgmlType;

use crate::kernels::{AttnShape, LayerCache};

/// Why a request was refused; each provider maps it to its own WIT error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpError {
    InvalidArgument(String),
    OutOfBounds(String),
    Unsupported(String),
    ResourceExhausted(String),
}

fn invalid(m: impl Into<String>) -> OpError {
    OpError::InvalidArgument(m.into())
}

/// Largest tensor an op may allocate (elements).
pub const MAX_TENSOR_ELEMENTS: usize = 1 << 28;

/// An f32 activation tensor, row-major: the providers' `tensor` resource.
#[derive(Debug, Default)]
pub struct Tensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Tensor {
    /// An empty tensor `cols` wide.
    pub fn new(cols: usize) -> Self {
        Tensor {
            rows: 0,
            cols,
            data: Vec::new(),
        }
    }

    /// Row `row`, or an error past the end.
    pub fn row(&self, row: usize) -> Result<&[f32], OpError> {
        if row >= self.rows {
            return Err(OpError::OutOfBounds(format!(
                "row {row} of a tensor with {} rows",
                self.rows
            )));
        }
        Ok(&self.data[row * self.cols..(row + 1) * self.cols])
    }

    /// Replaces the contents with `rows` rows of `data`.
    pub fn write(&mut self, rows: usize, data: Vec<f32>) -> Result<(), OpError> {
        if data.len() != rows * self.cols {
            return Err(invalid(format!(
                "{} values for {rows} rows of {}",
                data.len(),
                self.cols
            )));
        }
        self.rows = rows;
        self.data = data;
        Ok(())
    }

    /// `rows` rows (contents unspecified), within [`MAX_TENSOR_ELEMENTS`].
    pub fn set_rows(&mut self, rows: usize) -> Result<(), OpError> {
        let n = rows
            .checked_mul(self.cols)
            .filter(|&n| n <= MAX_TENSOR_ELEMENTS)
            .ok_or_else(|| {
                OpError::ResourceExhausted(format!(
                    "{rows} × {} tensor is larger than {MAX_TENSOR_ELEMENTS} elements",
                    self.cols
                ))
            })?;
        self.rows = rows;
        self.data.resize(n, 0.0);
        Ok(())
    }
}

/// A weight as the ops read it.
pub struct WeightView<'a> {
    pub ty: GgmlType,
    pub dims: &'a [u64],
    /// Its bytes in the file.
    pub bytes: &'a [u8],
    /// Its values, for the types decoded at load.
    pub decoded: Option<&'a [f32]>,
}

/// Rows `ids` of the table `w`, times `scale`, into `o`.
pub fn embed(w: &WeightView, ids: &[u32], scale: f32, o: &mut Tensor) -> Result<(), OpError> {
    let row_len = w.dims[0] as usize;
    let n_rows = w.dims[1..].iter().product::<u64>() as usize;
    if o.cols != row_len {
        return Err(invalid(format!(
            "embedding rows are {row_len} wide, the output {}",
            o.cols
        )));
    }
    o.set_rows(ids.len())?;
    let row_bytes = w.ty.row_bytes(row_len as u64).unwrap_or(0) as usize;
    for (i, &id) in ids.iter().enumerate() {
        if id as usize >= n_rows {
            return Err(OpError::OutOfBounds(format!(
                "token id {id} is past the {n_rows}-row embedding"
            )));
        }
        let dst = &mut o.data[i * row_len..(i + 1) * row_len];
        match w.decoded {
            Some(d) => dst.copy_from_slice(&d[id as usize * row_len..][..row_len]),
            None => {
                let src = &w.bytes[id as usize * row_bytes..][..row_bytes];
                realm_gguf::quant::dequantize(w.ty, src, dst)
                    .map_err(|e| invalid(e.to_string()))?;
            }
        }
        if scale != 1.0 {
            dst.iter_mut().for_each(|v| *v *= scale);
        }
    }
    Ok(())
}

/// RMS norm of `x` by the decoded weight `w` into `o`.
pub fn rms_norm(x: &Tensor, w: Option<&[f32]>, eps: f32, o: &mut Tensor) -> Result<(), OpError> {
    let wv = w.ok_or_else(|| invalid("rms-norm weights must be f32, f16 or bf16"))?;
    if wv.is_empty() || o.cols != x.cols || !x.cols.is_multiple_of(wv.len()) {
        return Err(invalid(format!(
            "rms-norm of width {} with a {}-wide weight into width {}",
            x.cols,
            wv.len(),
            o.cols
        )));
    }
    o.set_rows(x.rows)?;
    crate::kernels::rms_norm(&x.data, wv, eps, &mut o.data);
    Ok(())
}

/// RoPE in place on every row of `t` (row `i` at position `pos + i`), with optional per-pair
/// frequency factors (`n_rot / 2` of them or more, f32-decoded).
pub fn rope(
    t: &mut Tensor,
    pos: u32,
    p: &crate::kernels::RopeParams,
    factors: Option<Option<&[f32]>>,
    cache: &mut Vec<(f32, f32)>,
) -> Result<(), OpError> {
    let finite_pos = |v: f32| v.is_finite() && v > 0.0;
    let shape_ok = p.head_dim > 0
        && p.n_rot > 0
        && p.n_rot.is_multiple_of(2)
        && p.n_rot <= p.head_dim
        && t.cols.is_multiple_of(p.head_dim);
    let scaling_ok = finite_pos(p.freq_base)
        && finite_pos(p.freq_scale)
        && p.attn_factor.is_finite()
        && p.ext_factor.is_finite()
        && (p.ext_factor == 0.0
            || (p.n_ctx_orig > 0 && finite_pos(p.beta_fast) && finite_pos(p.beta_slow)));
    if !shape_ok || !scaling_ok {
        return Err(invalid(format!(
            "rope with head_dim {} (n_rot {}) on width {}, {p:?}",
            p.head_dim, p.n_rot, t.cols
        )));
    }
    let factors = match factors {
        None => None,
        Some(None) => return Err(invalid("rope frequency factors must be f32, f16 or bf16")),
        Some(Some(f)) if f.len() < p.n_rot / 2 => {
            return Err(invalid(format!(
                "rope needs {} frequency factors, the weight has {}",
                p.n_rot / 2,
                f.len()
            )));
        }
        Some(Some(f)) => {
            if let Some(bad) = f.iter().find(|v| !finite_pos(**v)) {
                return Err(invalid(format!(
                    "rope frequency factor {bad} is not positive"
                )));
            }
            Some(f)
        }
    };
    let cols = t.cols;
    for (i, row) in t.data.chunks_exact_mut(cols).enumerate() {
        let at = pos.saturating_add(i as u32);
        crate::kernels::rope(row, p, factors, at, cache);
    }
    Ok(())
}

/// `up = act(gate) · up`.
pub fn glu(gate: &Tensor, up: &mut Tensor, act: crate::kernels::Gate) -> Result<(), OpError> {
    if gate.data.len() != up.data.len() || gate.cols != up.cols {
        return Err(invalid(format!(
            "glu of {}×{} and {}×{}",
            gate.rows, gate.cols, up.rows, up.cols
        )));
    }
    crate::kernels::glu(&gate.data, &mut up.data, act);
    Ok(())
}

/// `acc += x`.
pub fn add(acc: &mut Tensor, x: &Tensor) -> Result<(), OpError> {
    if x.data.len() != acc.data.len() {
        return Err(invalid(format!(
            "add of {}×{} and {}×{}",
            acc.rows, acc.cols, x.rows, x.cols
        )));
    }
    acc.data.iter_mut().zip(&x.data).for_each(|(a, &b)| *a += b);
    Ok(())
}

/// Softmax of each row.
pub fn softmax(t: &mut Tensor) -> Result<(), OpError> {
    if t.cols == 0 {
        return Err(invalid("softmax of a zero-width tensor"));
    }
    let cols = t.cols;
    t.data
        .chunks_exact_mut(cols)
        .for_each(crate::kernels::softmax);
    Ok(())
}

/// Keeps only the last row.
pub fn keep_last_row(t: &mut Tensor) {
    if t.rows > 1 {
        let start = (t.rows - 1) * t.cols;
        t.data.drain(..start);
        t.rows = 1;
    }
}

/// A weight that passed [`check_weight`]: its bytes (`offset..offset + len` of the file)
/// and, for f32/f16/bf16, its values decoded once (quantized types are used in place).
#[derive(Debug)]
pub struct CheckedWeight {
    pub offset: usize,
    pub len: usize,
    pub decoded: Option<Vec<f32>>,
}

/// A `dims` weight of type `ty` at `offset` of `file`: 1 to 4 non-zero dimensions, rows
/// of whole blocks, no overflow, inside the file, and a type the kernels support.
pub fn check_weight(
    file: &[u8],
    offset: u64,
    ty: GgmlType,
    dims: &[u64],
) -> Result<CheckedWeight, OpError> {
    if dims.is_empty() || dims.len() > 4 || dims.contains(&0) {
        return Err(invalid(format!(
            "weight shape {dims:?} must have 1 to 4 non-zero dimensions"
        )));
    }
    let n = dims
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| invalid(format!("weight shape {dims:?} overflows")))?;
    if !dims[0].is_multiple_of(ty.block_size()) {
        return Err(invalid(format!(
            "weight rows of {} are not whole {ty} blocks",
            dims[0]
        )));
    }
    let len = ty
        .bytes_for(n)
        .ok_or_else(|| invalid(format!("weight shape {dims:?} overflows")))?;
    let size = file.len() as u64;
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= size)
        .ok_or_else(|| {
            OpError::OutOfBounds(format!(
                "weight of {len} bytes at offset {offset} passes the end of the file ({size} bytes)"
            ))
        })?;
    let (offset, end) = (offset as usize, end as usize);
    let decoded = match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            let mut v = vec![0f32; n as usize];
            realm_gguf::quant::dequantize(ty, &file[offset..end], &mut v)
                .map_err(|e| invalid(e.to_string()))?;
            Some(v)
        }
        _ if ty.is_supported() => None,
        _ => {
            return Err(OpError::Unsupported(format!(
                "no kernels for {ty} weights yet"
            )));
        }
    };
    Ok(CheckedWeight {
        offset,
        len: end - offset,
        decoded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_checked_before_use() {
        let file = vec![0u8; 1000];
        let ok = check_weight(&file, 0, GgmlType::F32, &[4, 2]).expect("fits");
        assert_eq!((ok.len, ok.decoded.map(|v| v.len())), (32, Some(8)));
        let q = check_weight(&file, 100, GgmlType::Q8_0, &[32, 2]).expect("fits");
        assert_eq!((q.offset, q.len, q.decoded.is_none()), (100, 68, true));
        let bad = [
            (check_weight(&file, 0, GgmlType::F32, &[]), "1 to 4"),
            (check_weight(&file, 0, GgmlType::F32, &[1, 0]), "1 to 4"),
            (check_weight(&file, 0, GgmlType::Q8_0, &[16]), "whole"),
            (
                check_weight(&file, 0, GgmlType::F32, &[u64::MAX, 2]),
                "overflows",
            ),
            (
                check_weight(&file, 990, GgmlType::F32, &[4]),
                "passes the end",
            ),
            (
                check_weight(&file, u64::MAX, GgmlType::F32, &[4]),
                "passes the end",
            ),
        ];
        for (r, why) in bad {
            let msg = format!("{:?}", r.expect_err(why));
            assert!(msg.contains(why), "{msg}");
        }
    }
}

/// A KV cache: per layer, the f16 keys and values of every position so far.
#[derive(Debug, Default)]
pub struct KvCache {
    pub n_ctx: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    /// Sizes are checked when the cache is first written (construction cannot fail in WIT).
    pub fn new(n_layer: u32, n_ctx: u32, n_head_kv: u32, head_dim: u32) -> Self {
        KvCache {
            n_ctx: n_ctx as usize,
            n_head_kv: n_head_kv as usize,
            head_dim: head_dim as usize,
            layers: (0..n_layer.min(4096))
                .map(|_| LayerCache::default())
                .collect(),
        }
    }

    /// The same geometry, no layers (while the layers are borrowed elsewhere).
    pub fn shell(&self) -> Self {
        KvCache {
            n_ctx: self.n_ctx,
            n_head_kv: self.n_head_kv,
            head_dim: self.head_dim,
            layers: Vec::new(),
        }
    }
}

/// The checks and the cache update of the attention op: `q`, `k`, `v` against the cache's
/// heads and context (at most `max_kv` cached values in all), then `k` and `v` (as f16)
/// stored at positions `pos..` of `layer` (a later position overwrites the tail), and `o`
/// sized to `q`'s rows. Returns the shape for [`crate::kernels::attend_row`].
#[allow(clippy::too_many_arguments, reason = "the attention op's arguments")]
pub fn append_kv(
    c: &mut KvCache,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    layer: usize,
    pos: usize,
    n_head: usize,
    (scale, window): (f32, usize),
    max_kv: u64,
    o: &mut Tensor,
) -> Result<AttnShape, OpError> {
    let (hd, n_kv) = (c.head_dim, c.n_head_kv);
    let kv_width = n_kv * hd;
    if hd == 0 || n_kv == 0 || n_head == 0 || !n_head.is_multiple_of(n_kv) {
        return Err(invalid(format!(
            "attention with {n_head} heads over {n_kv} KV heads of {hd}"
        )));
    }
    if q.cols != n_head * hd || k.cols != kv_width || v.cols != kv_width || o.cols != q.cols {
        return Err(invalid(
            "attention tensor widths disagree with the cache's heads",
        ));
    }
    if k.rows != q.rows || v.rows != q.rows {
        return Err(invalid("q, k and v must have the same number of rows"));
    }
    let n = q.rows;
    if pos.checked_add(n).is_none_or(|end| end > c.n_ctx) {
        return Err(OpError::ResourceExhausted(format!(
            "positions {pos}..{} pass the context of {}",
            pos + n,
            c.n_ctx
        )));
    }
    if (c.n_ctx as u64) * (kv_width as u64) * (c.layers.len() as u64) * 2 > max_kv {
        return Err(OpError::ResourceExhausted(format!(
            "a KV cache of more than {max_kv} values is larger than this provider allows"
        )));
    }
    let n_layers = c.layers.len();
    let lc = c
        .layers
        .get_mut(layer)
        .ok_or_else(|| invalid(format!("layer {layer} of a {n_layers}-layer cache")))?;
    lc.k.truncate(pos * kv_width);
    lc.v.truncate(pos * kv_width);
    if lc.k.len() != pos * kv_width {
        return Err(invalid(format!(
            "position {pos} skips past the {} cached positions",
            lc.k.len() / kv_width
        )));
    }
    lc.k.extend(k.data.iter().map(|&x| f16::from_f32(x)));
    lc.v.extend(v.data.iter().map(|&x| f16::from_f32(x)));
    o.set_rows(n)?;
    Ok(AttnShape {
        n_head,
        n_head_kv: n_kv,
        head_dim: hd,
        scale,
        window,
        tiled: n >= crate::kernels::FA_TILE,
    })
}
