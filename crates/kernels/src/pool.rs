//! A fork-join pool for the hot, tiny parallel regions of decoding (a matmul of one token
//! is tens of microseconds; there are hundreds per token). Its helpers spin between jobs
//! for a while before parking, as ggml's thread pool does, so a job starts without a
//! futex wake-up. Shares are claimed, not assigned: the caller and every helper that is
//! running take the next unclaimed share until none is left, so a helper the OS has not
//! scheduled (more threads than cores) delays nobody; the caller waits only for shares
//! already started. One job at a time: a tenant that finds the pool busy runs its job's
//! shares on its own thread instead of waiting.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle helper busy-waits, then yields its core between checks, before
/// parking. Yielding keeps a spinning helper from starving other runnable threads (other
/// tenants' or processes') when the machine is oversubscribed.
const SPIN_FOR: Duration = Duration::from_micros(150);
const YIELD_FOR: Duration = Duration::from_micros(500);
/// How long after a caller found the pool busy helpers stop spinning.
const CONTENDED_FOR: Duration = Duration::from_millis(20);

type Job = dyn Fn(usize) + Sync;

thread_local! {
    /// This thread is running a share of a job: a job it starts runs here, whole.
    static IN_JOB: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// This thread runs a share of a job: a job it starts runs on it, whole.
pub fn nested() -> bool {
    IN_JOB.with(std::cell::Cell::get)
}

/// Runs `f` with this thread marked as inside a job.
fn in_job<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            IN_JOB.with(|j| j.set(self.0));
        }
    }
    let _reset = Reset(IN_JOB.with(|j| j.replace(true)));
    f()
}

struct Shared {
    /// Bumped once per job; helpers wait for it to change.
    generation: AtomicU64,
    /// The current job (a `*const &Job`), valid while `open` or while a helper is `active`.
    job: AtomicPtr<&'static Job>,
    /// The next share of the current job to claim, and the shares finished.
    next: AtomicUsize,
    done: AtomicUsize,
    /// Shares in the current job.
    shares: AtomicUsize,
    /// The current job may still be joined.
    open: AtomicBool,
    /// Helpers inside the current job (they may read `job`).
    active: AtomicUsize,
    stop: AtomicBool,
    /// A helper's share panicked during the current job.
    panicked: AtomicBool,
    /// When (µs since `epoch`) a caller last found the pool busy: while tenants contend,
    /// helpers park at once instead of spinning on cores the other tenants need.
    contended_at: AtomicU64,
    epoch: Instant,
    /// Per helper: parked (or about to park) and needing an unpark.
    sleeping: Vec<AtomicBool>,
}

pub struct SpinPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    turn: Mutex<()>,
}

impl SpinPool {
    /// A pool of `n` shares: the caller and `n - 1` helper threads.
    pub fn new(n: usize) -> std::io::Result<Self> {
        let helpers = n.max(1) - 1;
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            shares: AtomicUsize::new(0),
            open: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            contended_at: AtomicU64::new(0),
            epoch: Instant::now(),
            sleeping: (0..helpers).map(|_| AtomicBool::new(false)).collect(),
        });
        let mut threads = Vec::with_capacity(helpers);
        for h in 0..helpers {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("realm-spin-{}", h + 1))
                    .spawn(move || helper(&s, h))?,
            );
        }
        Ok(Self {
            shared,
            threads,
            turn: Mutex::new(()),
        })
    }

    /// A pool of one share, the caller's thread (no helpers to start, so it cannot fail;
    /// what WebAssembly without threads uses).
    pub fn single() -> Self {
        Self::new(1).unwrap_or_else(|_| unreachable!("one share starts no thread"))
    }

    /// Shares: the caller plus the helpers.
    pub fn size(&self) -> usize {
        self.threads.len() + 1
    }

    /// Run `f(share)` for every share `0..size()` at once (share 0 on the calling thread)
    /// and return when all are done.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        // No helpers, or a job started from inside a share of another (a round running
        // tenants' ops on every share): every share here, one after another.
        if self.threads.is_empty() || IN_JOB.with(std::cell::Cell::get) {
            for share in 0..self.size() {
                f(share);
            }
            return;
        }
        // Busy with another tenant's job: run every share here, one after another, rather
        // than wait — tenants then compute side by side on their own threads, and the
        // helpers serve whoever holds the turn. (A poisoned turn only means another caller
        // panicked; every job is waited for before `run` returns or unwinds.)
        let _turn = match self.turn.try_lock() {
            Ok(t) => t,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                let s = &self.shared;
                s.contended_at
                    .store(s.epoch.elapsed().as_micros() as u64 + 1, Ordering::Relaxed);
                for share in 0..self.size() {
                    f(share);
                }
                return;
            }
        };
        let s = &self.shared;
        // SAFETY: the pointer is only dereferenced by helpers that entered the job (counted
        // in `active`) while it was `open`; this function does not return (nor unwind: see
        // `Wait`) before closing it and seeing `active` at 0, so `f` outlives every use.
        let job: &'static Job =
            unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync + '_), &'static Job>(f) };
        let slot: *const &'static Job = &job;
        let size = self.size();
        s.job.store(slot.cast_mut(), Ordering::SeqCst);
        s.shares.store(size, Ordering::SeqCst);
        s.next.store(0, Ordering::SeqCst);
        s.done.store(0, Ordering::SeqCst);
        s.open.store(true, Ordering::SeqCst);
        s.generation.fetch_add(1, Ordering::SeqCst);
        for (h, t) in self.threads.iter().enumerate() {
            if s.sleeping[h].load(Ordering::Acquire) {
                t.thread().unpark();
            }
        }
        let wait = Wait(s);
        in_job(|| claim(s, f));
        // Every share is claimed; those helpers started end within microseconds.
        spin_until(|| s.done.load(Ordering::Acquire) >= size);
        drop(wait);
        if s.panicked.swap(false, Ordering::AcqRel) {
            panic!("a compute share panicked");
        }
    }
}

/// Runs shares of the current job until none is left unclaimed.
fn claim(s: &Shared, f: &(dyn Fn(usize) + Sync)) {
    let size = s.shares.load(Ordering::SeqCst);
    loop {
        let share = s.next.fetch_add(1, Ordering::SeqCst);
        if share >= size {
            return;
        }
        // A panicking share must still count as done, or `run` would wait forever.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(share))).is_err() {
            s.panicked.store(true, Ordering::Release);
        }
        s.done.fetch_add(1, Ordering::AcqRel);
    }
}

/// Busy-waits briefly, then yields: a thread descheduled on a busy machine must get the
/// core back.
fn spin_until(ready: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !ready() {
        spins = spins.saturating_add(1);
        if spins < 8192 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// Waits for the helpers on drop, so a panic in share 0 still leaves no helper running
/// a job whose closure is gone.
struct Wait<'a>(&'a Shared);

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        // No helper enters from here on; wait for those inside.
        self.0.open.store(false, Ordering::SeqCst);
        spin_until(|| self.0.active.load(Ordering::SeqCst) == 0);
    }
}

fn helper(s: &Shared, h: usize) {
    let mut seen = 0u64;
    loop {
        let started = Instant::now();
        let mut spins = 0u32;
        let generation = loop {
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                break g;
            }
            if s.stop.load(Ordering::Acquire) {
                return;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) {
                std::hint::spin_loop();
                continue;
            }
            let idle = started.elapsed();
            let since = s.epoch.elapsed().as_micros() as u64;
            let contended = since.saturating_sub(s.contended_at.load(Ordering::Relaxed))
                < CONTENDED_FOR.as_micros() as u64;
            if !contended && idle < SPIN_FOR {
                continue;
            }
            if !contended && idle < YIELD_FOR {
                std::thread::yield_now();
                continue;
            }
            s.sleeping[h].store(true, Ordering::Release);
            // Re-check after announcing sleep: a job published meanwhile is not missed
            // (and an unpark before `park` makes it return at once).
            if s.generation.load(Ordering::Acquire) == seen && !s.stop.load(Ordering::Acquire) {
                std::thread::park_timeout(Duration::from_millis(50));
            }
            s.sleeping[h].store(false, Ordering::Release);
        };
        seen = generation;
        // Enter, then check the job is still this one and open (the caller closes it, then
        // waits for `active` to drop to 0: with both sides SeqCst, either this helper sees
        // it closed or the caller sees this helper inside).
        s.active.fetch_add(1, Ordering::SeqCst);
        if s.open.load(Ordering::SeqCst) && s.generation.load(Ordering::SeqCst) == generation {
            let slot = s.job.load(Ordering::SeqCst);
            // SAFETY: the job is open and this helper is counted in `active`: `run` keeps
            // the closure alive until it has closed the job and seen `active` at 0.
            let job: &Job = unsafe { *slot };
            in_job(|| claim(s, job));
        }
        s.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for t in &self.threads {
            t.thread().unpark();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The `share`-th of `shares` near-equal parts of `0..n`, in units of `align`.
pub fn part(n: usize, shares: usize, share: usize, align: usize) -> std::ops::Range<usize> {
    let units = n.div_ceil(align);
    let per = units / shares;
    let extra = units % shares;
    let start = share * per + share.min(extra);
    let len = per + usize::from(share < extra);
    (start * align).min(n)..((start + len) * align).min(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    #[cfg_attr(target_arch = "wasm32", ignore = "wasm32-wasip2 has no threads")]
    fn every_share_runs_once_per_job() {
        let pool = SpinPool::new(3).expect("pool");
        let hits: Vec<AtomicU32> = (0..3).map(|_| AtomicU32::new(0)).collect();
        for _ in 0..2000 {
            pool.run(&|s| {
                hits[s].fetch_add(1, Ordering::Relaxed);
            });
        }
        for h in &hits {
            assert_eq!(h.load(Ordering::Relaxed), 2000);
        }
        // After parking (idle longer than the spin), jobs still run.
        std::thread::sleep(Duration::from_millis(5));
        pool.run(&|s| {
            hits[s].fetch_add(1, Ordering::Relaxed);
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 2001));
    }

    /// More shares than cores, and other threads busy: every share still runs exactly
    /// once per job, whichever thread claims it.
    #[test]
    #[cfg_attr(target_arch = "wasm32", ignore = "wasm32-wasip2 has no threads")]
    fn shares_are_claimed_once_each_when_helpers_are_late() {
        let pool = SpinPool::new(8).expect("pool");
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                });
            }
            let hits: Vec<AtomicU32> = (0..8).map(|_| AtomicU32::new(0)).collect();
            for _ in 0..500 {
                pool.run(&|s| {
                    hits[s].fetch_add(1, Ordering::Relaxed);
                });
            }
            stop.store(true, Ordering::Relaxed);
            for h in &hits {
                assert_eq!(h.load(Ordering::Relaxed), 500);
            }
        });
    }

    #[test]
    fn parts_cover_the_range_in_aligned_pieces() {
        for n in [0usize, 1, 7, 64, 576, 1001] {
            for shares in 1..5 {
                let mut next = 0;
                for s in 0..shares {
                    let r = part(n, shares, s, 4);
                    assert_eq!(r.start, next.min(n));
                    assert!(r.start.is_multiple_of(4) || r.start == n);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }
}
