//! The weight store: which weights are resident in memory, under a budget.
//!
//! Weights stay in the memory-mapped file (u64 offsets: files far beyond 4 GiB work behind
//! a 32-bit guest). A weight becomes resident when an op first touches it since it was last
//! released; when the resident bytes would pass the budget, the least recently used weights
//! are released (`madvise(MADV_DONTNEED)`: their pages leave the process and are read
//! again on the next touch). While one weight is used, the one that followed it last time
//! is prefetched (`MADV_WILLNEED`, which the kernel reads ahead asynchronously), so the
//! order a forward pass uses is learned, not configured. A guest may also hint with
//! `realm:compute/store.prefetch`.
//!
//! One store serves every tenant of an engine ([`Shared`]): a weight is one unit however
//! many tenants use it, and the budget (`--max-resident`) bounds the whole process. Each
//! tenant learns the order from its own touches ([`Order`]), so tenants that interleave do
//! not scramble it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The store of an engine, shared by its tenants.
pub type Shared = Arc<Mutex<WeightStore>>;

/// A tenant's place in the learned order: the unit it touched last.
#[derive(Debug, Default, Clone, Copy)]
pub struct Order(Option<usize>);

use super::MappedModel;

/// One managed weight: a byte range of a mapped file.
#[derive(Debug)]
struct Unit {
    model: Arc<MappedModel>,
    offset: usize,
    len: usize,
    resident: bool,
    prefetched: bool,
    last_use: u64,
    /// The unit touched right after this one last time (the learned order).
    next: Option<usize>,
}

/// Counters reported by `realm run --json` and `realm bench`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    pub resident_bytes: u64,
    pub peak_resident_bytes: u64,
    pub loads: u64,
    pub evictions: u64,
    pub prefetches: u64,
    pub prefetch_hits: u64,
}

#[derive(Debug, Default)]
pub struct WeightStore {
    units: Vec<Unit>,
    /// Units by (mapping, offset, length): registered once for every tenant.
    index: HashMap<(usize, usize, usize), usize>,
    budget: Option<u64>,
    clock: u64,
    pub stats: StoreStats,
}

impl WeightStore {
    pub fn new(budget: Option<u64>) -> Self {
        Self {
            budget,
            ..Self::default()
        }
    }

    /// A store for an engine's tenants to share.
    pub fn shared(budget: Option<u64>) -> Shared {
        Arc::new(Mutex::new(Self::new(budget)))
    }

    /// Register a weight (again, for another tenant: the same unit); returns its unit id.
    /// Nothing is read yet.
    pub fn register(&mut self, model: Arc<MappedModel>, offset: usize, len: usize) -> usize {
        let key = (Arc::as_ptr(&model) as usize, offset, len);
        if let Some(&unit) = self.index.get(&key) {
            return unit;
        }
        self.index.insert(key, self.units.len());
        self.units.push(Unit {
            model,
            offset,
            len,
            resident: false,
            prefetched: false,
            last_use: 0,
            next: None,
        });
        self.units.len() - 1
    }

    pub fn budget(&self) -> Option<u64> {
        self.budget
    }

    /// Change the budget (`None`: unlimited), releasing weights at once if it shrank.
    pub fn set_budget(&mut self, budget: Option<u64>) {
        self.budget = budget;
        self.evict_to_fit(0, None);
    }

    /// An op of the tenant at `order` is about to read `unit`: make it resident, account
    /// for it, prefetch its successor.
    pub fn touch(&mut self, unit: usize, order: &mut Order) {
        if unit >= self.units.len() {
            return;
        }
        self.clock += 1;
        let u = &self.units[unit];
        if !u.resident {
            self.load(unit, false);
        } else if u.prefetched {
            self.stats.prefetch_hits += 1;
            self.units[unit].prefetched = false;
        }
        self.units[unit].last_use = self.clock;
        if let Some(prev) = order.0.replace(unit)
            && prev != unit
            && let Some(p) = self.units.get_mut(prev)
        {
            p.next = Some(unit);
        }
        if let Some(next) = self.units[unit].next {
            self.prefetch(next);
        }
    }

    /// Start reading `unit` ahead of use (the kernel reads asynchronously). It counts
    /// against the budget like any resident weight, so prefetch never passes it.
    pub fn prefetch(&mut self, unit: usize) {
        match self.units.get(unit) {
            Some(u) if !u.resident => {
                self.load(unit, true);
                self.stats.prefetches += 1;
            }
            _ => {}
        }
    }

    fn load(&mut self, unit: usize, ahead: bool) {
        let len = self.units[unit].len as u64;
        self.evict_to_fit(len, Some(unit));
        let u = &mut self.units[unit];
        if ahead {
            let _ = u
                .model
                .map
                .advise_range(memmap2::Advice::WillNeed, u.offset, u.len);
        }
        u.resident = true;
        u.prefetched = ahead;
        u.last_use = self.clock;
        self.stats.loads += 1;
        self.stats.resident_bytes += len;
        self.stats.peak_resident_bytes = self
            .stats
            .peak_resident_bytes
            .max(self.stats.resident_bytes);
        tracing::debug!(target: "realm::store", unit, bytes = len, resident = self.stats.resident_bytes, ahead, "load");
    }

    /// Release least recently used units until `incoming` more bytes fit the budget.
    fn evict_to_fit(&mut self, incoming: u64, keep: Option<usize>) {
        let Some(budget) = self.budget else { return };
        while self.stats.resident_bytes + incoming > budget {
            let victim = self
                .units
                .iter()
                .enumerate()
                .filter(|&(i, u)| u.resident && Some(i) != keep)
                .min_by_key(|(_, u)| u.last_use)
                .map(|(i, _)| i);
            let Some(v) = victim else { break };
            let u = &mut self.units[v];
            // SAFETY: the map is private and read-only: dropping its pages loses nothing,
            // and the next read faults them back in from the file. No reference into these
            // pages outlives the op that made it (ops run one at a time per Store).
            let _ = unsafe {
                u.model.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    u.offset,
                    u.len,
                )
            };
            u.resident = false;
            self.stats.resident_bytes -= u.len as u64;
            self.stats.evictions += 1;
            tracing::debug!(target: "realm::store", unit = v, bytes = u.len, resident = self.stats.resident_bytes, "evict");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Arc<MappedModel> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("realm-store-{}-{n}", std::process::id()));
        std::fs::write(&path, vec![7u8; 1 << 16]).expect("write");
        let m = MappedModel::open("t", &path).expect("map");
        let _ = std::fs::remove_file(&path);
        m
    }

    #[test]
    fn lru_keeps_the_budget_and_learns_the_order() {
        let m = model();
        let mut s = WeightStore::new(Some(3 * 4096));
        let mut order = Order::default();
        let units: Vec<usize> = (0..6)
            .map(|i| s.register(m.clone(), i * 4096, 4096))
            .collect();
        for _ in 0..3 {
            for &u in &units {
                s.touch(u, &mut order);
                assert!(s.stats.resident_bytes <= 3 * 4096);
            }
        }
        assert_eq!(s.stats.peak_resident_bytes, 3 * 4096);
        assert!(s.stats.evictions >= 15, "{:?}", s.stats);
        // After the first pass every unit knows its successor.
        assert!(s.units.iter().take(5).all(|u| u.next.is_some()));
    }

    #[test]
    fn unlimited_budget_loads_each_weight_once() {
        let m = model();
        let mut s = WeightStore::new(None);
        let mut order = Order::default();
        let units: Vec<usize> = (0..6)
            .map(|i| s.register(m.clone(), i * 4096, 4096))
            .collect();
        for _ in 0..3 {
            for &u in &units {
                s.touch(u, &mut order);
            }
        }
        assert_eq!((s.stats.loads, s.stats.evictions), (6, 0));
        // Shrinking the budget releases at once.
        s.set_budget(Some(8192));
        assert_eq!(s.stats.resident_bytes, 8192);
    }
}
