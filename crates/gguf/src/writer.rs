//! A small GGUF v3 writer, for tests and tools that build model files in code.

use crate::GgmlType;
use crate::reader::{DEFAULT_ALIGNMENT, MAGIC};
use crate::value::{Array, Value};

/// Collects metadata and tensors, then lays them out as a valid GGUF v3 file.
#[derive(Debug, Default)]
pub struct GgufWriter {
    kv: Vec<(String, Value)>,
    tensors: Vec<(String, GgmlType, Vec<u64>, Data)>,
}

/// A tensor's bytes: given, or that many zeros (written as a hole in a sparse file).
#[derive(Debug)]
enum Data {
    Bytes(Vec<u8>),
    Zeros(u64),
}

impl Data {
    fn len(&self) -> u64 {
        match self {
            Data::Bytes(b) => b.len() as u64,
            Data::Zeros(n) => *n,
        }
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn kv(&mut self, key: &str, value: Value) -> &mut Self {
        self.kv.push((key.into(), value));
        self
    }

    /// Add a tensor; `dims` in ggml order (row length first), `data` its raw blocks.
    pub fn tensor(&mut self, name: &str, ty: GgmlType, dims: &[u64], data: Vec<u8>) -> &mut Self {
        self.tensors
            .push((name.into(), ty, dims.to_vec(), Data::Bytes(data)));
        self
    }

    /// Add an all-zero tensor without holding its bytes (for files of many GiB).
    pub fn zeros(&mut self, name: &str, ty: GgmlType, dims: &[u64]) -> &mut Self {
        let n: u64 = dims.iter().product();
        let len = ty.bytes_for(n).unwrap_or(0);
        self.tensors
            .push((name.into(), ty, dims.to_vec(), Data::Zeros(len)));
        self
    }

    /// Header and tensor-info bytes (padded to the data section) and each tensor's
    /// offset within the data section.
    fn layout(&self) -> (Vec<u8>, Vec<u64>) {
        let align = self.alignment();
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut out, k);
            out.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offsets = Vec::with_capacity(self.tensors.len());
        let mut offset = 0u64;
        for (name, ty, dims, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&(*ty as u32).to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len()).next_multiple_of(align);
        }
        out.resize(out.len().next_multiple_of(align as usize), 0);
        (out, offsets)
    }

    /// Write the file; zero tensors become holes, so a 5 GiB test model takes kilobytes
    /// of disk on file systems with sparse files.
    pub fn write_file(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::{Seek, SeekFrom, Write};
        let (header, offsets) = self.layout();
        let mut f = std::fs::File::create(path)?;
        f.write_all(&header)?;
        let base = header.len() as u64;
        let mut end = base;
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            end = end.max(base + off + data.len());
            if let Data::Bytes(b) = data {
                f.seek(SeekFrom::Start(base + off))?;
                f.write_all(b)?;
            }
        }
        f.set_len(end.next_multiple_of(self.alignment()))?;
        Ok(())
    }

    fn alignment(&self) -> u64 {
        self.kv
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .filter(|a| a.is_power_of_two() && *a <= crate::MAX_ALIGNMENT)
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// The whole file, in memory.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment() as usize;
        let (mut out, offsets) = self.layout();
        let base = out.len();
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize(base + off as usize, 0);
            match data {
                Data::Bytes(b) => out.extend_from_slice(b),
                Data::Zeros(n) => out.resize(out.len() + *n as usize, 0),
            }
        }
        out.resize(out.len().next_multiple_of(align), 0);
        out
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Array(a) => put_array(out, a),
    }
}

fn put_array(out: &mut Vec<u8>, a: &Array) {
    out.extend_from_slice(&(a.element_type() as u32).to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => each!(v),
        Array::U16(v) => each!(v),
        Array::I16(v) => each!(v),
        Array::U32(v) => each!(v),
        Array::I32(v) => each!(v),
        Array::F32(v) => each!(v),
        Array::U64(v) => each!(v),
        Array::I64(v) => each!(v),
        Array::F64(v) => each!(v),
        Array::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        Array::String(v) => v.iter().for_each(|s| put_str(out, s)),
        Array::Array(v) => v.iter().for_each(|inner| put_array(out, inner)),
    }
}
