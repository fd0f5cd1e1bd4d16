//! Checks shared by the compute providers (the native host and the WebAssembly one), so
//! both refuse the same requests with the same messages.

use realm_gguf::GgmlType;

/// Why a request was refused; each provider maps it to its own WIT error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpError {
    InvalidArgument(String),
    OutOfBounds(String),
    Unsupported(String),
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
    let invalid = |m: String| OpError::InvalidArgument(m);
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
