//! Random-access byte sources the reader parses from: a slice, a file, or a host handle.

use crate::{GgufError, Result};

/// Anything that can read `buf.len()` bytes at a 64-bit offset.
///
/// In the guest this is the host's `model-file` resource, so reads are calls across the
/// component boundary: the [`Cursor`] batches them into large windows.
pub trait Source {
    /// Total size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; the reader never asks past [`Source::size`].
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

impl Source for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let io_err = || GgufError::Io {
            offset,
            len: buf.len() as u64,
            message: "read past the end of the buffer".into(),
        };
        let start = usize::try_from(offset).map_err(|_| io_err())?;
        let end = start.checked_add(buf.len()).ok_or_else(io_err)?;
        let src = self.get(start..end).ok_or_else(io_err)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl Source for Vec<u8> {
    fn size(&self) -> u64 {
        self.as_slice().size()
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.as_slice().read_exact_at(offset, buf)
    }
}

impl<S: Source + ?Sized> Source for &S {
    fn size(&self) -> u64 {
        (**self).size()
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read_exact_at(offset, buf)
    }
}

/// A file opened for positional reads. Its size is taken once, at open.
#[cfg(unix)]
#[derive(Debug)]
pub struct FileSource {
    file: std::fs::File,
    size: u64,
}

#[cfg(unix)]
impl FileSource {
    /// Open `path` for reading.
    pub fn open(path: impl AsRef<std::path::Path>) -> std::io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        Ok(Self { file, size })
    }
}

#[cfg(unix)]
impl Source for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| GgufError::Io {
                offset,
                len: buf.len() as u64,
                message: e.to_string(),
            })
    }
}

/// Bytes fetched per source read while parsing the header.
const WINDOW: usize = 64 * 1024;

/// A forward reader over a [`Source`] with a read-ahead window and bound checks that name
/// the field being read.
pub(crate) struct Cursor<'s, S: Source + ?Sized> {
    src: &'s S,
    size: u64,
    pos: u64,
    window: Vec<u8>,
    window_start: u64,
}

impl<'s, S: Source + ?Sized> Cursor<'s, S> {
    pub(crate) fn new(src: &'s S) -> Self {
        Self {
            src,
            size: src.size(),
            pos: 0,
            window: Vec::new(),
            window_start: 0,
        }
    }

    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Bytes between the cursor and the end of the source.
    pub(crate) fn remaining(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    fn eof(&self, field: &dyn Fn() -> String, needed: u64) -> GgufError {
        GgufError::UnexpectedEof {
            field: field(),
            offset: self.pos,
            needed,
            available: self.remaining(),
        }
    }

    /// Check that `needed` bytes are left, naming `field` otherwise.
    pub(crate) fn ensure(&self, field: &dyn Fn() -> String, needed: u64) -> Result<()> {
        if needed > self.remaining() {
            Err(self.eof(field, needed))
        } else {
            Ok(())
        }
    }

    /// Read exactly `out.len()` bytes.
    pub(crate) fn read_into(&mut self, field: &dyn Fn() -> String, out: &mut [u8]) -> Result<()> {
        let needed = out.len() as u64;
        self.ensure(field, needed)?;
        let mut done = 0usize;
        while done < out.len() {
            let in_window = self.pos >= self.window_start
                && self.pos < self.window_start + self.window.len() as u64;
            if !in_window {
                let len = (self.remaining()).min(WINDOW as u64) as usize;
                self.window.resize(len, 0);
                self.src.read_exact_at(self.pos, &mut self.window)?;
                self.window_start = self.pos;
            }
            let at = (self.pos - self.window_start) as usize;
            let n = (self.window.len() - at).min(out.len() - done);
            out[done..done + n].copy_from_slice(&self.window[at..at + n]);
            done += n;
            self.pos += n as u64;
        }
        Ok(())
    }

    pub(crate) fn array<const N: usize>(&mut self, field: &dyn Fn() -> String) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.read_into(field, &mut b)?;
        Ok(b)
    }

    pub(crate) fn u32(&mut self, field: &dyn Fn() -> String) -> Result<u32> {
        self.array(field).map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self, field: &dyn Fn() -> String) -> Result<u64> {
        self.array(field).map(u64::from_le_bytes)
    }

    /// Read `len` bytes into a new buffer, after checking they exist.
    pub(crate) fn bytes(&mut self, field: &dyn Fn() -> String, len: u64) -> Result<Vec<u8>> {
        self.ensure(field, len)?;
        let len = usize::try_from(len).map_err(|_| self.eof(field, len))?;
        let mut v = vec![0u8; len];
        self.read_into(field, &mut v)?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_reads_across_windows() {
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut c = Cursor::new(data.as_slice());
        let f = || "test".to_string();
        let first = c.bytes(&f, 70_000).expect("in bounds");
        assert_eq!(first[69_999], (69_999u32) as u8);
        let x = c.u32(&f).expect("in bounds");
        assert_eq!(x.to_le_bytes()[0], 70_000u32 as u8);
        assert_eq!(c.pos(), 70_004);
        let err = c.bytes(&f, 1 << 40).expect_err("past the end");
        assert!(matches!(err, GgufError::UnexpectedEof { .. }), "{err}");
    }

    #[test]
    fn slice_source_rejects_reads_past_end() {
        let data = [1u8, 2, 3];
        let mut buf = [0u8; 2];
        assert!(data[..].read_exact_at(2, &mut buf).is_err());
        assert!(data[..].read_exact_at(u64::MAX, &mut buf).is_err());
        data[..].read_exact_at(1, &mut buf).expect("in bounds");
        assert_eq!(buf, [2, 3]);
    }
}
