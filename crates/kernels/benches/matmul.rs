//! The CPU backend's matmul per weight type, one token (decoding), 16 (a batch of decoding
//! tenants) and 64 tokens (a prompt),
//! through the same checked `Compute` path the providers use; the kernel family is this
//! CPU's (`REALM_KERNELS=avx2|fma|portable|amx` to pick another). `cargo bench -p
//! realm-kernels`; throughput is in multiply-adds.

#[cfg(not(target_arch = "wasm32"))]
mod bench {
    use std::sync::Arc;

    use criterion::{BenchmarkId, Criterion, Throughput};
    use realm_compute::{Compute, GgmlType, ModelBytes};
    use realm_kernels::cpu::CpuBackend;
    use realm_kernels::pool::SpinPool;

    pub fn matmul(c: &mut Criterion) {
        let (k, n) = (2048usize, 2048usize);
        for threads in [1usize, 2] {
            let cpu = CpuBackend::new(Arc::new(SpinPool::new(threads).expect("pool")), 1 << 32);
            let mut g = c.benchmark_group(format!("matmul {k}x{n}, {threads} thread(s)"));
            g.sample_size(20);
            for ty in [
                GgmlType::Q4_0,
                GgmlType::Q4_1,
                GgmlType::Q8_0,
                GgmlType::Q4_K,
                GgmlType::Q6_K,
            ] {
                let file =
                    ModelBytes::new(Arc::new(realm_kernels::synthetic::weights(ty, k, n, 7)));
                let w = Compute::weight(&cpu, &file, 0, ty, &[k as u64, n as u64]).expect("weight");
                for tokens in [1usize, 16, 64] {
                    let x = Compute::tensor(&cpu, k as u32);
                    let xs: Vec<f32> = (0..tokens * k)
                        .map(|i| ((i % 97) as f32 - 48.0) / 64.0)
                        .collect();
                    realm_compute::checked::write_tensor(&cpu, &x, tokens, xs).expect("write");
                    let out = Compute::tensor(&cpu, n as u32);
                    g.throughput(Throughput::Elements((tokens * k * n) as u64));
                    g.bench_with_input(
                        BenchmarkId::new(format!("{ty}"), format!("{tokens} token(s)")),
                        &tokens,
                        |b, _| b.iter(|| Compute::matmul(&cpu, &x, &w, &out).expect("matmul")),
                    );
                }
            }
            g.finish();
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
criterion::criterion_group!(benches, bench::matmul);
#[cfg(not(target_arch = "wasm32"))]
criterion::criterion_main!(benches);

#[cfg(target_arch = "wasm32")]
fn main() {}
