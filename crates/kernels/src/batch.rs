//! Cross-tenant batching: the tenants of one engine that multiply by the same weight share
//! one multi-row product, so the weight is read once for all of them. The tile kernels
//! compute every row with the single-row kernel's bits, so batching changes no tenant's
//! numbers (the opt-in AMX family has its own numerics and is never batched).
//!
//! It works as llama-server's loop does, without taking the tenants' threads away: a
//! tenant's step (its ops from the first after reading a result to the next read) parks
//! at every batchable matmul with its rows. When no tenant in a step is still computing
//! (every one is parked, or has finished its step), the last to park runs a *round*: the
//! products of the parked rows at the lowest matmul index of a step, each weight's rows
//! in one product. Taking the lowest index first brings tenants into lockstep: a tenant
//! that starts a new request (its prompt's rows) or falls behind is multiplied alone until
//! it reaches the others, then with them. A prompt's rows join the decode rows at each
//! weight, so a new request goes through the layers with the running ones (each of its
//! layers is one more row block in their products) rather than stopping them for its
//! whole prompt.
//!
//! A tenant that stays in a step without parking for longer than [`STALL`] (a guest that
//! spins, or one busy with a long attention) stops being waited for until its next op.
//!
//! Isolation: a tenant's rows are copied into the product's input and only its own rows
//! are copied back out; tensors, caches and handles stay the tenant's own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use realm_compute::{Error, WeightData};

/// How long a round waits for a tenant that is in a step but neither parks nor finishes.
pub const STALL: Duration = Duration::from_millis(3);

/// What a tenant is doing, as the batcher sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// Between steps (or stopped being waited for): not counted.
    Idle,
    /// In a step, computing toward its next matmul: rounds wait for it.
    Running { since: Instant },
    /// Parked at a matmul that no round has taken yet.
    Parked,
    /// Its rows are in the round being computed: counted as running (it continues as soon
    /// as the round ends), never given up on.
    Taken,
}

/// The rows parked at one weight, at one matmul index.
struct Pending {
    key: usize,
    index: u32,
    weight: WeightData,
    /// Every parked tenant's rows, one after another (`k` values per row).
    xs: Vec<f32>,
    /// (tenant, rows), in the order of `xs`.
    parts: Vec<(u64, usize)>,
}

/// A tenant's share of a finished product.
type Outcome = Result<(std::sync::Arc<Vec<f32>>, usize), Error>;

#[derive(Default)]
struct State {
    phases: HashMap<u64, Phase>,
    /// Tenants counted as running (phase Running or Taken).
    running: usize,
    pending: Vec<Pending>,
    /// A round is being computed (one at a time).
    computing: bool,
    /// Finished products, per tenant: its rows' outputs start at the offset.
    done: HashMap<u64, Outcome>,
    /// The threads of the parked tenants, woken one by one (never all at once: sixteen
    /// threads contending for this lock on two cores cost more than the products).
    parked: HashMap<u64, std::thread::Thread>,
}

/// The engine-wide meeting point of the tenants' matmuls.
#[derive(Default)]
pub struct Batcher {
    state: Mutex<State>,
    next_id: AtomicU64,
    /// Products that served more than one tenant, and the rows they multiplied.
    shared: AtomicU64,
    shared_rows: AtomicU64,
}

/// Computes one product: a weight by `rows` rows of activations, giving `rows × n` outputs.
pub type Multiply<'a> = dyn FnMut(&WeightData, Vec<f32>, usize) -> Result<Vec<f32>, Error> + 'a;

impl Batcher {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent counts (every update below is
        // a few assignments with no call that can unwind in between).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An id for a tenant's backend.
    pub fn register(&self) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().phases.insert(id, Phase::Idle);
        id
    }

    /// The tenant is gone (its backend dropped).
    pub fn unregister(&self, id: u64) {
        let mut s = self.lock();
        self.leave_locked(&mut s, id);
        s.phases.remove(&id);
        s.done.remove(&id);
    }

    /// Products that served more than one tenant so far, and the rows they multiplied.
    pub fn shared(&self) -> (u64, u64) {
        (
            self.shared.load(Ordering::Relaxed),
            self.shared_rows.load(Ordering::Relaxed),
        )
    }

    /// Tenant `id` starts a step (its first op since it last read a result).
    pub fn enter(&self, id: u64) {
        let mut s = self.lock();
        if s.phases.get(&id) == Some(&Phase::Idle) {
            s.phases.insert(
                id,
                Phase::Running {
                    since: Instant::now(),
                },
            );
            s.running += 1;
        }
    }

    /// Tenant `id` ends its step (it reads a result back).
    pub fn leave(&self, id: u64) {
        let mut s = self.lock();
        self.leave_locked(&mut s, id);
    }

    fn leave_locked(&self, s: &mut State, id: u64) {
        if matches!(s.phases.get(&id), Some(Phase::Running { .. })) {
            s.phases.insert(id, Phase::Idle);
            s.running -= 1;
            Self::wake_a_runner(s);
        }
    }

    /// When no tenant is computing any more but rows are parked, one parked tenant is
    /// woken to run the next round.
    fn wake_a_runner(s: &State) {
        if s.running == 0
            && !s.computing
            && let Some(p) = s.pending.first()
            && let Some(t) = p.parts.first().and_then(|(id, _)| s.parked.get(id))
        {
            t.unpark();
        }
    }

    /// Tenant `id` multiplies `x` (`rows × k`) by `weight` at the `index`-th matmul of its
    /// step. Returns its `rows × n` outputs, computed in a round with the other tenants'
    /// rows; `multiply` computes the products of a round this tenant runs.
    pub fn matmul(
        &self,
        id: u64,
        index: u32,
        weight: &WeightData,
        x: &[f32],
        rows: usize,
        multiply: &mut Multiply<'_>,
    ) -> Result<Vec<f32>, Error> {
        let key = weight.bytes().as_ptr() as usize;
        let n = weight.meta.n_rows();
        let mut s = self.lock();
        if matches!(s.phases.get(&id), Some(Phase::Running { .. })) {
            s.running -= 1;
        }
        s.phases.insert(id, Phase::Parked);
        match s
            .pending
            .iter_mut()
            .find(|p| p.key == key && p.index == index)
        {
            Some(p) => {
                p.xs.extend_from_slice(x);
                p.parts.push((id, rows));
            }
            None => s.pending.push(Pending {
                key,
                index,
                weight: weight.clone(),
                xs: x.to_vec(),
                parts: vec![(id, rows)],
            }),
        }
        s.parked.insert(id, std::thread::current());
        loop {
            if let Some(outcome) = s.done.remove(&id) {
                s.parked.remove(&id);
                s.phases.insert(
                    id,
                    Phase::Running {
                        since: Instant::now(),
                    },
                );
                drop(s);
                let (all, start) = outcome?;
                return Ok(all[start..start + rows * n].to_vec());
            }
            if s.running == 0 && !s.computing && !s.pending.is_empty() {
                s = self.round(s, multiply);
                continue;
            }
            drop(s);
            let parked_at = Instant::now();
            std::thread::park_timeout(STALL);
            s = self.lock();
            if parked_at.elapsed() >= STALL {
                // Stop waiting for tenants that have computed this long without parking;
                // each is waited for again from its next op.
                let now = Instant::now();
                let mut stalled = 0;
                for phase in s.phases.values_mut() {
                    if let Phase::Running { since } = *phase
                        && now.duration_since(since) >= STALL
                    {
                        *phase = Phase::Idle;
                        stalled += 1;
                    }
                }
                s.running -= stalled;
                Self::wake_a_runner(&s);
            }
        }
    }

    /// Runs the products at the lowest pending index (the lock released meanwhile) and
    /// hands each tenant its rows.
    fn round<'a>(
        &'a self,
        mut s: MutexGuard<'a, State>,
        multiply: &mut Multiply<'_>,
    ) -> MutexGuard<'a, State> {
        let Some(lowest) = s.pending.iter().map(|p| p.index).min() else {
            return s;
        };
        let (round, rest): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut s.pending)
            .into_iter()
            .partition(|p| p.index == lowest);
        s.pending = rest;
        for p in &round {
            for &(id, _) in &p.parts {
                s.phases.insert(id, Phase::Taken);
                s.running += 1;
            }
        }
        s.computing = true;
        drop(s);
        // Deliver even if `multiply` unwinds, so no tenant waits forever.
        let mut outcomes = Delivery {
            batcher: self,
            outcomes: Vec::new(),
            parts: round.iter().map(|p| p.parts.clone()).collect(),
        };
        for p in round {
            let rows: usize = p.parts.iter().map(|&(_, r)| r).sum();
            if p.parts.len() > 1 {
                self.shared.fetch_add(1, Ordering::Relaxed);
                self.shared_rows.fetch_add(rows as u64, Ordering::Relaxed);
            }
            let n = p.weight.meta.n_rows();
            let result = multiply(&p.weight, p.xs, rows).and_then(|out| {
                if out.len() == rows * n {
                    Ok(std::sync::Arc::new(out))
                } else {
                    Err(Error::InvalidArgument("a batched product's size".into()))
                }
            });
            outcomes.outcomes.push(result);
        }
        drop(outcomes);
        self.lock()
    }
}

/// A round's results, handed to its tenants when dropped (an error for each product that
/// did not finish).
struct Delivery<'a> {
    batcher: &'a Batcher,
    outcomes: Vec<Result<std::sync::Arc<Vec<f32>>, Error>>,
    parts: Vec<Vec<(u64, usize)>>,
}

impl Drop for Delivery<'_> {
    fn drop(&mut self) {
        let b = self.batcher;
        let mut s = b.lock();
        for (i, parts) in self.parts.iter().enumerate() {
            let n_out = match self.outcomes.get(i) {
                Some(Ok(all)) => Some(all),
                Some(Err(_)) | None => None,
            };
            let total: usize = parts.iter().map(|&(_, r)| r).sum();
            let mut start = 0;
            for &(id, rows) in parts {
                let outcome = match (n_out, self.outcomes.get(i)) {
                    (Some(all), _) => Ok((all.clone(), start * (all.len() / total.max(1)))),
                    (None, Some(Err(e))) => Err(e.clone()),
                    _ => Err(Error::InvalidArgument(
                        "the batched product did not finish".into(),
                    )),
                };
                start += rows;
                if s.phases.contains_key(&id) {
                    s.done.insert(id, outcome);
                }
            }
        }
        s.computing = false;
        // Each tenant of the round continues (the one running it is awake already).
        let me = std::thread::current().id();
        for parts in &self.parts {
            for (id, _) in parts {
                if let Some(t) = s.parked.get(id)
                    && t.id() != me
                {
                    t.unpark();
                }
            }
        }
        Batcher::wake_a_runner(&s);
    }
}
