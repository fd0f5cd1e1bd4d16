//! The imported compute provider seen from Rust: the model file as a GGUF `Source`, type
//! and error conversions.

use crate::exports::realm::inference::types::Error;
pub use crate::realm::compute::store::{ModelFile, Weight, open_model};
pub use crate::realm::compute::tensors::{self as ops, KvCache, Tensor};
pub use crate::realm::compute::types::{
    Activation, Dtype, Error as ComputeError, RopeMode, RopeParams,
};
use realm_gguf::{GgmlType, GgufError, Source};

/// Reads through the host handle; the GGUF cursor batches them into 64 KiB windows.
pub struct HostFile<'a>(pub &'a ModelFile);

impl Source for HostFile<'_> {
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
            message: compute_message(&e),
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

/// The WIT dtype of a GGUF tensor type, if the compute interface has one.
pub fn dtype(ty: GgmlType) -> Option<Dtype> {
    Some(match ty {
        GgmlType::F32 => Dtype::F32,
        GgmlType::F16 => Dtype::F16,
        GgmlType::BF16 => Dtype::Bf16,
        GgmlType::Q4_0 => Dtype::Q40,
        GgmlType::Q4_1 => Dtype::Q41,
        GgmlType::Q5_0 => Dtype::Q50,
        GgmlType::Q5_1 => Dtype::Q51,
        GgmlType::Q8_0 => Dtype::Q80,
        GgmlType::Q8_1 => Dtype::Q81,
        GgmlType::Q2_K => Dtype::Q2k,
        GgmlType::Q3_K => Dtype::Q3k,
        GgmlType::Q4_K => Dtype::Q4k,
        GgmlType::Q5_K => Dtype::Q5k,
        GgmlType::Q6_K => Dtype::Q6k,
        GgmlType::Q8_K => Dtype::Q8k,
        _ => return None,
    })
}

pub fn compute_message(e: &ComputeError) -> String {
    match e {
        ComputeError::InvalidArgument(m) => format!("invalid argument: {m}"),
        ComputeError::NotFound(m) => format!("not found: {m}"),
        ComputeError::OutOfBounds(m) => format!("out of bounds: {m}"),
        ComputeError::Unsupported(m) => format!("unsupported: {m}"),
        ComputeError::ResourceExhausted(m) => format!("resource exhausted: {m}"),
        ComputeError::Io(m) => format!("i/o: {m}"),
    }
}

impl From<ComputeError> for Error {
    fn from(e: ComputeError) -> Self {
        match e {
            ComputeError::NotFound(m) => Error::NotFound(m),
            ComputeError::Unsupported(m) => Error::Unsupported(m),
            ComputeError::ResourceExhausted(m) => Error::ContextOverflow(m),
            other => Error::Compute(compute_message(&other)),
        }
    }
}
