//! [`realm_compute::Compute`] over the `realm:compute` imports: the model code in
//! `realm-model` runs on whatever provider the host plugs in. The host checks every op
//! again, so nothing is checked twice here.

use realm_compute::{Activation, Compute, Error as ComputeError, GgmlType, RopeMode, RopeParams};
use realm_gguf::{GgufError, Source};

use crate::realm::compute::store::{ModelFile, Weight};
use crate::realm::compute::tensors::{self as ops, KvCache, Tensor};
use crate::realm::compute::types as wit;

/// The imported provider (its state is the host's).
pub struct Imported;

/// An open model file: the GGUF header is read through the host handle (the cursor
/// batches reads into 64 KiB windows); the weights never enter the guest.
pub struct HostFile(pub ModelFile);

impl Source for HostFile {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> realm_gguf::Result<()> {
        let len = u32::try_from(buf.len()).map_err(|_| GgufError::Io {
            offset,
            len: buf.len() as u64,
            message: "read larger than 4 GiB".into(),
        })?;
        let bytes = self.0.read(offset, len).map_err(|e| GgufError::Io {
            offset,
            len: len.into(),
            message: error(e).to_string(),
        })?;
        if bytes.len() != buf.len() {
            return Err(GgufError::Io {
                offset,
                len: len.into(),
                message: format!("host returned {} bytes", bytes.len()),
            });
        }
        buf.copy_from_slice(&bytes);
        Ok(())
    }
}

/// The WIT error as the compute interface's.
pub fn error(e: wit::Error) -> ComputeError {
    match e {
        wit::Error::InvalidArgument(m) => ComputeError::InvalidArgument(m),
        wit::Error::NotFound(m) => ComputeError::NotFound(m),
        wit::Error::OutOfBounds(m) => ComputeError::OutOfBounds(m),
        wit::Error::Unsupported(m) => ComputeError::Unsupported(m),
        wit::Error::ResourceExhausted(m) => ComputeError::ResourceExhausted(m),
        wit::Error::Io(m) => ComputeError::Io(m),
    }
}

/// The WIT dtype of a GGUF tensor type, if the interface has one.
fn dtype(ty: GgmlType) -> Option<wit::Dtype> {
    use wit::Dtype as D;
    Some(match ty {
        GgmlType::F32 => D::F32,
        GgmlType::F16 => D::F16,
        GgmlType::BF16 => D::Bf16,
        GgmlType::Q4_0 => D::Q40,
        GgmlType::Q4_1 => D::Q41,
        GgmlType::Q5_0 => D::Q50,
        GgmlType::Q5_1 => D::Q51,
        GgmlType::Q8_0 => D::Q80,
        GgmlType::Q8_1 => D::Q81,
        GgmlType::Q2_K => D::Q2k,
        GgmlType::Q3_K => D::Q3k,
        GgmlType::Q4_K => D::Q4k,
        GgmlType::Q5_K => D::Q5k,
        GgmlType::Q6_K => D::Q6k,
        GgmlType::Q8_K => D::Q8k,
        _ => return None,
    })
}

fn rope_params(p: &RopeParams) -> wit::RopeParams {
    wit::RopeParams {
        head_dim: p.head_dim,
        n_rot: p.n_rot,
        mode: match p.mode {
            RopeMode::Normal => wit::RopeMode::Normal,
            RopeMode::Neox => wit::RopeMode::Neox,
        },
        freq_base: p.freq_base,
        freq_scale: p.freq_scale,
        ext_factor: p.ext_factor,
        attn_factor: p.attn_factor,
        beta_fast: p.beta_fast,
        beta_slow: p.beta_slow,
        n_ctx_orig: p.n_ctx_orig,
    }
}

impl Compute for Imported {
    type Tensor = Tensor;
    type Weight = Weight;
    type Cache = KvCache;
    type File = HostFile;

    fn tensor(&self, cols: u32) -> Tensor {
        Tensor::new(cols)
    }

    fn cache(&self, n_layer: u32, n_ctx: u32, n_head_kv: u32, head_dim: u32) -> KvCache {
        KvCache::new(n_layer, n_ctx, n_head_kv, head_dim)
    }

    fn read_row(&self, t: &Tensor, row: u32) -> realm_compute::Result<Vec<f32>> {
        t.read_row(row).map_err(error)
    }

    fn weight(
        &self,
        file: &HostFile,
        offset: u64,
        ty: GgmlType,
        dims: &[u64],
    ) -> realm_compute::Result<Weight> {
        let dtype = dtype(ty).ok_or_else(|| {
            ComputeError::Unsupported(format!("realm:compute has no dtype for {ty}"))
        })?;
        file.0.weight(offset, dtype, dims).map_err(error)
    }

    fn embed(
        &self,
        table: &Weight,
        ids: &[u32],
        scale: f32,
        out: &Tensor,
    ) -> realm_compute::Result<()> {
        ops::embed(table, ids, scale, out).map_err(error)
    }

    fn matmul(&self, x: &Tensor, w: &Weight, out: &Tensor) -> realm_compute::Result<()> {
        ops::matmul(x, w, out).map_err(error)
    }

    fn rms_norm(
        &self,
        x: &Tensor,
        w: &Weight,
        eps: f32,
        out: &Tensor,
    ) -> realm_compute::Result<()> {
        ops::rms_norm(x, w, eps, out).map_err(error)
    }

    fn rope(
        &self,
        x: &Tensor,
        pos: u32,
        p: &RopeParams,
        factors: Option<&Weight>,
    ) -> realm_compute::Result<()> {
        ops::rope(x, pos, rope_params(p), factors).map_err(error)
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &KvCache,
        layer: u32,
        pos: u32,
        n_head: u32,
        scale: f32,
        window: u32,
        out: &Tensor,
    ) -> realm_compute::Result<()> {
        ops::attention(q, k, v, cache, layer, pos, n_head, scale, window, out).map_err(error)
    }

    fn glu(&self, gate: &Tensor, up: &Tensor, act: Activation) -> realm_compute::Result<()> {
        let act = match act {
            Activation::Silu => wit::Activation::Silu,
            Activation::GeluTanh => wit::Activation::GeluTanh,
        };
        ops::glu(gate, up, act).map_err(error)
    }

    fn add(&self, acc: &Tensor, x: &Tensor) -> realm_compute::Result<()> {
        ops::add(acc, x).map_err(error)
    }

    fn scale(&self, x: &Tensor, s: f32) -> realm_compute::Result<()> {
        ops::scale(x, s).map_err(error)
    }

    fn keep_last_row(&self, x: &Tensor) -> realm_compute::Result<()> {
        ops::keep_last_row(x).map_err(error)
    }
}
