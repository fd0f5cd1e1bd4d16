//! Throughput of the quantized dot-product kernels on a model's own weights, one thread:
//! `cargo run --release -p realm-host --example kernels -- MODEL.gguf`. For choosing the
//! next kernel by data; `realm bench` is the end-to-end measurement.

use std::time::Instant;

use realm_gguf::GgufFile;
use realm_host::compute::quant::{self, VecDot};

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: kernels MODEL.gguf"))?;
    let file = std::fs::File::open(&path)?;
    // SAFETY: read-only map of a file this process does not modify.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    let gguf = GgufFile::read(&map[..])?;
    let mut seen = std::collections::HashSet::new();
    for t in &gguf.tensors {
        let Some(kind) = VecDot::for_weight(t.ty) else {
            continue;
        };
        let (k, n) = (
            t.dims[0] as usize,
            t.dims[1..].iter().product::<u64>() as usize,
        );
        if !seen.insert((t.ty, k, n)) {
            continue;
        }
        let start = t.offset as usize;
        let wrow = t.ty.row_bytes(k as u64).unwrap_or(0) as usize;
        let w = &map[start..start + wrow * n];
        let x: Vec<f32> = (0..k)
            .map(|i| ((i * 7919) % 97) as f32 / 50.0 - 1.0)
            .collect();
        let mut xq = Vec::new();
        quant::quantize_row(kind, &x, &mut xq);
        let mut out = vec![0f32; n];
        let reps = (200_000_000 / (wrow * n)).max(3);
        quant::dot_rows(t.ty, w, wrow, &xq, 0, &mut out);
        let t0 = Instant::now();
        for _ in 0..reps {
            quant::dot_rows(t.ty, w, wrow, &xq, 0, &mut out);
        }
        let s = t0.elapsed().as_secs_f64() / reps as f64;
        let blocks = (k / t.ty.block_size() as usize * n) as f64;
        println!(
            "{:<6} {k:>5}×{n:<6} {:>8.1} µs  {:>6.2} GB/s  {:>5.2} ns/block",
            t.ty.name(),
            s * 1e6,
            (wrow * n) as f64 / s / 1e9,
            s * 1e9 / blocks
        );
    }
    // Every quantized weight once, in file order, as a decode step reads them.
    let mut plan = Vec::new();
    for t in &gguf.tensors {
        let Some(kind) = VecDot::for_weight(t.ty) else {
            continue;
        };
        let (k, n) = (
            t.dims[0] as usize,
            t.dims[1..].iter().product::<u64>() as usize,
        );
        let start = t.offset as usize;
        let wrow = t.ty.row_bytes(k as u64).unwrap_or(0) as usize;
        let x: Vec<f32> = (0..k)
            .map(|i| ((i * 7919) % 97) as f32 / 50.0 - 1.0)
            .collect();
        let mut xq = Vec::new();
        quant::quantize_row(kind, &x, &mut xq);
        plan.push((t.ty, start, wrow, n, xq, vec![0f32; n]));
    }
    let bytes: usize = plan.iter().map(|p| p.2 * p.3).sum();
    for _ in 0..5 {
        let t0 = Instant::now();
        for (ty, start, wrow, n, xq, out) in &mut plan {
            quant::dot_rows(*ty, &map[*start..*start + *wrow * *n], *wrow, xq, 0, out);
        }
        let s = t0.elapsed().as_secs_f64();
        println!(
            "all weights once: {:.2} ms, {:.2} GB/s",
            s * 1e3,
            bytes as f64 / s / 1e9
        );
    }
    Ok(())
}
