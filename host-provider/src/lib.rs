//! Realm's host provider: runs the Realm guest component in wasmtime and serves its
//! `realm:compute` imports natively. The Rust API:
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use realm_host::{Engine, EngineConfig, Prompt, default_params};
//! let engine = Engine::new(EngineConfig::default())?;
//! let mut model = engine.load_model(&realm_host::default_model_path())?;
//! let mut session = model.session(0)?;
//! let mut generation = session.generate(Prompt::Text("Once upon a time".into()), default_params())?;
//! for piece in &mut generation {
//!     print!("{}", piece?.text);
//! }
//! # Ok(())
//! # }
//! ```

pub mod bindings;
pub mod compose;
pub mod compute;
pub mod inspect;
pub mod nn;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use wasmtime::component::{Component, Linker, ResourceAny};
use wasmtime::{ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use bindings::inference::Error as GuestError;
pub use bindings::inference::{
    Chunk, Constraint, Embedding, FinishReason, Message, ModelInfo, Params, Prompt, StepLogprobs,
    TokenLogprob, Usage,
};
use compute::{ComputeState, MappedModel};

/// File name of the default model (SmolLM2-135M-Instruct, Q4_1), fetched by `make models`.
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// File name of the built guest component.
pub const COMPONENT_FILE: &str = "realm_guest.wasm";
/// Most linear memory one guest may use.
pub const DEFAULT_GUEST_MEMORY: usize = 1 << 30;

/// Where the default model lives: `$REALM_MODEL`, else `models/` under the current
/// directory, else `models/` of the checkout the binary was built in.
pub fn default_model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("REALM_MODEL") {
        return PathBuf::from(p);
    }
    let local = Path::new("models").join(DEFAULT_MODEL);
    if local.exists() {
        return local;
    }
    match checkout_root().map(|root| root.join("models").join(DEFAULT_MODEL)) {
        Some(p) if p.exists() => p,
        _ => local,
    }
}

/// The repository a binary in `target/{profile}/` was built from.
fn checkout_root() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    // target/{release,debug}/realm, or target/{profile}/deps/<test> for tests.
    exe.ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "target"))
        .and_then(|t| t.parent())
        .map(Path::to_path_buf)
}

/// The guest component: `$REALM_COMPONENT`, else the release build in this checkout's
/// `target/`, else `realm_guest.wasm` beside the binary.
pub fn default_component_path() -> PathBuf {
    if let Some(p) = std::env::var_os("REALM_COMPONENT") {
        return PathBuf::from(p);
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    let candidates = [
        // <target>/release/realm → <target>/wasm32-wasip2/release (any CARGO_TARGET_DIR).
        exe_dir
            .as_ref()
            .and_then(|d| d.parent())
            .map(|t| t.join("wasm32-wasip2/release").join(COMPONENT_FILE)),
        // <target>/release/deps/<test binary>
        exe_dir
            .as_ref()
            .and_then(|d| d.parent()?.parent())
            .map(|t| t.join("wasm32-wasip2/release").join(COMPONENT_FILE)),
        checkout_root().map(|r| r.join("target/wasm32-wasip2/release").join(COMPONENT_FILE)),
        exe_dir.map(|d| d.join(COMPONENT_FILE)),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("target/wasm32-wasip2/release").join(COMPONENT_FILE))
}

/// How to build an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Compute threads (default: the machine's available parallelism).
    pub threads: usize,
    pub component: PathBuf,
    pub max_guest_memory: usize,
    /// Cap on resident weight bytes of the whole engine, every tenant and model together
    /// (None: the whole model may stay mapped in).
    pub max_resident: Option<u64>,
    /// Environment variables the guests see (WASI).
    pub guest_env: Vec<(String, String)>,
    /// The compute backend (`compute::DEVICES`): `cpu`.
    pub device: String,
    /// With a GPU device: only this many transformer blocks on it, the rest of the model
    /// on the CPU (partial offload; None: all of it on the device).
    pub gpu_layers: Option<usize>,
    /// Run the tenants' steps in rounds, every weight's matmuls of a round as one product
    /// (see `realm_kernels::batch`): for many concurrent tenants (`realm serve`).
    pub batch: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            component: default_component_path(),
            max_guest_memory: DEFAULT_GUEST_MEMORY,
            device: "cpu".into(),
            gpu_layers: None,
            max_resident: None,
            guest_env: Vec::new(),
            batch: false,
        }
    }
}

/// Per-Store host data: WASI, the compute provider, and the guest's limits.
pub struct HostState {
    wasi: WasiCtx,
    pub compute: ComputeState,
    limits: GuestLimits,
}

/// Caps the guest's linear memory and remembers the most it asked for.
struct GuestLimits {
    max_memory: usize,
    peak_memory: usize,
}

/// Why a tenant was stopped: it passed one of its limits. The tenant's Store is unusable
/// afterwards (drop it); other tenants are unaffected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("the request ran past its deadline of {0:?}")]
    Deadline(Duration),
    #[error("the guest asked for more than its memory limit of {0} bytes")]
    Memory(usize),
}

impl ResourceLimiter for GuestLimits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            // A trap with a typed cause, not a failed `memory.grow` the guest might
            // misreport: the host must tell "limit hit" from a guest bug.
            return Err(LimitError::Memory(self.max_memory).into());
        }
        self.peak_memory = self.peak_memory.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.compute.table,
        }
    }
}

type HasCompute = compute::HasCompute<realm_compute::Erased>;

/// How often the epoch advances: the granularity of request deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Cross-tenant batching since the engine started (see [`Engine::batched`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Batched {
    /// Rounds that ran the tenants' steps together.
    pub rounds: u64,
    /// Products that served more than one tenant, and the rows they multiplied.
    pub products: u64,
    pub rows: u64,
    /// Seconds in rounds, and the part of those in shared products.
    pub round_seconds: f64,
    pub product_seconds: f64,
}

/// A compiled, pre-linked guest component, the spinning compute pool and the model files
/// mapped so far. Share it (`Arc<Engine>`): every [`Model`] it loads is a tenant with its
/// own Store over the same mapped weights and the same threads.
pub struct Engine {
    engine: wasmtime::Engine,
    pre: bindings::GuestPre<HostState>,
    spin: Arc<compute::pool::SpinPool>,
    /// Where the tenants' steps meet (cross-tenant batching; None: off).
    batcher: Option<Arc<realm_kernels::batch::Batcher>>,
    config: EngineConfig,
    mapped: Mutex<HashMap<PathBuf, Arc<MappedModel>>>,
    /// The weight store of every tenant: one budget (`max_resident`) for the process.
    store: compute::residency::Shared,
    ticker_stop: Arc<AtomicBool>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// Turn a guest's typed error into a one-line message.
pub fn guest_error(e: GuestError) -> anyhow::Error {
    anyhow::Error::new(InferenceError::from(e))
}

/// A guest's `realm:inference` error, typed: it stays downcastable through `anyhow` and its
/// context, so that callers (the server's status codes) match on the kind, not the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InferenceError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid model: {0}")]
    InvalidModel(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("context overflow: {0}")]
    ContextOverflow(String),
    #[error("compute error: {0}")]
    Compute(String),
}

impl From<GuestError> for InferenceError {
    fn from(e: GuestError) -> Self {
        match e {
            GuestError::NotFound(m) => Self::NotFound(m),
            GuestError::InvalidModel(m) => Self::InvalidModel(m),
            GuestError::Unsupported(m) => Self::Unsupported(m),
            GuestError::InvalidInput(m) => Self::InvalidInput(m),
            GuestError::ContextOverflow(m) => Self::ContextOverflow(m),
            GuestError::Compute(m) => Self::Compute(m),
        }
    }
}

impl Engine {
    pub fn new(config: EngineConfig) -> anyhow::Result<Self> {
        let mut wc = wasmtime::Config::new();
        // Compiled code is cached on disk (wasmtime's cache directory): the first run
        // compiles the component, later ones load it.
        if let Ok(cache) = wasmtime::Cache::new(wasmtime::CacheConfig::new()) {
            wc.cache(Some(cache));
        }
        // Deadlines: guest code checks the engine's epoch, advanced by a ticker thread.
        wc.epoch_interruption(true);
        // REALM_PERFMAP=1: the guest's compiled functions named in /tmp/perf-<pid>.map, so
        // that `perf` profiles show where guest time goes.
        if std::env::var_os("REALM_PERFMAP").is_some_and(|v| v == "1") {
            wc.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = wasmtime::Engine::new(&wc)?;
        let path = &config.component;
        let bytes = std::fs::read(path).with_context(|| {
            format!(
                "cannot read the guest component {} (build it with `make build`)",
                path.display()
            )
        })?;
        let component = Component::new(&engine, &bytes)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("{} is not a valid component", path.display()))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        bindings::Guest::add_to_linker::<HostState, HasCompute>(&mut linker, |s| &mut s.compute)?;
        // Imports resolved once: each tenant's instantiation is then only its own memory.
        let pre = bindings::GuestPre::new(linker.instantiate_pre(&component)?)?;
        let spin = Arc::new(compute::pool::SpinPool::new(config.threads.max(1))?);
        let batcher = config
            .batch
            .then(|| Arc::new(realm_kernels::batch::Batcher::default()));
        // An unknown device is refused here, before any tenant starts.
        compute::backend(&config.device, config.gpu_layers, &spin, batcher.as_ref())
            .map_err(|e| anyhow!(e))?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (stop, ticking) = (ticker_stop.clone(), engine.clone());
        std::thread::Builder::new()
            .name("realm-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticking.increment_epoch();
                }
            })?;
        Ok(Self {
            engine,
            pre,
            spin,
            batcher,
            store: compute::residency::WeightStore::shared(config.max_resident),
            config,
            mapped: Mutex::new(HashMap::new()),
            ticker_stop,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The file at `path` mapped once per engine, whichever tenant asks first.
    fn mapping(&self, name: &str, path: &Path) -> anyhow::Result<Arc<MappedModel>> {
        let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        let mut mapped = self
            .mapped
            .lock()
            .map_err(|_| anyhow!("the model table is poisoned"))?;
        if let Some(m) = mapped.get(&key) {
            return Ok(m.clone());
        }
        let m = MappedModel::open(name, path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        mapped.insert(key, m.clone());
        Ok(m)
    }

    /// A fresh backend of the configured device for one tenant.
    fn backend(&self) -> anyhow::Result<realm_compute::Erased> {
        compute::backend(
            &self.config.device,
            self.config.gpu_layers,
            &self.spin,
            self.batcher.as_ref(),
        )
        .map_err(|e| anyhow!(e))
    }

    /// A compute provider (`realm:compute`) serving the model files `models` (name, path)
    /// on this engine's threads and mappings, for a component other than Realm's own guest
    /// to import (one that embeds the Realm component, composed with adapters).
    pub fn compute_state(&self, models: &[(String, PathBuf)]) -> anyhow::Result<ComputeState> {
        let mut mapped = HashMap::new();
        for (name, path) in models {
            mapped.insert(name.clone(), self.mapping(name, path)?);
        }
        Ok(ComputeState::sharing(
            mapped,
            self.backend()?,
            self.store.clone(),
        ))
    }

    /// Adds the `realm:compute` imports to `linker`, served by the state `get` returns
    /// (over any backend: `ComputeState<B>`).
    pub fn add_compute_to_linker<T: 'static, B: realm_compute::Backend>(
        linker: &mut Linker<T>,
        get: fn(&mut T) -> &mut ComputeState<B>,
    ) -> anyhow::Result<()> {
        bindings::Guest::add_to_linker::<T, compute::HasCompute<B>>(linker, get)?;
        Ok(())
    }

    /// Cross-tenant batching so far (zeros when it is off).
    pub fn batched(&self) -> Batched {
        self.batcher.as_ref().map_or(Batched::default(), |b| {
            let (products, rows) = b.shared();
            let (round_seconds, product_seconds) = b.seconds();
            Batched {
                rounds: b.rounds(),
                products,
                rows,
                round_seconds,
                product_seconds,
            }
        })
    }

    /// Map `path` and load it in a fresh guest instance.
    pub fn load_model(&self, path: &Path) -> anyhow::Result<Model> {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("model")
            .to_string();
        let mapped = self.mapping(&name, path)?;
        let models = HashMap::from([(name.clone(), mapped)]);
        let mut store = Store::new(
            &self.engine,
            HostState {
                wasi: wasmtime_wasi::WasiCtx::builder()
                    .inherit_stderr()
                    .envs(&self.config.guest_env)
                    .build(),
                compute: ComputeState::sharing(models, self.backend()?, self.store.clone()),
                limits: GuestLimits {
                    max_memory: self.config.max_guest_memory,
                    peak_memory: 0,
                },
            },
        );
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(NO_DEADLINE);
        store.epoch_deadline_trap();
        let guest = self.pre.instantiate(&mut store)?;
        let handle = guest
            .realm_inference_runtime()
            .model()
            .call_load(&mut store, &name)
            .map_err(limit_error)?
            .map_err(guest_error)?;
        let info = guest
            .realm_inference_runtime()
            .model()
            .call_info(&mut store, handle)
            .map_err(limit_error)?;
        Ok(Model {
            store,
            guest,
            handle,
            info,
            deadline: None,
            kept: None,
        })
    }
}

/// Epoch ticks that stand for "no deadline" (about 5 years at [`EPOCH_TICK`]).
const NO_DEADLINE: u64 = 1 << 34;

/// A trap caused by a tenant limit becomes that [`LimitError`] (downcastable); other
/// errors pass through.
fn limit_error(e: wasmtime::Error) -> anyhow::Error {
    if let Some(l) = e.downcast_ref::<LimitError>() {
        return anyhow::Error::new(l.clone());
    }
    if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return anyhow::Error::new(LimitError::Deadline(Duration::ZERO));
    }
    anyhow::Error::from(e).context("the guest trapped")
}

/// A tenant: a model loaded in its own guest instance (one wasmtime Store: its own linear
/// memory, KV caches and sampler state) over the engine's shared mapped weights.
pub struct Model {
    store: Store<HostState>,
    guest: bindings::Guest,
    handle: ResourceAny,
    pub info: ModelInfo,
    deadline: Option<(Instant, Duration)>,
    /// A finished conversation's session ([`Session::keep`]) and its context size: the
    /// next [`Model::session_reusing`] continues from the longest prefix it shares.
    kept: Option<(ResourceAny, u32)>,
}

impl Model {
    /// Run a guest call on this thread: each tenant computes on its own thread, its ops'
    /// parallel parts on the engine's spinning pool (tenants that find it busy run their
    /// shares themselves). Funnelling every tenant's guest calls through one pool of
    /// `--threads` workers instead held 16 concurrent requests to 0.6× the throughput.
    ///
    /// The tenant's deadline (if any) is armed first: guest code running past it traps.
    fn on_pool<R: Send>(
        &mut self,
        f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R> + Send,
    ) -> anyhow::Result<R> {
        if let Some((at, budget)) = self.deadline {
            let left = at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LimitError::Deadline(budget).into());
            }
            let ticks = left.as_nanos().div_ceil(EPOCH_TICK.as_nanos()) as u64;
            self.store.set_epoch_deadline(ticks);
        }
        let store = &mut self.store;
        f(store).map_err(|e| {
            match limit_error(e) {
                // Report the budget the caller set, not the remaining time.
                e if matches!(e.downcast_ref(), Some(LimitError::Deadline(_))) => {
                    LimitError::Deadline(self.deadline.map_or(Duration::ZERO, |d| d.1)).into()
                }
                e => e,
            }
        })
    }

    /// Stop this tenant's guest calls at `at` (a request's deadline counted from its
    /// arrival); `budget` is what errors report.
    pub fn set_deadline_at(&mut self, at: Instant, budget: Duration) {
        self.deadline = Some((at, budget));
    }

    /// Stop this tenant's guest calls `budget` from now (None: no deadline). Guest code
    /// that runs past it traps with [`LimitError::Deadline`].
    pub fn set_deadline(&mut self, budget: Option<Duration>) {
        self.deadline = budget.map(|b| (Instant::now() + b, b));
        if self.deadline.is_none() {
            self.store.set_epoch_deadline(NO_DEADLINE);
        }
    }

    pub fn tokenize(&mut self, text: &str, add_special: bool) -> anyhow::Result<Vec<u32>> {
        let g = self.guest.realm_inference_runtime();
        g.model()
            .call_tokenize(&mut self.store, self.handle, text, add_special)?
            .map_err(guest_error)
    }

    pub fn detokenize(&mut self, ids: &[u32]) -> anyhow::Result<String> {
        let g = self.guest.realm_inference_runtime();
        g.model()
            .call_detokenize(&mut self.store, self.handle, ids)?
            .map_err(guest_error)
    }

    pub fn apply_template(
        &mut self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> anyhow::Result<String> {
        let g = self.guest.realm_inference_runtime();
        g.model()
            .call_apply_template(
                &mut self.store,
                self.handle,
                messages,
                add_generation_prompt,
            )?
            .map_err(guest_error)
    }

    /// The embedding of `text`: mean-pooled final hidden states, unit length, and how
    /// many tokens the text was.
    pub fn embed(&mut self, text: &str) -> anyhow::Result<Embedding> {
        let g = self.guest.realm_inference_runtime().clone();
        let handle = self.handle;
        let embedding = self
            .on_pool(|store| g.model().call_embed(store, handle, text))?
            .map_err(guest_error);
        self.rest();
        embedding
    }

    /// A new session with `n_ctx` positions of KV cache (0: the default).
    pub fn session(&mut self, n_ctx: u32) -> anyhow::Result<Session<'_>> {
        let g = self.guest.realm_inference_runtime();
        let h = g
            .model()
            .call_session(&mut self.store, self.handle, n_ctx)?
            .map_err(guest_error)?;
        Ok(Session {
            model: self,
            handle: h,
            n_ctx,
            keep: false,
        })
    }

    /// A session for a new conversation that starts from the kept one's KV cache (see
    /// [`Session::keep`]), if it has the same context size, else a new session. Its
    /// output is the same as a new session's: the guest reuses only the positions whose
    /// tokens equal the new prompt's (a shared system prompt, say) and recomputes the
    /// rest. Only the time to the first token can tell that a prefix was reused.
    pub fn session_reusing(&mut self, n_ctx: u32) -> anyhow::Result<Session<'_>> {
        match self.kept.take() {
            Some((handle, n)) if n == n_ctx => Ok(Session {
                model: self,
                handle,
                n_ctx,
                keep: false,
            }),
            Some((handle, _)) => {
                let _ = handle.resource_drop(&mut self.store);
                self.session(n_ctx)
            }
            None => self.session(n_ctx),
        }
    }

    /// Whether this tenant computes on the very same mapping of the weights as `other`
    /// (tenants of one [`Engine`] do: one copy of a model, however many tenants).
    pub fn shares_weights_with(&self, other: &Model) -> bool {
        let theirs = &other.store.data().compute.models;
        self.store
            .data()
            .compute
            .models
            .values()
            .any(|m| theirs.values().any(|o| Arc::ptr_eq(m, o)))
    }

    /// The tenant has no step coming (a generation ended, an embedding is done): the
    /// engine's batched rounds stop waiting for it (it is waited for again from its next
    /// op). Called by `Generation`'s drop and `embed`.
    fn rest(&self) {
        self.store.data().compute.rest();
    }

    /// The most linear memory the guest has used, in bytes.
    pub fn guest_memory_peak(&self) -> usize {
        self.store.data().limits.peak_memory
    }

    /// Residency counters of the weight store (its engine's: every tenant's weights).
    pub fn store_stats(&self) -> compute::residency::StoreStats {
        self.store.data().compute.store_stats()
    }

    pub fn compute_stats(&self) -> compute::Stats {
        self.store.data().compute.stats.clone()
    }
}

/// One conversation: its own KV cache and token history.
pub struct Session<'m> {
    model: &'m mut Model,
    handle: ResourceAny,
    n_ctx: u32,
    /// Kept in the tenant when dropped, rather than freed.
    keep: bool,
}

impl Session<'_> {
    pub fn generate(&mut self, prompt: Prompt, params: Params) -> anyhow::Result<Generation<'_>> {
        let m = &mut *self.model;
        let g = m.guest.realm_inference_runtime().clone();
        let handle = self.handle;
        let h = m
            .on_pool(|store| g.session().call_generate(store, handle, &prompt, &params))?
            .map_err(guest_error)?;
        Ok(Generation {
            model: m,
            handle: h,
        })
    }

    /// Start generating from an OpenAI-style chat as JSON text (`messages` with every
    /// field, optional `tools`), rendered by the model's own template.
    pub fn generate_chat(&mut self, chat: &str, params: Params) -> anyhow::Result<Generation<'_>> {
        let m = &mut *self.model;
        let g = m.guest.realm_inference_runtime().clone();
        let handle = self.handle;
        let h = m
            .on_pool(|store| g.session().call_generate_chat(store, handle, chat, &params))?
            .map_err(guest_error)?;
        Ok(Generation {
            model: m,
            handle: h,
        })
    }

    pub fn model(&mut self) -> &mut Model {
        self.model
    }

    /// Ends the conversation but keeps its KV cache in the tenant, for the next
    /// [`Model::session_reusing`] (a server's next request on this tenant).
    pub fn keep(mut self) {
        self.keep = true;
    }
}

/// Guest resources are freed when their host handles go: a session's KV cache must not
/// outlive it in the tenant (a `ResourceAny` is not dropped by Rust's `Drop` alone),
/// unless it is kept for the next conversation.
impl Drop for Session<'_> {
    fn drop(&mut self) {
        if self.keep {
            if let Some((old, _)) = self.model.kept.replace((self.handle, self.n_ctx)) {
                let _ = old.resource_drop(&mut self.model.store);
            }
        } else {
            let _ = self.handle.resource_drop(&mut self.model.store);
        }
    }
}

/// A generation that ends has no step coming: the engine's batched rounds stop waiting
/// for this tenant.
impl Drop for Generation<'_> {
    fn drop(&mut self) {
        let _ = self.handle.resource_drop(&mut self.model.store);
        self.model.rest();
    }
}

/// A running generation: an iterator of text pieces.
pub struct Generation<'s> {
    model: &'s mut Model,
    handle: ResourceAny,
}

impl Generation<'_> {
    pub fn finish_reason(&mut self) -> anyhow::Result<Option<FinishReason>> {
        let g = self.model.guest.realm_inference_runtime();
        Ok(g.generation()
            .call_finish_reason(&mut self.model.store, self.handle)?)
    }

    pub fn usage(&mut self) -> anyhow::Result<Usage> {
        let g = self.model.guest.realm_inference_runtime();
        Ok(g.generation()
            .call_usage(&mut self.model.store, self.handle)?)
    }

    /// Every id generated so far, the end-of-generation token included.
    pub fn tokens(&mut self) -> anyhow::Result<Vec<u32>> {
        let g = self.model.guest.realm_inference_runtime();
        Ok(g.generation()
            .call_tokens(&mut self.model.store, self.handle)?)
    }

    /// Per generated id, the top-2 logit gap at that step.
    pub fn margins(&mut self) -> anyhow::Result<Vec<f32>> {
        let g = self.model.guest.realm_inference_runtime();
        Ok(g.generation()
            .call_margins(&mut self.model.store, self.handle)?)
    }

    /// Record, from the next token on, each token's log-probability and the `top` most
    /// likely tokens at its step (at most 20).
    pub fn want_logprobs(&mut self, top: u32) -> anyhow::Result<()> {
        let g = self.model.guest.realm_inference_runtime();
        Ok(g.generation()
            .call_want_logprobs(&mut self.model.store, self.handle, top)?)
    }

    /// Constrain the text generated from the next token on to a match of `c` (a GBNF
    /// grammar, a JSON Schema, or any JSON object).
    pub fn constrain(&mut self, c: Constraint) -> anyhow::Result<()> {
        let g = self.model.guest.realm_inference_runtime();
        g.generation()
            .call_constrain(&mut self.model.store, self.handle, &c)?
            .map_err(guest_error)
    }

    /// The steps recorded since the last call, oldest first.
    pub fn take_logprobs(&mut self) -> anyhow::Result<Vec<StepLogprobs>> {
        let g = self.model.guest.realm_inference_runtime();
        Ok(g.generation()
            .call_take_logprobs(&mut self.model.store, self.handle)?)
    }

    pub fn model(&mut self) -> &mut Model {
        self.model
    }
}

/// `eog`, `stop` or `length`.
pub fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eog => "eog",
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

impl Iterator for Generation<'_> {
    type Item = anyhow::Result<Chunk>;

    fn next(&mut self) -> Option<Self::Item> {
        let g = self.model.guest.realm_inference_runtime().clone();
        let handle = self.handle;
        match self
            .model
            .on_pool(|store| g.generation().call_next(store, handle))
        {
            Ok(Ok(Some(chunk))) => Some(Ok(chunk)),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => Some(Err(guest_error(e))),
            Err(e) => Some(Err(e)),
        }
    }
}

/// [`realm_model::Params::neutral`] as the WIT record: the base that OpenAI-style and
/// benchmark parameters are built on (`Params { temperature, .., ..neutral_params() }`).
pub fn neutral_params() -> Params {
    wit_params(realm_model::Params::neutral())
}

/// The CLI's and the API's sampling defaults ([`realm_model::Params::default`]: llama.cpp's).
pub fn default_params() -> Params {
    wit_params(realm_model::Params::default())
}

/// `realm-model`'s parameters (where their defaults live) as the WIT record.
pub fn wit_params(p: realm_model::Params) -> Params {
    Params {
        max_tokens: p.max_tokens,
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        min_p: p.min_p,
        repeat_penalty: p.repeat_penalty,
        repeat_last_n: p.repeat_last_n,
        seed: p.seed,
        stop: p.stop,
        ignore_eog: p.ignore_eog,
    }
}
