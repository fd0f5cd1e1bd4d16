//! Tenant isolation: handles name resources of their own Store only, and tenants of one
//! engine share the mapped weights.

use std::collections::HashMap;
use std::sync::Arc;

use realm_host::bindings::realm::compute::tensors::{Host, HostKvCache, HostTensor};
use realm_host::compute::ComputeState;
use realm_host::compute::{KvCacheRes, TensorRes};
use wasmtime::component::Resource;

fn tenant() -> ComputeState {
    let spin = Arc::new(realm_host::compute::pool::SpinPool::new(1).expect("spin pool"));
    let batcher = Arc::new(realm_kernels::batch::Batcher::default());
    let cpu =
        realm_host::compute::backend("cpu", None, &spin, Some(&batcher)).expect("the cpu backend");
    ComputeState::new(HashMap::new(), cpu, None)
}

fn borrow_t(r: &Resource<TensorRes>) -> Resource<TensorRes> {
    Resource::new_borrow(r.rep())
}

fn borrow_c(r: &Resource<KvCacheRes>) -> Resource<KvCacheRes> {
    Resource::new_borrow(r.rep())
}

/// Tenant B, holding A's handle numbers, reaches none of A's tensors or KV cache: the
/// numbers index B's own table (empty, or B's own data), never A's.
#[test]
fn a_tenant_cannot_reach_another_tenants_tensors_or_kv_cache() {
    let (mut a, mut b) = (tenant(), tenant());
    let secret = vec![3.25f32, -1.5, 42.0, 7.0];
    let ta = HostTensor::new(&mut a, 4);
    HostTensor::write(&mut a, borrow_t(&ta), 1, secret.clone()).expect("A writes");
    let ca = HostKvCache::new(&mut a, 2, 16, 1, 4);
    assert_eq!(HostKvCache::capacity(&mut a, borrow_c(&ca)), 16);

    // B has nothing: A's handle numbers are unknown to it.
    assert!(HostTensor::read_row(&mut b, borrow_t(&ta), 0).is_err());
    assert_eq!(HostKvCache::capacity(&mut b, borrow_c(&ca)), 0);
    let (q, k, v, out) = (
        HostTensor::new(&mut b, 4),
        HostTensor::new(&mut b, 4),
        HostTensor::new(&mut b, 4),
        HostTensor::new(&mut b, 4),
    );
    for t in [&q, &k, &v] {
        HostTensor::write(&mut b, borrow_t(t), 1, vec![0.5; 4]).expect("B writes");
    }
    let attend = Host::attention(
        &mut b,
        borrow_t(&q),
        borrow_t(&k),
        borrow_t(&v),
        borrow_c(&ca),
        0,
        0,
        1,
        0.5,
        0,
        0.0,
        borrow_t(&out),
    );
    assert!(attend.is_err(), "B used A's KV cache handle");

    // B's own resources may get the same numbers; they still hold B's data only.
    for rep in 0..8u32 {
        if let Ok(row) = HostTensor::read_row(&mut b, Resource::new_borrow(rep), 0) {
            assert_ne!(row, secret, "B read A's tensor through handle {rep}");
        }
    }
    // And A's data is untouched by anything B did.
    assert_eq!(
        HostTensor::read_row(&mut a, borrow_t(&ta), 0).expect("A reads"),
        secret
    );
}

/// Two tenants of one engine: separate Stores, one mapping of the model file.
#[test]
fn tenants_of_one_engine_share_the_mapped_weights() {
    let engine = realm_host::Engine::new(realm_host::EngineConfig {
        threads: 1,
        ..realm_host::EngineConfig::default()
    })
    .expect("engine");
    let path = realm_host::default_model_path();
    let a = engine.load_model(&path).expect("tenant A");
    let b = engine.load_model(&path).expect("tenant B");
    assert!(a.shares_weights_with(&b));
    let other = realm_host::Engine::new(realm_host::EngineConfig {
        threads: 1,
        ..realm_host::EngineConfig::default()
    })
    .expect("engine");
    let c = other.load_model(&path).expect("tenant C");
    assert!(
        !a.shares_weights_with(&c),
        "separate engines map separately"
    );
}

/// The engine's device is checked when it starts, with the devices it has in the message.
#[test]
fn an_unknown_device_is_refused_by_name() {
    let e = realm_host::Engine::new(realm_host::EngineConfig {
        device: "tpu".into(),
        threads: 1,
        ..realm_host::EngineConfig::default()
    })
    .err()
    .expect("refused");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("unknown device 'tpu'") && msg.contains("cpu"),
        "{msg}"
    );
}

/// A file of `rows` random Q8_0 weight rows of `k`, mapped as a model named `w`.
fn weight_file(k: usize, rows: usize) -> HashMap<String, Arc<realm_host::compute::MappedModel>> {
    let bytes = realm_kernels::synthetic::weights(realm_compute::GgmlType::Q8_0, k, rows, 5);
    let path = std::env::temp_dir().join(format!(
        "realm-tenants-{}-{k}x{rows}.bin",
        std::process::id()
    ));
    std::fs::write(&path, bytes).expect("write");
    let m = realm_host::compute::MappedModel::open("w", &path).expect("map");
    let _ = std::fs::remove_file(&path);
    HashMap::from([("w".to_string(), m)])
}

/// The weight the batching test multiplies by: `K × N`.
const K: usize = 256;
const N: usize = 64;

/// `input` (one row of `K`) times model `w`'s first `K × N` Q8_0 weight in tenant `s`
/// (`ready` runs between writing the input and multiplying): the input and output tensors
/// and the output row.
fn multiply(
    s: &mut ComputeState,
    input: Vec<f32>,
    ready: impl FnOnce(),
) -> (Resource<TensorRes>, Resource<TensorRes>, Vec<f32>) {
    use realm_host::bindings::realm::compute::store::{Host as _, HostModelFile};
    use realm_host::bindings::realm::compute::types::Dtype;
    let f = s.open_model("w".into()).expect("open");
    let w = HostModelFile::weight(s, f, 0, Dtype::Q80, vec![K as u64, N as u64]).expect("weight");
    let (x, o) = (HostTensor::new(s, K as u32), HostTensor::new(s, N as u32));
    HostTensor::write(s, borrow_t(&x), 1, input).expect("write");
    ready();
    Host::matmul(s, borrow_t(&x), Resource::new_borrow(w.rep()), borrow_t(&o)).expect("matmul");
    let row = HostTensor::read_row(s, borrow_t(&o), 0).expect("row");
    (x, o, row)
}

/// Two tenants whose matmuls are batched into one product each get their own rows back,
/// and still reach none of each other's tensors or KV cache afterwards.
#[test]
#[cfg_attr(target_arch = "wasm32", ignore = "no threads")]
fn tenants_batched_in_one_product_keep_their_own_data() {
    let models = weight_file(K, N);
    let spin = Arc::new(realm_host::compute::pool::SpinPool::new(2).expect("spin pool"));
    let batcher = Arc::new(realm_kernels::batch::Batcher::default());
    let tenant = || {
        let cpu = realm_host::compute::backend("cpu", None, &spin, Some(&batcher)).expect("cpu");
        ComputeState::new(models.clone(), cpu, None)
    };
    let input = |t: usize| -> Vec<f32> {
        (0..K)
            .map(|i| ((i * 13 + t * 71) % 29) as f32 / 7.0 - 2.0)
            .collect()
    };
    // What each tenant's row gives alone.
    let alone = |t: usize| -> Vec<f32> {
        let cpu = realm_host::compute::backend("cpu", None, &spin, None).expect("cpu");
        let mut s = ComputeState::new(models.clone(), cpu, None);
        multiply(&mut s, input(t), || {}).2
    };
    let start = std::sync::Barrier::new(2);
    let (a, b) = std::thread::scope(|scope| {
        let run = |t: usize| {
            let (tenant, start, input) = (&tenant, &start, &input);
            scope.spawn(move || {
                let mut s = tenant();
                let cache = HostKvCache::new(&mut s, 1, 8, 1, 4);
                let (x, o, row) = multiply(&mut s, input(t), || {
                    start.wait();
                });
                (s, x, o, cache, row)
            })
        };
        let (a, b) = (run(0), run(1));
        (a.join().expect("A"), b.join().expect("B"))
    });
    assert!(batcher.shared().0 > 0, "the two matmuls were not batched");
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.4), bits(&alone(0)), "A got other rows than its own");
    assert_eq!(bits(&b.4), bits(&alone(1)), "B got other rows than its own");
    let (mut sa, mut sb) = (a.0, b.0);
    // Each reads its own input and output through its handles, never the other's.
    for (s, x, o, mine, theirs) in [
        (&mut sa, &a.1, &a.2, (input(0), &a.4), (input(1), &b.4)),
        (&mut sb, &b.1, &b.2, (input(1), &b.4), (input(0), &a.4)),
    ] {
        assert_eq!(HostTensor::read_row(s, borrow_t(x), 0).expect("x"), mine.0);
        assert_eq!(HostTensor::read_row(s, borrow_t(o), 0).expect("o"), *mine.1);
        for rep in 0..16u32 {
            if let Ok(row) = HostTensor::read_row(s, Resource::new_borrow(rep), 0) {
                assert_ne!(row, theirs.0, "read the other tenant's input through {rep}");
                assert_ne!(
                    row, *theirs.1,
                    "read the other tenant's output through {rep}"
                );
            }
        }
    }
    // Each KV cache is its tenant's: the same handle number in the other Store is the
    // other's own cache, empty.
    assert_eq!(HostKvCache::capacity(&mut sa, borrow_c(&a.3)), 8);
    assert_eq!(HostKvCache::capacity(&mut sb, borrow_c(&b.3)), 8);
}

/// An engine's tenants share one weight store: one budget for the process, each weight
/// counted once however many tenants use it, and a guest's `set-max-resident` does not
/// change it for the others.
#[test]
fn tenants_of_one_engine_share_one_resident_budget() {
    use realm_host::bindings::realm::compute::store::{Host as _, HostModelFile};
    use realm_host::bindings::realm::compute::types::Dtype;
    const K: usize = 1024;
    const N: usize = 64;
    // Four weights of 64 rows × 1088 bytes; the budget holds two of them.
    let models = weight_file(K, 4 * N);
    let per = realm_compute::GgmlType::Q8_0
        .row_bytes(K as u64)
        .expect("row")
        * N as u64;
    let store = realm_host::compute::residency::WeightStore::shared(Some(2 * per));
    let spin = Arc::new(realm_host::compute::pool::SpinPool::new(1).expect("spin pool"));
    let mut tenants: Vec<ComputeState> = (0..2)
        .map(|_| {
            let cpu = realm_host::compute::backend("cpu", None, &spin, None).expect("cpu");
            ComputeState::sharing(models.clone(), cpu, store.clone())
        })
        .collect();
    // A guest asks for an unlimited budget: the host's stays.
    tenants[0].set_max_resident(0);
    for round in 0..3 {
        for s in &mut tenants {
            let f = s.open_model("w".into()).expect("open");
            for i in 0..4u64 {
                let w = HostModelFile::weight(
                    s,
                    Resource::new_borrow(f.rep()),
                    i * per,
                    Dtype::Q80,
                    vec![K as u64, N as u64],
                )
                .expect("weight");
                let (x, o) = (HostTensor::new(s, K as u32), HostTensor::new(s, N as u32));
                HostTensor::write(s, borrow_t(&x), 1, vec![0.25; K]).expect("write");
                Host::matmul(s, borrow_t(&x), Resource::new_borrow(w.rep()), borrow_t(&o))
                    .expect("matmul");
                let stats = s.store_stats();
                assert!(
                    stats.resident_bytes <= 2 * per,
                    "round {round}: {stats:?} over the budget of {}",
                    2 * per
                );
            }
        }
    }
    let (a, b) = (tenants[0].store_stats(), tenants[1].store_stats());
    assert_eq!(a, b, "one store for both tenants");
    assert_eq!(a.peak_resident_bytes, 2 * per);
    assert!(a.evictions > 0, "{a:?}");
}
