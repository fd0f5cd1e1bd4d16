//! Cross-tenant batching: the tenants of one engine run their steps together, in rounds,
//! and every weight's matmuls of a round are one multi-row product, so the weight is read
//! once for all of them. The tile kernels compute every row with the single-row kernel's
//! bits, so batching changes no tenant's numbers (the opt-in AMX family has its own
//! numerics and is never batched).
//!
//! It works as llama-server's loop does, without taking the tenants' threads away: a
//! batched backend records a tenant's ops instead of running them, from the first op
//! after a read to the next read (a *step*: one forward pass, a prompt's or a token's),
//! and submits the step when the guest reads its result. When no tenant is still
//! recording a step, the last to submit runs a *round*: all submitted steps, op by op,
//! each weight's matmuls of all of them as one product (`CpuBackend::run_round`). A new
//! request's prompt rows go through the layers with the running requests' token rows, so
//! it joins at the next step instead of stopping them for its whole prompt.
//!
//! The tenants of a round count as recording from then on (they sample their token and
//! record the next step); one that stays in a step for longer than [`STALL`] without
//! submitting (its request ended, or its guest spins) stops being waited for until its
//! next op.
//!
//! Isolation: a tenant's rows are copied into a shared product's input and only its own
//! rows are copied back out; tensors, caches and handles stay the tenant's own.
//!
//! Measured on the 2-vCPU VM (SmolLM2, `bench/serve.py`, 16 clients): 182-209 tok/s in
//! rounds against 158-162 with each tenant computing its own steps side by side, and
//! about half the time to the first token; equal at one client. Two designs before this
//! one lost to side-by-side tenants: a tenant waiting at every matmul for the others (with
//! a timer, then in lockstep) paid a barrier of sixteen threads on two cores per matmul,
//! 211 per token; recording whole steps pays one per token.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use realm_compute::{Error, Result};

use crate::cpu::Step;

/// How long a round waits for a tenant that is in a step but neither submits nor ends.
pub const STALL: Duration = Duration::from_millis(5);

/// What a tenant is doing, as the batcher sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// Not in a step (or no longer waited for): not counted.
    Idle,
    /// Recording a step: rounds wait for it.
    Recording { since: Instant },
    /// Its step is submitted and waits for a round (or is in the one running).
    Submitted,
}

#[derive(Default)]
struct State {
    phases: HashMap<u64, Phase>,
    /// Tenants recording.
    recording: usize,
    /// Submitted steps no round has taken yet.
    pending: Vec<(u64, Step)>,
    /// A round is running (one at a time).
    running: bool,
    /// Finished steps' results, per tenant.
    done: HashMap<u64, Result<()>>,
    /// The threads of the tenants waiting for their step, woken one by one (never all at
    /// once: sixteen threads contending for this lock on two cores cost more than the
    /// products).
    waiting: HashMap<u64, std::thread::Thread>,
}

/// The engine-wide meeting point of the tenants' steps.
#[derive(Default)]
pub struct Batcher {
    state: Mutex<State>,
    next_id: AtomicU64,
    rounds: AtomicU64,
    /// Products that served more than one tenant, and the rows they multiplied.
    shared: AtomicU64,
    shared_rows: AtomicU64,
    /// Nanoseconds spent in rounds, and in their shared products.
    round_ns: AtomicU64,
    product_ns: AtomicU64,
}

/// Runs a round's steps; returns each tenant's result.
pub type RunRound<'a> = dyn FnMut(Vec<(u64, Step)>) -> Vec<(u64, Result<()>)> + 'a;

impl Batcher {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update below is a few assignments with nothing that can unwind in between:
        // the state is consistent even if a holder panicked.
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
        if matches!(s.phases.remove(&id), Some(Phase::Recording { .. })) {
            s.recording -= 1;
            Self::wake_a_runner(&s);
        }
        s.done.remove(&id);
        s.waiting.remove(&id);
    }

    /// Rounds run so far.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Products that served more than one tenant so far, and the rows they multiplied.
    pub fn shared(&self) -> (u64, u64) {
        (
            self.shared.load(Ordering::Relaxed),
            self.shared_rows.load(Ordering::Relaxed),
        )
    }

    /// A round multiplied `rows` rows of several tenants in one product.
    pub fn count_shared(&self, rows: usize) {
        self.shared.fetch_add(1, Ordering::Relaxed);
        self.shared_rows.fetch_add(rows as u64, Ordering::Relaxed);
    }

    /// Seconds spent running rounds so far, and the part of it in shared products (the
    /// rest: the steps' other ops; the time outside rounds: the tenants' own work).
    pub fn seconds(&self) -> (f64, f64) {
        let s = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 * 1e-9;
        (s(&self.round_ns), s(&self.product_ns))
    }

    /// A shared product took `d`.
    pub fn count_product_time(&self, d: Duration) {
        self.product_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Tenant `id` starts recording a step.
    pub fn enter(&self, id: u64) {
        let mut s = self.lock();
        if s.phases.get(&id) == Some(&Phase::Idle) {
            s.phases.insert(
                id,
                Phase::Recording {
                    since: Instant::now(),
                },
            );
            s.recording += 1;
        }
    }

    /// Tenant `id` has no step coming (its request ended): rounds stop waiting for it
    /// until its next op.
    pub fn leave(&self, id: u64) {
        let mut s = self.lock();
        if matches!(s.phases.get(&id), Some(Phase::Recording { .. })) {
            s.phases.insert(id, Phase::Idle);
            s.recording -= 1;
            Self::wake_a_runner(&s);
        }
    }

    /// When no tenant is recording any more but steps are submitted, one waiting tenant
    /// is woken to run the next round.
    fn wake_a_runner(s: &State) {
        if s.recording == 0
            && !s.running
            && let Some((id, _)) = s.pending.first()
            && let Some(t) = s.waiting.get(id)
        {
            t.unpark();
        }
    }

    /// Tenant `id` submits its step and waits for it to run (in a round it may run
    /// itself, with `run`).
    pub fn submit(&self, id: u64, step: Step, run: &mut RunRound<'_>) -> Result<()> {
        let mut s = self.lock();
        if matches!(s.phases.get(&id), Some(Phase::Recording { .. })) {
            s.recording -= 1;
        }
        s.phases.insert(id, Phase::Submitted);
        s.pending.push((id, step));
        s.waiting.insert(id, std::thread::current());
        loop {
            if let Some(result) = s.done.remove(&id) {
                s.waiting.remove(&id);
                return result;
            }
            if s.recording == 0 && !s.running && !s.pending.is_empty() {
                s = self.round(s, run);
                continue;
            }
            // The first waiting tenant watches for stalled ones; the others sleep until a
            // round wakes them (with a long timeout, in case the watcher's round ran them).
            let timeout = match s.pending.first() {
                Some((first, _)) if *first == id => STALL,
                _ => STALL * 20,
            };
            drop(s);
            let parked_at = Instant::now();
            std::thread::park_timeout(timeout);
            s = self.lock();
            if parked_at.elapsed() >= STALL {
                // Stop waiting for tenants that have recorded this long without submitting;
                // each is waited for again from its next op.
                let now = Instant::now();
                let mut stalled = 0;
                for phase in s.phases.values_mut() {
                    if let Phase::Recording { since } = *phase
                        && now.duration_since(since) >= STALL
                    {
                        *phase = Phase::Idle;
                        stalled += 1;
                    }
                }
                s.recording -= stalled;
            }
        }
    }

    /// Runs every submitted step (the lock released meanwhile) and hands each tenant its
    /// result.
    fn round<'a>(
        &'a self,
        mut s: MutexGuard<'a, State>,
        run: &mut RunRound<'_>,
    ) -> MutexGuard<'a, State> {
        let steps = std::mem::take(&mut s.pending);
        s.running = true;
        drop(s);
        self.rounds.fetch_add(1, Ordering::Relaxed);
        let ids: Vec<u64> = steps.iter().map(|(id, _)| *id).collect();
        // Deliver even if `run` unwinds, so that no tenant waits forever.
        let mut delivery = Delivery {
            batcher: self,
            ids,
            results: Vec::new(),
        };
        let start = Instant::now();
        delivery.results = run(steps);
        self.round_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        drop(delivery);
        self.lock()
    }
}

/// A round's results, handed to its tenants when dropped (an error for a step that did
/// not finish).
struct Delivery<'a> {
    batcher: &'a Batcher,
    ids: Vec<u64>,
    results: Vec<(u64, Result<()>)>,
}

impl Drop for Delivery<'_> {
    fn drop(&mut self) {
        let mut s = self.batcher.lock();
        let mut results: HashMap<u64, Result<()>> = self.results.drain(..).collect();
        let now = Instant::now();
        let me = std::thread::current().id();
        for &id in &self.ids {
            if !s.phases.contains_key(&id) {
                continue;
            }
            let r = results.remove(&id).unwrap_or_else(|| {
                Err(Error::InvalidArgument(
                    "the round running this step stopped".into(),
                ))
            });
            s.done.insert(id, r);
            // It samples its token and records its next step: the next round waits for it.
            s.phases.insert(id, Phase::Recording { since: now });
            s.recording += 1;
            if let Some(t) = s.waiting.get(&id)
                && t.id() != me
            {
                t.unpark();
            }
        }
        s.running = false;
        Batcher::wake_a_runner(&s);
    }
}
