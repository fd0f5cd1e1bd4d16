//! Cross-tenant batching of decode matmuls (experimental, off unless `REALM_BATCH=1`):
//! tenants of one engine that multiply by the same weight at about the same time share one
//! multi-row product, so the weight is read once for all of them. The tile kernels compute every row with the single-row kernel's bits,
//! so batching changes no tenant's numbers (the opt-in AMX family has its own numerics and
//! is never batched).
//!
//! The first tenant to arrive at a weight leads: it waits, briefly, for the other tenants
//! that are decoding (those that brought a decode matmul within the last [`ACTIVE`]; none
//! when it is alone, so a lone tenant never waits), then multiplies every row that joined
//! and hands each tenant its own rows. A tenant that does not come (it finished, or it is
//! processing a prompt) costs the leader a wait of at most [`WAIT`] per product until it
//! stops counting as active.
//!
//! Measured on a 2-vCPU VM (SmolLM2, `bench/serve.py`, 16 clients): 106 tok/s batched
//! against 121–128 with tenants computing side by side. The tenants' threads outnumber the
//! cores, so the ones a leader waits for are often descheduled; a scheduler that owns the
//! cores and runs every tenant's step (as llama-server's loop does) is the next step.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The longest a leader waits for the tenants it expects.
pub const WAIT: Duration = Duration::from_micros(100);

/// A tenant counts as decoding for this long after its last decode matmul.
pub const ACTIVE: Duration = Duration::from_millis(10);

/// Rows a tenant brings to a batch at most (one token, or a few).
pub const MAX_ROWS: usize = 4;

/// One product being gathered: the joined rows and, once computed, everyone's outputs.
struct Batch {
    state: Mutex<Gather>,
    /// A tenant joined (the leader waits on it, asleep, so that the others get the cores).
    joined: Condvar,
    done: Condvar,
}

struct Gather {
    /// Every joined tenant's activations, one after another (`k` values per row).
    xs: Vec<f32>,
    /// Rows per joined tenant, in order (the leader's first).
    parts: Vec<usize>,
    /// No more may join (the leader is computing).
    closed: bool,
    /// The outputs of every row (`n` values each), once computed; an error if it failed.
    result: Option<Result<Arc<Vec<f32>>, realm_compute::Error>>,
}

/// The engine-wide meeting point for decode matmuls.
#[derive(Default)]
pub struct Batcher {
    open: Mutex<HashMap<usize, Arc<Batch>>>,
    /// Per tenant (its backend's id): when it last brought a decode matmul, and the weight
    /// it is at now (leading or joined), if any.
    tenants: Mutex<HashMap<u64, (Instant, Option<usize>)>>,
    next_id: AtomicU64,
    /// Products that served more than one tenant, and the rows they multiplied.
    shared: AtomicU64,
    shared_rows: AtomicU64,
}

/// What a tenant's matmul became.
pub enum Joined {
    /// It leads: it must run [`Lead::finish`] with the rows it gathered.
    Lead(Lead),
    /// Another tenant computed its rows: the outputs (`rows × n`).
    Done(Vec<f32>),
}

/// A leader's batch.
pub struct Lead {
    batcher: Arc<Batcher>,
    id: u64,
    key: usize,
    batch: Arc<Batch>,
    expect: usize,
}

impl Batcher {
    /// An id for a tenant's backend.
    pub fn register(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Products that served more than one tenant so far, and the rows they multiplied.
    pub fn shared(&self) -> (u64, u64) {
        (
            self.shared.load(Ordering::Relaxed),
            self.shared_rows.load(Ordering::Relaxed),
        )
    }

    /// Tenant `id` brings `x` (`rows × k`, rows ≤ [`MAX_ROWS`]) to the product with the
    /// weight `key` (whose rows are `n` outputs).
    pub fn join(self: &Arc<Self>, id: u64, key: usize, x: &[f32], rows: usize, n: usize) -> Joined {
        // Expected: the tenants decoding now, less those at another weight (they passed
        // this one already, or will come to it after theirs).
        let now = Instant::now();
        let expect = match self.tenants.lock() {
            Ok(mut tenants) => {
                tenants.insert(id, (now, Some(key)));
                tenants.retain(|_, (t, _)| now.duration_since(*t) < ACTIVE);
                tenants
                    .values()
                    .filter(|(_, at)| at.is_none_or(|k| k == key))
                    .count()
            }
            Err(_) => 1,
        };
        let mut open = match self.open.lock() {
            Ok(o) => o,
            Err(e) => e.into_inner(),
        };
        if let Some(batch) = open.get(&key).cloned() {
            let mut g = batch.state.lock().unwrap_or_else(|e| e.into_inner());
            if !g.closed {
                drop(open);
                let index = g.parts.len();
                g.xs.extend_from_slice(x);
                g.parts.push(rows);
                batch.joined.notify_one();
                let mut g = batch
                    .done
                    .wait_while(g, |g| g.result.is_none())
                    .unwrap_or_else(|e| e.into_inner());
                self.arrived(id);
                let start: usize = g.parts[..index].iter().sum::<usize>() * n;
                return Joined::Done(match g.result.as_mut() {
                    Some(Ok(all)) => all[start..start + rows * n].to_vec(),
                    // The leader failed: this tenant computes its own rows.
                    _ => Vec::new(),
                });
            }
        }
        let batch = Arc::new(Batch {
            state: Mutex::new(Gather {
                xs: x.to_vec(),
                parts: vec![rows],
                closed: false,
                result: None,
            }),
            joined: Condvar::new(),
            done: Condvar::new(),
        });
        open.insert(key, batch.clone());
        Joined::Lead(Lead {
            batcher: self.clone(),
            id,
            key,
            batch,
            expect,
        })
    }

    /// Tenant `id` is past its weight.
    fn arrived(&self, id: u64) {
        if let Ok(mut tenants) = self.tenants.lock()
            && let Some(t) = tenants.get_mut(&id)
        {
            t.1 = None;
        }
    }
}

impl Lead {
    /// Waits for the tenants expected (at most [`WAIT`]), closes the batch, and returns
    /// every joined row (`rows × k`) and the rows per tenant.
    pub fn gather(&self) -> (Vec<f32>, Vec<usize>) {
        if self.expect > 1 {
            let g = self.batch.state.lock().unwrap_or_else(|e| e.into_inner());
            let expect = self.expect;
            let _ = self
                .batch
                .joined
                .wait_timeout_while(g, WAIT, |g| g.parts.len() < expect);
        }
        // No one may join from here on: later arrivals start the next batch.
        if let Ok(mut open) = self.batcher.open.lock()
            && open
                .get(&self.key)
                .is_some_and(|b| Arc::ptr_eq(b, &self.batch))
        {
            open.remove(&self.key);
        }
        let mut g = self.batch.state.lock().unwrap_or_else(|e| e.into_inner());
        g.closed = true;
        if g.parts.len() > 1 {
            self.batcher.shared.fetch_add(1, Ordering::Relaxed);
            let rows: usize = g.parts.iter().sum();
            self.batcher
                .shared_rows
                .fetch_add(rows as u64, Ordering::Relaxed);
        }
        (std::mem::take(&mut g.xs), g.parts.clone())
    }

    /// Hands the outputs of every row (`rows × n`) to the tenants that joined.
    pub fn finish(self, result: Result<Arc<Vec<f32>>, realm_compute::Error>) {
        let mut g = self.batch.state.lock().unwrap_or_else(|e| e.into_inner());
        g.result = Some(result);
        drop(g);
        self.batch.done.notify_all();
        // `drop` finds the result set.
    }
}

impl Drop for Lead {
    /// A leader that unwinds before [`Lead::finish`] still releases the tenants that
    /// joined (they compute their own rows).
    fn drop(&mut self) {
        self.batcher.arrived(self.id);
        let mut g = self.batch.state.lock().unwrap_or_else(|e| e.into_inner());
        if g.result.is_none() {
            g.closed = true;
            g.result = Some(Err(realm_compute::Error::InvalidArgument(
                "the batch's leader stopped".into(),
            )));
            drop(g);
            self.batch.done.notify_all();
        }
    }
}
