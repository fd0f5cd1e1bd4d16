//! `REALM_CUDA_TRACE=1`: where a tenant's steps spend their time, printed to stderr when
//! its backend is dropped (a session's end). A step runs from its first queued op to the
//! guest's read of its result: the host queues it (the guest's WIT calls, sent in parts),
//! waits for the GPU, and copies the row back. CUDA events around the step's launches give
//! the GPU's span, from the first part's arrival to the last kernel's end: where it is
//! close to the kernels' own time (`bench/gpu.sh profile`), the GPU ran without gaps; where
//! the step is much longer than the span, the host was the limit.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaEvent, CudaStream, sys};

/// One read step's times, in microseconds.
#[derive(Clone, Copy, Default)]
struct Step {
    /// First op queued -> first part sent.
    first_part: f64,
    /// First op queued -> the read began (every part sent).
    queued: f64,
    /// Waiting for the GPU after the last part was sent (and for the row's copy into
    /// page-locked memory).
    wait: f64,
    /// Copying the row into the vector handed to the guest.
    copy: f64,
    /// The GPU's span: first part's arrival -> last kernel's end.
    gpu: f64,
    /// First op queued -> the row back.
    step: f64,
}

/// One of a step's times.
type Field = fn(&Step) -> f64;

pub(crate) struct Tracer {
    start: CudaEvent,
    end: CudaEvent,
    began: Cell<Option<Instant>>,
    first_sent: Cell<Option<Instant>>,
    read_began: Cell<Option<Instant>>,
    synced: Cell<Option<Instant>>,
    steps: RefCell<Vec<Step>>,
}

impl Tracer {
    /// A tracer when `REALM_CUDA_TRACE=1` (and its events can be made).
    pub(crate) fn from_env(ctx: &Arc<CudaContext>) -> Option<Self> {
        if std::env::var("REALM_CUDA_TRACE").ok()? != "1" {
            return None;
        }
        let timed = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        Some(Self {
            start: ctx.new_event(timed).ok()?,
            end: ctx.new_event(timed).ok()?,
            began: Cell::new(None),
            first_sent: Cell::new(None),
            read_began: Cell::new(None),
            synced: Cell::new(None),
            steps: RefCell::default(),
        })
    }

    /// An op was queued.
    pub(crate) fn queued(&self) {
        if self.began.get().is_none() {
            self.began.set(Some(Instant::now()));
        }
    }

    /// A part is about to be sent on `stream`: the step's first marks the GPU's start.
    pub(crate) fn sending(&self, stream: &CudaStream) {
        if self.first_sent.get().is_none() {
            self.first_sent.set(Some(Instant::now()));
            let _ = self.start.record(stream);
        }
    }

    /// The guest reads a row: everything is sent; the end event follows the launches.
    pub(crate) fn reading(&self, stream: &CudaStream) {
        self.read_began.set(Some(Instant::now()));
        let _ = self.end.record(stream);
    }

    /// The GPU has finished the step (the host waited for it).
    pub(crate) fn synced(&self) {
        self.synced.set(Some(Instant::now()));
    }

    /// The row is back: the step is recorded, the next one starts with its first op.
    pub(crate) fn read(&self) {
        let now = Instant::now();
        // Without a separate wait (no page-locked buffer) the copy's time is the wait's.
        let synced = self.synced.take().unwrap_or(now);
        let (Some(began), Some(sent), Some(read)) = (
            self.began.take(),
            self.first_sent.take(),
            self.read_began.take(),
        ) else {
            return;
        };
        let us = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e6;
        let gpu = self
            .start
            .elapsed_ms(&self.end)
            .map_or(f64::NAN, |ms| f64::from(ms) * 1e3);
        self.steps.borrow_mut().push(Step {
            first_part: us(began, sent),
            queued: us(began, read),
            wait: us(read, synced),
            copy: us(synced, now),
            gpu,
            step: us(began, now),
        });
    }

    /// The session's summary: medians (and the slowest tenth's start) of each time.
    pub(crate) fn report(&self, graphs: (u64, u64)) {
        let steps = self.steps.borrow();
        if steps.is_empty() {
            return;
        }
        let pick = |f: Field| {
            let mut v: Vec<f64> = steps.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            (v[v.len() / 2], v[v.len() * 9 / 10])
        };
        let cols: [(&str, Field); 6] = [
            ("first part sent", |s| s.first_part),
            ("all queued", |s| s.queued),
            ("waiting", |s| s.wait),
            ("copy back", |s| s.copy),
            ("GPU span", |s| s.gpu),
            ("step", |s| s.step),
        ];
        let fields: Vec<String> = cols
            .iter()
            .map(|(name, f)| {
                let (med, p90) = pick(*f);
                format!("{name} {med:.0} ({p90:.0})")
            })
            .collect();
        eprintln!(
            "realm-cuda trace: {} steps, graphs replayed/captured so far {}/{}; µs median (90th percentile): {}",
            steps.len(),
            graphs.0,
            graphs.1,
            fields.join(" · ")
        );
    }
}
