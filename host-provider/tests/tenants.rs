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
    let cpu = realm_host::compute::backend("cpu", &spin, Some(&batcher)).expect("the cpu backend");
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
