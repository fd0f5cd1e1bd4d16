//! The checks every backend shares, and [`Compute`] for every [`Backend`] through them:
//! a request a backend could misread (a shape that disagrees, a tensor that is both input
//! and output, a position past the cache, a weight past the end of its file) is refused
//! here with the same message whichever backend would have run it.

use crate::{
    Activation, Attention, Backend, CacheShape, Compute, Error, GgmlType, ModelBytes, Result,
    RopeParams, Shape, WeightData, WeightMeta, invalid,
};

/// Largest tensor an op may allocate (elements).
pub const MAX_TENSOR_ELEMENTS: usize = 1 << 28;

/// An output of `rows` × `cols` is within [`MAX_TENSOR_ELEMENTS`].
pub fn output_size(rows: usize, cols: usize) -> Result<()> {
    match rows.checked_mul(cols) {
        Some(n) if n <= MAX_TENSOR_ELEMENTS => Ok(()),
        _ => Err(Error::ResourceExhausted(format!(
            "{rows} × {cols} tensor is larger than {MAX_TENSOR_ELEMENTS} elements"
        ))),
    }
}

/// An op's output must not be one of its inputs.
pub fn distinct<T>(a: &T, b: &T) -> Result<()> {
    if std::ptr::eq(a, b) {
        Err(invalid(
            "an op's output must be a different tensor from its inputs",
        ))
    } else {
        Ok(())
    }
}

/// Row `row` of a tensor of `shape` exists.
pub fn row(shape: Shape, row: usize) -> Result<()> {
    if row >= shape.rows {
        return Err(Error::OutOfBounds(format!(
            "row {row} of a tensor with {} rows",
            shape.rows
        )));
    }
    Ok(())
}

/// `len` values fill `rows` rows of `cols`.
pub fn write(cols: usize, rows: usize, len: usize) -> Result<()> {
    if rows.checked_mul(cols) != Some(len) {
        return Err(invalid(format!("{len} values for {rows} rows of {cols}")));
    }
    output_size(rows, cols)
}

/// A `dims` weight of type `ty` at `offset` of `file`: 1 to 4 non-zero dimensions, rows of
/// whole blocks, no overflow, inside the file, and a type the kernels support. f32, f16
/// and bf16 weights are decoded (their values kept with the weight's metadata).
pub fn weight(file: &ModelBytes, offset: u64, ty: GgmlType, dims: &[u64]) -> Result<WeightData> {
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
    let size = file.bytes().len() as u64;
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= size)
        .ok_or_else(|| {
            Error::OutOfBounds(format!(
                "weight of {len} bytes at offset {offset} passes the end of the file ({size} bytes)"
            ))
        })?;
    let (offset, end) = (offset as usize, end as usize);
    let values = match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            let mut v = vec![0f32; n as usize];
            realm_gguf::quant::dequantize(ty, &file.bytes()[offset..end], &mut v)
                .map_err(|e| invalid(e.to_string()))?;
            Some(v)
        }
        _ if ty.is_supported() => None,
        _ => {
            return Err(Error::Unsupported(format!(
                "no kernels for {ty} weights yet"
            )));
        }
    };
    Ok(WeightData {
        file: file.clone(),
        offset,
        len: end - offset,
        meta: WeightMeta {
            ty,
            dims: dims.to_vec(),
            values,
        },
    })
}

/// Rows `ids` of `table` into an output `out_cols` wide.
pub fn embed(table: &WeightMeta, ids: &[u32], out_cols: usize) -> Result<()> {
    let (row_len, n_rows) = (table.row_len(), table.n_rows());
    if out_cols != row_len {
        return Err(invalid(format!(
            "embedding rows are {row_len} wide, the output {out_cols}"
        )));
    }
    if let Some(id) = ids.iter().find(|&&id| id as usize >= n_rows) {
        return Err(Error::OutOfBounds(format!(
            "token id {id} is past the {n_rows}-row embedding"
        )));
    }
    output_size(ids.len(), row_len)
}

/// `x` (rows × k) by a k → n weight into an output n wide.
pub fn matmul(x: Shape, w: &WeightMeta, out_cols: usize) -> Result<()> {
    let (k, n) = (w.row_len(), w.n_rows());
    if x.cols != k || out_cols != n {
        return Err(invalid(format!(
            "matmul of a {}-wide input by a {k}→{n} weight into width {out_cols}",
            x.cols
        )));
    }
    output_size(x.rows, n)
}

/// RMS norm of `x` by `w` (decoded, dividing the width) into an output as wide as `x`.
pub fn rms_norm(x: Shape, w: &WeightMeta, out_cols: usize) -> Result<()> {
    let wv = w
        .values
        .as_deref()
        .ok_or_else(|| invalid("rms-norm weights must be f32, f16 or bf16"))?;
    if wv.is_empty() || out_cols != x.cols || !x.cols.is_multiple_of(wv.len()) {
        return Err(invalid(format!(
            "rms-norm of width {} with a {}-wide weight into width {out_cols}",
            x.cols,
            wv.len(),
        )));
    }
    output_size(x.rows, x.cols)
}

/// RoPE parameters for rows `cols` wide, and the frequency factors (`n_rot / 2` or more
/// positive values of a float weight), returned decoded.
pub fn rope<'a>(
    cols: usize,
    p: &RopeParams,
    factors: Option<&'a WeightMeta>,
) -> Result<Option<&'a [f32]>> {
    let finite_pos = |v: f32| v.is_finite() && v > 0.0;
    let shape_ok = p.head_dim > 0
        && p.n_rot > 0
        && p.n_rot.is_multiple_of(2)
        && p.n_rot <= p.head_dim
        && cols.is_multiple_of(p.head_dim as usize);
    let scaling_ok = finite_pos(p.freq_base)
        && finite_pos(p.freq_scale)
        && p.attn_factor.is_finite()
        && p.ext_factor.is_finite()
        && (p.ext_factor == 0.0
            || (p.n_ctx_orig > 0 && finite_pos(p.beta_fast) && finite_pos(p.beta_slow)));
    if !shape_ok || !scaling_ok {
        return Err(invalid(format!(
            "rope with head_dim {} (n_rot {}) on width {cols}, {p:?}",
            p.head_dim, p.n_rot
        )));
    }
    let Some(f) = factors else { return Ok(None) };
    let f = f
        .values
        .as_deref()
        .ok_or_else(|| invalid("rope frequency factors must be f32, f16 or bf16"))?;
    if f.len() < p.n_rot as usize / 2 {
        return Err(invalid(format!(
            "rope needs {} frequency factors, the weight has {}",
            p.n_rot / 2,
            f.len()
        )));
    }
    if let Some(bad) = f.iter().find(|v| !finite_pos(**v)) {
        return Err(invalid(format!(
            "rope frequency factor {bad} is not positive"
        )));
    }
    Ok(Some(f))
}

/// The attention op: q, k and v against the cache's heads and context (at most `max_kv`
/// cached values in all), positions `pos…` continuing what layer `layer` holds (`filled`
/// positions; a lower `pos` overwrites the tail), and an output as wide as q.
#[allow(clippy::too_many_arguments, reason = "the attention op's arguments")]
pub fn attention(
    (q, k, v): (Shape, Shape, Shape),
    c: CacheShape,
    filled: impl FnOnce(usize) -> usize,
    layer: usize,
    pos: usize,
    n_head: usize,
    max_kv: u64,
    out_cols: usize,
) -> Result<()> {
    let (hd, n_kv) = (c.head_dim, c.n_head_kv);
    let kv_width = n_kv * hd;
    if hd == 0 || n_kv == 0 || n_head == 0 || !n_head.is_multiple_of(n_kv) {
        return Err(invalid(format!(
            "attention with {n_head} heads over {n_kv} KV heads of {hd}"
        )));
    }
    if q.cols != n_head * hd || k.cols != kv_width || v.cols != kv_width || out_cols != q.cols {
        return Err(invalid(
            "attention tensor widths disagree with the cache's heads",
        ));
    }
    if k.rows != q.rows || v.rows != q.rows {
        return Err(invalid("q, k and v must have the same number of rows"));
    }
    let n = q.rows;
    if pos.checked_add(n).is_none_or(|end| end > c.n_ctx) {
        return Err(Error::ResourceExhausted(format!(
            "positions {pos}..{} pass the context of {}",
            pos.saturating_add(n),
            c.n_ctx
        )));
    }
    if (c.n_ctx as u64) * (kv_width as u64) * (c.n_layer as u64) * 2 > max_kv {
        return Err(Error::ResourceExhausted(format!(
            "a KV cache of more than {max_kv} values is larger than this provider allows"
        )));
    }
    if layer >= c.n_layer {
        return Err(invalid(format!(
            "layer {layer} of a {}-layer cache",
            c.n_layer
        )));
    }
    let have = filled(layer);
    if pos > have {
        return Err(invalid(format!(
            "position {pos} skips past the {have} cached positions"
        )));
    }
    output_size(n, q.cols)
}

/// Two tensors of the same shape, for element-wise ops (`what`: the op's name).
pub fn same_shape(what: &str, a: Shape, b: Shape) -> Result<()> {
    if a != b {
        return Err(invalid(format!(
            "{what} of {}×{} and {}×{}",
            a.rows, a.cols, b.rows, b.cols
        )));
    }
    Ok(())
}

/// Softmax needs a width.
pub fn softmax(x: Shape) -> Result<()> {
    if x.cols == 0 {
        return Err(invalid("softmax of a zero-width tensor"));
    }
    Ok(())
}

/// Most layers a cache may have (construction cannot fail in WIT; a larger request gets a
/// cache of this many, and using a layer past it is refused).
pub const MAX_CACHE_LAYERS: u32 = 4096;

impl<B: Backend> Compute for B {
    type Tensor = B::Tensor;
    type Weight = B::Weight;
    type Cache = B::Cache;
    type File = ModelBytes;

    fn tensor(&self, cols: u32) -> B::Tensor {
        Backend::tensor(self, cols as usize)
    }

    fn cache(&self, n_layer: u32, n_ctx: u32, n_head_kv: u32, head_dim: u32) -> B::Cache {
        Backend::cache(
            self,
            CacheShape {
                n_layer: n_layer.min(MAX_CACHE_LAYERS) as usize,
                n_ctx: n_ctx as usize,
                n_head_kv: n_head_kv as usize,
                head_dim: head_dim as usize,
            },
        )
    }

    fn read_row(&self, t: &B::Tensor, r: u32) -> Result<Vec<f32>> {
        row(self.shape(t), r as usize)?;
        Backend::read_row(self, t, r as usize)
    }

    fn weight(
        &self,
        file: &ModelBytes,
        offset: u64,
        ty: GgmlType,
        dims: &[u64],
    ) -> Result<B::Weight> {
        Backend::weight(self, weight(file, offset, ty, dims)?)
    }

    fn embed(&self, table: &B::Weight, ids: &[u32], scale: f32, out: &B::Tensor) -> Result<()> {
        embed(self.weight_meta(table), ids, self.shape(out).cols)?;
        Backend::embed(self, table, ids, scale, out)
    }

    fn matmul(&self, x: &B::Tensor, w: &B::Weight, out: &B::Tensor) -> Result<()> {
        distinct(x, out)?;
        matmul(self.shape(x), self.weight_meta(w), self.shape(out).cols)?;
        Backend::matmul(self, x, w, out)
    }

    fn rms_norm(&self, x: &B::Tensor, w: &B::Weight, eps: f32, out: &B::Tensor) -> Result<()> {
        distinct(x, out)?;
        rms_norm(self.shape(x), self.weight_meta(w), self.shape(out).cols)?;
        Backend::rms_norm(self, x, w, eps, out)
    }

    fn rope(
        &self,
        x: &B::Tensor,
        pos: u32,
        p: &RopeParams,
        factors: Option<&B::Weight>,
    ) -> Result<()> {
        let f = rope(self.shape(x).cols, p, factors.map(|f| self.weight_meta(f)))?;
        Backend::rope(self, x, pos, p, f)
    }

    fn attention(
        &self,
        q: &B::Tensor,
        k: &B::Tensor,
        v: &B::Tensor,
        cache: &B::Cache,
        layer: u32,
        pos: u32,
        n_head: u32,
        scale: f32,
        window: u32,
        softcap: f32,
        out: &B::Tensor,
    ) -> Result<()> {
        for t in [q, k, v] {
            distinct(t, out)?;
        }
        if !softcap.is_finite() || softcap < 0.0 {
            return Err(invalid(format!(
                "attention softcap {softcap} is not a finite value >= 0"
            )));
        }
        attention(
            (self.shape(q), self.shape(k), self.shape(v)),
            self.cache_shape(cache),
            |l| self.cache_filled(cache, l),
            layer as usize,
            pos as usize,
            n_head as usize,
            self.max_kv_elements(),
            self.shape(out).cols,
        )?;
        let a = Attention {
            q,
            k,
            v,
            cache,
            layer: layer as usize,
            pos: pos as usize,
            n_head: n_head as usize,
            scale,
            window: window as usize,
            softcap,
        };
        Backend::attention(self, a, out)
    }

    fn glu(&self, gate: &B::Tensor, up: &B::Tensor, act: Activation) -> Result<()> {
        distinct(gate, up)?;
        same_shape("glu", self.shape(gate), self.shape(up))?;
        Backend::glu(self, gate, up, act)
    }

    fn add(&self, acc: &B::Tensor, x: &B::Tensor) -> Result<()> {
        distinct(acc, x)?;
        same_shape("add", self.shape(acc), self.shape(x))?;
        Backend::add(self, acc, x)
    }

    fn scale(&self, x: &B::Tensor, s: f32) -> Result<()> {
        Backend::scale(self, x, s)
    }

    fn scale_rows(&self, x: &B::Tensor, s: &[f32]) -> Result<()> {
        let rows = self.shape(x).rows;
        if s.len() != rows {
            return Err(Error::InvalidArgument(format!(
                "scale-rows: {} values for a tensor of {rows} rows",
                s.len()
            )));
        }
        Backend::scale_rows(self, x, s)
    }

    fn keep_last_row(&self, x: &B::Tensor) -> Result<()> {
        Backend::keep_last_row(self, x)
    }
}

/// The ops `realm:compute` has beyond [`Compute`] (for providers), checked.
pub fn write_tensor<B: Backend>(b: &B, t: &B::Tensor, rows: usize, data: Vec<f32>) -> Result<()> {
    write(b.shape(t).cols, rows, data.len())?;
    b.write(t, rows, data)
}

/// Softmax of each row, checked.
pub fn softmax_rows<B: Backend>(b: &B, t: &B::Tensor) -> Result<()> {
    softmax(b.shape(t))?;
    b.softmax(t)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn weights_are_checked_before_use() {
        let file = ModelBytes::new(Arc::new(vec![0u8; 1000]));
        let ok = weight(&file, 0, GgmlType::F32, &[4, 2]).expect("fits");
        assert_eq!((ok.len, ok.meta.values.map(|v| v.len())), (32, Some(8)));
        let q = weight(&file, 100, GgmlType::Q8_0, &[32, 2]).expect("fits");
        assert_eq!((q.offset, q.len, q.meta.values.is_none()), (100, 68, true));
        let bad = [
            (weight(&file, 0, GgmlType::F32, &[]), "1 to 4"),
            (weight(&file, 0, GgmlType::F32, &[1, 0]), "1 to 4"),
            (weight(&file, 0, GgmlType::Q8_0, &[16]), "whole"),
            (weight(&file, 0, GgmlType::F32, &[u64::MAX, 2]), "overflows"),
            (weight(&file, 990, GgmlType::F32, &[4]), "passes the end"),
            (
                weight(&file, u64::MAX, GgmlType::F32, &[4]),
                "passes the end",
            ),
        ];
        for (r, why) in bad {
            let msg = format!("{:?}", r.expect_err(why));
            assert!(msg.contains(why), "{msg}");
        }
    }

    #[test]
    fn attention_arguments_are_checked() {
        let c = CacheShape {
            n_layer: 2,
            n_ctx: 8,
            n_head_kv: 1,
            head_dim: 4,
        };
        let s = |rows, cols| Shape { rows, cols };
        let run = |q: Shape, pos: usize, layer: usize, filled: usize| {
            attention(
                (q, s(q.rows, 4), s(q.rows, 4)),
                c,
                |_| filled,
                layer,
                pos,
                2,
                1 << 20,
                q.cols,
            )
        };
        run(s(3, 8), 0, 0, 0).expect("fits");
        run(s(3, 8), 2, 1, 5).expect("overwrites the tail");
        let bad = [
            (run(s(3, 8), 6, 0, 6), "pass the context"),
            (run(s(1, 8), 4, 0, 2), "skips past"),
            (run(s(1, 8), 0, 2, 0), "layer 2"),
            (run(s(1, 6), 0, 0, 0), "widths"),
        ];
        for (r, why) in bad {
            let msg = format!("{:?}", r.expect_err(why));
            assert!(msg.contains(why), "{msg}");
        }
    }
}
