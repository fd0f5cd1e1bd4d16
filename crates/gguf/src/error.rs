//! The one error type of the GGUF crate: every variant names the field and file offset at fault.

use crate::GgmlType;

/// Everything that can be wrong with a GGUF file, found before anything is allocated for it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    #[error("read of {len} bytes at offset {offset} failed: {message}")]
    Io {
        offset: u64,
        len: u64,
        message: String,
    },
    #[error("file ends early: {field} at offset {offset} needs {needed} bytes, {available} left")]
    UnexpectedEof {
        field: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    #[error("not a GGUF file: magic is {found:02x?}, expected \"GGUF\"")]
    BadMagic { found: [u8; 4] },
    #[error("GGUF version {version} is not supported (only 2 and 3){hint}")]
    UnsupportedVersion { version: u32, hint: &'static str },
    #[error("{field} at offset {offset} is {value}, more than the limit of {limit}")]
    TooLarge {
        field: String,
        offset: u64,
        value: u64,
        limit: u64,
    },
    #[error("{field} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { field: String, offset: u64 },
    #[error("metadata key '{key}' at offset {offset} has unknown value type {type_id:#x}")]
    UnknownValueType {
        key: String,
        offset: u64,
        type_id: u32,
    },
    #[error("metadata key '{key}' at offset {offset} nests arrays deeper than {limit}")]
    NestingTooDeep {
        key: String,
        offset: u64,
        limit: u32,
    },
    #[error("metadata key '{key}' at offset {offset} appears twice")]
    DuplicateKey { key: String, offset: u64 },
    #[error("metadata key '{key}' has type {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("metadata key '{key}' is missing")]
    MissingKey { key: String },
    #[error("general.alignment is {value}: it must be a power of two between 1 and {limit}")]
    BadAlignment { value: u64, limit: u64 },
    #[error("tensor '{name}' at offset {offset} appears twice")]
    DuplicateTensor { name: String, offset: u64 },
    #[error("tensor '{name}' (info at offset {offset}): {reason}")]
    BadTensor {
        name: String,
        offset: u64,
        reason: String,
    },
    #[error("tensor '{name}' (info at offset {offset}) has unknown type id {type_id}")]
    UnknownTensorType {
        name: String,
        offset: u64,
        type_id: u32,
    },
    #[error("tensor '{name}' has type {ty}, which Realm does not support yet")]
    UnsupportedTensorType { name: String, ty: GgmlType },
    #[error(
        "tensor '{name}' spans bytes {start}..{end} of the file, which has only {file_size} bytes"
    )]
    TensorOutOfBounds {
        name: String,
        start: u64,
        end: u64,
        file_size: u64,
    },
    #[error("tensor '{name}' data offset {offset} is not a multiple of the alignment {alignment}")]
    Misaligned {
        name: String,
        offset: u64,
        alignment: u64,
    },
    #[error("tensors '{first}' and '{second}' overlap in the data section")]
    Overlap { first: String, second: String },
    #[error("tensor '{name}': {reason}")]
    BadData { name: String, reason: String },
    #[error("cannot dequantize {ty}: {reason}")]
    Dequant { ty: GgmlType, reason: String },
    #[error("model hyper-parameter {key}: {reason}")]
    BadHparam { key: String, reason: String },
}

/// Shorthand used throughout the crate.
pub type Result<T, E = GgufError> = std::result::Result<T, E>;
