//! [`realm_compute::Compute`] over the `realm:compute` imports: the model code in
//! `realm-model` runs on whatever provider the host plugs in. The host checks every op
//! again, so nothing is checked twice here.

use realm_compute::{Activation, Compute, Error as ComputeError, GgmlType, RopeParams};
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

realm_compute::wit_conversions!(wit);

/// The WIT error as the compute interface's.
pub fn error(e: wit::Error) -> ComputeError {
    from_wit_error(e)
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
        let dtype = to_wit_dtype(ty).ok_or_else(|| {
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
        ops::rope(x, pos, to_wit_rope(p), factors).map_err(error)
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
        softcap: f32,
        out: &Tensor,
    ) -> realm_compute::Result<()> {
        ops::attention(
            q, k, v, cache, layer, pos, n_head, scale, window, softcap, out,
        )
        .map_err(error)
    }

    fn glu(&self, gate: &Tensor, up: &Tensor, act: Activation) -> realm_compute::Result<()> {
        ops::glu(gate, up, to_wit_activation(act)).map_err(error)
    }

    fn add(&self, acc: &Tensor, x: &Tensor) -> realm_compute::Result<()> {
        ops::add(acc, x).map_err(error)
    }

    fn scale(&self, x: &Tensor, s: f32) -> realm_compute::Result<()> {
        ops::scale(x, s).map_err(error)
    }

    fn scale_rows(&self, x: &Tensor, s: &[f32]) -> realm_compute::Result<()> {
        ops::scale_rows(x, s).map_err(error)
    }

    fn keep_last_row(&self, x: &Tensor) -> realm_compute::Result<()> {
        ops::keep_last_row(x).map_err(error)
    }
}
