//! Parsing a GGUF file (v2 and v3): header, metadata, tensor infos, data section.
//!
//! Every rule is checked where the field is read (see ggml's `docs/gguf.md`): counts and
//! lengths are bounded by the bytes left *before* anything is allocated, size arithmetic is
//! done in `u64` with `checked_*`, and each error names the field and its file offset.

use crate::source::{Cursor, Source};
use crate::value::{Array, Metadata, Value, ValueType};
use crate::{GgmlType, GgufError, Result};

/// The first four bytes of every GGUF file.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of each tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest `general.alignment` accepted; real files use 32 or 64.
pub const MAX_ALIGNMENT: u64 = 1 << 16;
/// Most metadata entries or tensors in one file (real models have a few thousand).
pub const MAX_ENTRIES: u64 = 1 << 20;
/// Longest metadata key.
pub const MAX_KEY_LEN: u64 = 1 << 16;
/// Longest string value (a chat template is tens of KiB).
pub const MAX_STRING_LEN: u64 = 16 << 20;
/// Deepest nesting of arrays inside arrays.
pub const MAX_ARRAY_DEPTH: u32 = 4;
/// ggml's `GGML_MAX_NAME`: tensor names are shorter than this.
pub const MAX_TENSOR_NAME: u64 = 64;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;

/// One tensor's description; its bytes are at `offset..offset + n_bytes` of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ty: GgmlType,
    /// ggml order: `dims[0]` is the length of a row (the contiguous dimension).
    pub dims: Vec<u64>,
    /// Absolute offset in the file (data section start + the tensor's relative offset).
    pub offset: u64,
    pub n_bytes: u64,
    /// Where the tensor's info record starts, for error messages.
    pub info_offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        // Checked at parse time not to overflow.
        self.dims.iter().product()
    }

    /// Error unless Realm can compute with the tensor's type.
    pub fn check_supported(&self) -> Result<()> {
        if self.ty.is_supported() {
            Ok(())
        } else {
            Err(GgufError::UnsupportedTensorType {
                name: self.name.clone(),
                ty: self.ty,
            })
        }
    }
}

/// A parsed GGUF file: everything but the tensor data, which stays in the source.
#[derive(Debug, Clone)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    pub file_size: u64,
}

impl GgufFile {
    /// Parse the header of `src`, validating every tensor's placement against its size.
    pub fn read<S: Source + ?Sized>(src: &S) -> Result<Self> {
        Parser {
            c: Cursor::new(src),
        }
        .file()
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// `general.architecture`, the key every model file must carry.
    pub fn architecture(&self) -> Result<&str> {
        self.metadata.str("general.architecture")
    }

    /// Read and dequantize a whole tensor to f32 with the reference dequantizers.
    pub fn dequantize<S: Source + ?Sized>(&self, src: &S, t: &TensorInfo) -> Result<Vec<f32>> {
        t.check_supported()?;
        let too_big = |what: &str| GgufError::BadData {
            name: t.name.clone(),
            reason: format!("{what} does not fit in this platform's address space"),
        };
        let n_bytes = usize::try_from(t.n_bytes).map_err(|_| too_big("byte size"))?;
        let n = usize::try_from(t.n_elements()).map_err(|_| too_big("element count"))?;
        let mut raw = vec![0u8; n_bytes];
        src.read_exact_at(t.offset, &mut raw)?;
        let mut out = vec![0f32; n];
        crate::quant::dequantize(t.ty, &raw, &mut out)?;
        Ok(out)
    }
}

struct Parser<'s, S: Source + ?Sized> {
    c: Cursor<'s, S>,
}

impl<S: Source + ?Sized> Parser<'_, S> {
    fn file(mut self) -> Result<GgufFile> {
        let magic = self.c.array::<4>(&|| "magic".into())?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = self.c.u32(&|| "version".into())?;
        if version != 2 && version != 3 {
            let swapped = version.swap_bytes();
            let hint = if swapped == 2 || swapped == 3 {
                "; the file is big-endian, and Realm reads little-endian GGUF only"
            } else {
                ""
            };
            return Err(GgufError::UnsupportedVersion { version, hint });
        }

        let n_tensors = self.count("tensor count", 32)?;
        let n_kv = self.count("metadata entry count", 8 + 1 + 4 + 1)?;

        let mut metadata = Metadata::default();
        for i in 0..n_kv {
            let at = self.c.pos();
            let key = self.string(&|| format!("metadata key #{i}"), MAX_KEY_LEN)?;
            let type_id = self.c.u32(&|| format!("type of metadata key '{key}'"))?;
            let value = self.value(&key, type_id, 0)?;
            if !metadata.insert(key.clone(), value) {
                return Err(GgufError::DuplicateKey { key, offset: at });
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) => {
                let a = u64::from(*a);
                if a == 0 || !a.is_power_of_two() || a > MAX_ALIGNMENT {
                    return Err(GgufError::BadAlignment {
                        value: a,
                        limit: MAX_ALIGNMENT,
                    });
                }
                a
            }
            Some(other) => {
                return Err(GgufError::WrongType {
                    key: "general.alignment".into(),
                    expected: "u32",
                    found: other.value_type().name(),
                });
            }
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut names = std::collections::HashSet::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let t = self.tensor_info(i, alignment)?;
            if !names.insert(t.name.clone()) {
                return Err(GgufError::DuplicateTensor {
                    name: t.name,
                    offset: t.info_offset,
                });
            }
            tensors.push(t);
        }

        let file_size = self.c.size();
        let end_of_infos = self.c.pos();
        let data_offset = end_of_infos
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| GgufError::TooLarge {
                field: "data section offset".into(),
                offset: end_of_infos,
                value: end_of_infos,
                limit: u64::MAX - alignment,
            })?;
        place_tensors(&mut tensors, data_offset, file_size)?;

        Ok(GgufFile {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            file_size,
        })
    }

    /// A u64 count whose items take at least `min_item_bytes` each: bounded by the bytes
    /// left and by [`MAX_ENTRIES`].
    fn count(&mut self, field: &str, min_item_bytes: u64) -> Result<u64> {
        let offset = self.c.pos();
        let n = self.c.u64(&|| field.into())?;
        let fits = self.c.remaining() / min_item_bytes;
        let limit = fits.min(MAX_ENTRIES);
        if n > limit {
            return Err(GgufError::TooLarge {
                field: field.into(),
                offset,
                value: n,
                limit,
            });
        }
        Ok(n)
    }

    fn string(&mut self, field: &dyn Fn() -> String, cap: u64) -> Result<String> {
        let offset = self.c.pos();
        let len = self.c.u64(&|| format!("length of {}", field()))?;
        if len > cap {
            return Err(GgufError::TooLarge {
                field: format!("length of {}", field()),
                offset,
                value: len,
                limit: cap,
            });
        }
        let bytes = self.c.bytes(field, len)?;
        String::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 {
            field: field(),
            offset: offset + 8,
        })
    }

    fn value(&mut self, key: &str, type_id: u32, depth: u32) -> Result<Value> {
        let offset = self.c.pos();
        let ty = ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
            key: key.into(),
            offset,
            type_id,
        })?;
        let f = || format!("value of metadata key '{key}'");
        Ok(match ty {
            ValueType::U8 => Value::U8(self.c.array::<1>(&f)?[0]),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.c.array(&f)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.c.array(&f)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.c.array(&f)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.c.array(&f)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.c.array(&f)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.c.array(&f)?)),
            ValueType::Bool => Value::Bool(self.c.array::<1>(&f)?[0] != 0),
            ValueType::String => Value::String(self.string(&f, MAX_STRING_LEN)?),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.c.array(&f)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.c.array(&f)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.c.array(&f)?)),
            ValueType::Array => Value::Array(self.array(key, depth)?),
        })
    }

    fn array(&mut self, key: &str, depth: u32) -> Result<Array> {
        let offset = self.c.pos();
        if depth >= MAX_ARRAY_DEPTH {
            return Err(GgufError::NestingTooDeep {
                key: key.into(),
                offset,
                limit: MAX_ARRAY_DEPTH,
            });
        }
        let type_id = self.c.u32(&|| format!("element type of array '{key}'"))?;
        let ty = ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
            key: key.into(),
            offset,
            type_id,
        })?;
        let len_offset = self.c.pos();
        let field = || format!("array '{key}'");
        let n = self.c.u64(&|| format!("length of {}", field()))?;
        let limit = self.c.remaining() / ty.min_encoded_size();
        if n > limit {
            return Err(GgufError::TooLarge {
                field: format!("length of {}", field()),
                offset: len_offset,
                value: n,
                limit,
            });
        }
        // `n` is now at most the bytes left, so it fits memory the file already occupies.
        let n_usize = usize::try_from(n).map_err(|_| GgufError::TooLarge {
            field: format!("length of {}", field()),
            offset: len_offset,
            value: n,
            limit: usize::MAX as u64,
        })?;

        macro_rules! numbers {
            ($variant:ident, $t:ty) => {{
                const W: usize = std::mem::size_of::<$t>();
                let raw = self.c.bytes(&field, n * W as u64)?;
                Array::$variant(
                    raw.chunks_exact(W)
                        .map(|c| {
                            let mut b = [0u8; W];
                            b.copy_from_slice(c);
                            <$t>::from_le_bytes(b)
                        })
                        .collect(),
                )
            }};
        }

        Ok(match ty {
            ValueType::U8 => Array::U8(self.c.bytes(&field, n)?),
            ValueType::I8 => numbers!(I8, i8),
            ValueType::U16 => numbers!(U16, u16),
            ValueType::I16 => numbers!(I16, i16),
            ValueType::U32 => numbers!(U32, u32),
            ValueType::I32 => numbers!(I32, i32),
            ValueType::F32 => numbers!(F32, f32),
            ValueType::U64 => numbers!(U64, u64),
            ValueType::I64 => numbers!(I64, i64),
            ValueType::F64 => numbers!(F64, f64),
            ValueType::Bool => Array::Bool(
                self.c
                    .bytes(&field, n)?
                    .into_iter()
                    .map(|b| b != 0)
                    .collect(),
            ),
            ValueType::String => {
                let mut v = Vec::with_capacity(n_usize);
                for i in 0..n {
                    v.push(self.string(&|| format!("{} element {i}", field()), MAX_STRING_LEN)?);
                }
                Array::String(v)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(n_usize);
                for _ in 0..n {
                    v.push(self.array(key, depth + 1)?);
                }
                Array::Array(v)
            }
        })
    }

    fn tensor_info(&mut self, i: u64, alignment: u64) -> Result<TensorInfo> {
        let info_offset = self.c.pos();
        let name_offset = info_offset;
        let name_len = self.c.u64(&|| format!("length of tensor #{i} name"))?;
        if name_len >= MAX_TENSOR_NAME {
            return Err(GgufError::TooLarge {
                field: format!("length of tensor #{i} name"),
                offset: name_offset,
                value: name_len,
                limit: MAX_TENSOR_NAME - 1,
            });
        }
        let raw = self.c.bytes(&|| format!("tensor #{i} name"), name_len)?;
        let name = String::from_utf8(raw).map_err(|_| GgufError::InvalidUtf8 {
            field: format!("tensor #{i} name"),
            offset: name_offset + 8,
        })?;
        let bad = |reason: String| GgufError::BadTensor {
            name: name.clone(),
            offset: info_offset,
            reason,
        };

        let n_dims = self
            .c
            .u32(&|| format!("dimension count of tensor '{name}'"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(bad(format!(
                "{n_dims} dimensions; ggml tensors have 1 to {MAX_DIMS}"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        let mut n_elements: u64 = 1;
        for d in 0..n_dims {
            let v = self
                .c
                .u64(&|| format!("dimension {d} of tensor '{name}'"))?;
            // ggml keeps dims as int64_t: a value with the top bit set is negative.
            if v == 0 || v > i64::MAX as u64 {
                return Err(bad(format!("dimension {d} is {}", v as i64)));
            }
            n_elements = n_elements
                .checked_mul(v)
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| bad("the product of the dimensions overflows".into()))?;
            dims.push(v);
        }

        let type_offset = self.c.pos();
        let type_id = self.c.u32(&|| format!("type of tensor '{name}'"))?;
        let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
            name: name.clone(),
            offset: type_offset,
            type_id,
        })?;
        if !dims[0].is_multiple_of(ty.block_size()) {
            return Err(bad(format!(
                "row length {} is not a multiple of the {ty} block size {}",
                dims[0],
                ty.block_size()
            )));
        }
        let n_bytes = ty
            .bytes_for(n_elements)
            .ok_or_else(|| bad("its byte size overflows".into()))?;

        let offset = self.c.u64(&|| format!("data offset of tensor '{name}'"))?;
        if !offset.is_multiple_of(alignment) {
            return Err(GgufError::Misaligned {
                name,
                offset,
                alignment,
            });
        }
        Ok(TensorInfo {
            name,
            ty,
            dims,
            offset,
            n_bytes,
            info_offset,
        })
    }
}

/// Turn relative offsets into absolute ones and check every tensor lies inside the file
/// and that no two overlap.
fn place_tensors(tensors: &mut [TensorInfo], data_offset: u64, file_size: u64) -> Result<()> {
    for t in tensors.iter_mut() {
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.n_bytes));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_size => t.offset = start,
            _ => {
                return Err(GgufError::TensorOutOfBounds {
                    name: t.name.clone(),
                    start: data_offset.saturating_add(t.offset),
                    end: data_offset
                        .saturating_add(t.offset)
                        .saturating_add(t.n_bytes),
                    file_size,
                });
            }
        }
    }
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| tensors[i].offset);
    for w in order.windows(2) {
        let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
        if a.offset + a.n_bytes > b.offset {
            return Err(GgufError::Overlap {
                first: a.name.clone(),
                second: b.name.clone(),
            });
        }
    }
    Ok(())
}
