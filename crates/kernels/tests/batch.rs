//! Cross-tenant batching changes no tenant's numbers: tenants on their own threads, each
//! with its own backend and activations (one row, a few, or a prompt's 17), multiply by
//! one shared weight at once; every output equals, bit for bit, what the tenant's backend
//! computes alone, and the batcher did share products.

use std::sync::{Arc, Barrier};

use realm_compute::{Compute, GgmlType, ModelBytes};
use realm_kernels::batch::Batcher;
use realm_kernels::cpu::CpuBackend;
use realm_kernels::pool::SpinPool;

const K: usize = 512;
const N: usize = 96;
const TENANTS: usize = 3;
const STEPS: usize = 60;

/// Rows tenant `t` brings at step `s`: one (decoding), a few, or a prompt's worth.
fn rows(t: usize, s: usize) -> usize {
    match (t + s) % 5 {
        0 => 17,
        1 => 3,
        _ => 1,
    }
}

/// Tenant `t`'s activations at step `s` (`rows(t, s)` rows of `k`).
fn x(t: usize, s: usize, k: usize) -> Vec<f32> {
    (0..rows(t, s) * k)
        .map(|i| (((i * 7 + t * 131 + s * 17) % 97) as f32 - 48.0) / 32.0)
        .collect()
}

#[test]
#[cfg_attr(target_arch = "wasm32", ignore = "wasm32-wasip2 has no threads")]
fn batched_products_equal_lone_ones_bit_for_bit() {
    if realm_kernels::quant::kernel_level() == realm_kernels::quant::KernelLevel::Amx {
        // The AMX family has its own numerics and is never batched.
        println!("SKIPPED: REALM_KERNELS=amx is never batched");
        return;
    }
    let spin = Arc::new(SpinPool::new(2).expect("pool"));
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        let k = if matches!(ty, GgmlType::Q4_K | GgmlType::Q6_K) {
            512
        } else {
            K
        };
        let file = ModelBytes::new(Arc::new(realm_kernels::synthetic::weights(ty, k, N, 11)));
        let dims = [k as u64, N as u64];
        // What each tenant's row gives alone, on a backend without a batcher.
        let lone = CpuBackend::new(spin.clone(), 1 << 20);
        let w = Compute::weight(&lone, &file, 0, ty, &dims).expect("weight");
        let alone = |t: usize, s: usize| {
            let (xt, o) = (
                Compute::tensor(&lone, k as u32),
                Compute::tensor(&lone, N as u32),
            );
            realm_compute::checked::write_tensor(&lone, &xt, rows(t, s), x(t, s, k))
                .expect("write");
            Compute::matmul(&lone, &xt, &w, &o).expect("matmul");
            (0..rows(t, s) as u32)
                .flat_map(|r| Compute::read_row(&lone, &o, r).expect("row"))
                .collect::<Vec<f32>>()
        };
        let batcher = Arc::new(Batcher::default());
        let start = Arc::new(Barrier::new(TENANTS));
        let outs: Vec<Vec<Vec<f32>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..TENANTS)
                .map(|t| {
                    let (spin, batcher, start, file) =
                        (spin.clone(), batcher.clone(), start.clone(), file.clone());
                    scope.spawn(move || {
                        let b = CpuBackend::batched(spin, 1 << 20, batcher);
                        let w = Compute::weight(&b, &file, 0, ty, &dims).expect("weight");
                        let (xt, o) =
                            (Compute::tensor(&b, k as u32), Compute::tensor(&b, N as u32));
                        start.wait();
                        (0..STEPS)
                            .map(|s| {
                                let r = rows(t, s);
                                realm_compute::checked::write_tensor(&b, &xt, r, x(t, s, k))
                                    .expect("write");
                                // Every tenant is in its step (it wrote its input) before
                                // any multiplies, as decoding tenants are in a server.
                                start.wait();
                                Compute::matmul(&b, &xt, &w, &o).expect("matmul");
                                (0..r as u32)
                                    .flat_map(|r| Compute::read_row(&b, &o, r).expect("row"))
                                    .collect::<Vec<f32>>()
                            })
                            .collect()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("tenant"))
                .collect()
        });
        for (t, steps) in outs.iter().enumerate() {
            for (s, got) in steps.iter().enumerate() {
                let want = alone(t, s);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(got), bits(&want), "{ty}: tenant {t}, step {s}");
            }
        }
        let (shared, rows) = batcher.shared();
        println!("{ty}: {shared} shared products, {rows} rows");
        assert!(shared > 0, "{ty}: no product was shared");
    }
}

/// A tenant that starts a step and then stops (its guest spins, or waits on something
/// else) does not hold the others: after `batch::STALL` they run without it, and its own
/// step still runs, correctly, when it reads. (Were it waited for forever, this test would
/// never end: the two tenants would wait for each other.)
#[test]
#[cfg_attr(target_arch = "wasm32", ignore = "wasm32-wasip2 has no threads")]
fn a_stalled_tenant_does_not_hold_the_others() {
    if realm_kernels::quant::kernel_level() == realm_kernels::quant::KernelLevel::Amx {
        println!("SKIPPED: REALM_KERNELS=amx is never batched");
        return;
    }
    let spin = Arc::new(SpinPool::new(2).expect("pool"));
    let ty = GgmlType::Q8_0;
    let file = ModelBytes::new(Arc::new(realm_kernels::synthetic::weights(ty, K, N, 5)));
    let dims = [K as u64, N as u64];
    let lone = CpuBackend::new(spin.clone(), 1 << 20);
    let w = Compute::weight(&lone, &file, 0, ty, &dims).expect("weight");
    let alone = |t: usize| {
        let (xt, o) = (
            Compute::tensor(&lone, K as u32),
            Compute::tensor(&lone, N as u32),
        );
        realm_compute::checked::write_tensor(&lone, &xt, 1, x(t, 0, K)[..K].to_vec())
            .expect("write");
        Compute::matmul(&lone, &xt, &w, &o).expect("matmul");
        Compute::read_row(&lone, &o, 0).expect("row")
    };
    let batcher = Arc::new(Batcher::default());
    let (b_done, b_finished) = std::sync::mpsc::channel::<()>();
    let (a_started, a_is_in_step) = std::sync::mpsc::channel::<()>();
    let (a, b) = std::thread::scope(|scope| {
        let (spin_a, batcher_a, file_a) = (spin.clone(), batcher.clone(), file.clone());
        let a = scope.spawn(move || {
            let be = CpuBackend::batched(spin_a, 1 << 20, batcher_a);
            let w = Compute::weight(&be, &file_a, 0, ty, &dims).expect("weight");
            let (xt, o) = (
                Compute::tensor(&be, K as u32),
                Compute::tensor(&be, N as u32),
            );
            realm_compute::checked::write_tensor(&be, &xt, 1, x(0, 0, K)[..K].to_vec())
                .expect("write");
            Compute::matmul(&be, &xt, &w, &o).expect("matmul");
            a_started.send(()).expect("signal");
            // In its step, not reading, until the other tenant is done.
            b_finished.recv().expect("B finishes");
            Compute::read_row(&be, &o, 0).expect("row")
        });
        a_is_in_step.recv().expect("A started");
        let (spin_b, batcher_b, file_b) = (spin.clone(), batcher.clone(), file.clone());
        let b = scope.spawn(move || {
            let be = CpuBackend::batched(spin_b, 1 << 20, batcher_b);
            let w = Compute::weight(&be, &file_b, 0, ty, &dims).expect("weight");
            let (xt, o) = (
                Compute::tensor(&be, K as u32),
                Compute::tensor(&be, N as u32),
            );
            realm_compute::checked::write_tensor(&be, &xt, 1, x(1, 0, K)[..K].to_vec())
                .expect("write");
            Compute::matmul(&be, &xt, &w, &o).expect("matmul");
            let row = Compute::read_row(&be, &o, 0).expect("row");
            b_done.send(()).expect("signal");
            row
        });
        (a.join().expect("A"), b.join().expect("B"))
    });
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&alone(0)));
    assert_eq!(bits(&b), bits(&alone(1)));
}
