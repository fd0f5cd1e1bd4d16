//! `realm run-wasm`: runs a WASI command component whose `wasi:nn` imports are served by
//! Realm (the `realm-wasi-nn` backend over this crate's [`Engine`]), as
//! `wasmedge --nn-preload` runs LlamaEdge apps.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, anyhow};
use realm_wasi_nn::{Completion, Models, Options, Preload, Tenants};
use wasmtime::Store;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_nn::wit::{WasiNnCtx, WasiNnView};

use crate::{Engine, Model, Params, Prompt};

/// Realm's engine as the wasi-nn backend's model provider.
struct EngineModels(Arc<Engine>);

impl Models for EngineModels {
    fn open(&self, path: &Path) -> anyhow::Result<Tenants> {
        // The first tenant is loaded now, so that a bad file fails at load time; it serves
        // the first execution context, and each later one gets a fresh tenant.
        let first = self.0.load_model(path)?;
        let (engine, path) = (self.0.clone(), path.to_path_buf());
        let spare = Mutex::new(Some(first));
        Ok(Arc::new(move || {
            let ready = spare.lock().ok().and_then(|mut s| s.take());
            let model = match ready {
                Some(m) => m,
                None => engine.load_model(&path)?,
            };
            Ok(Box::new(Tenant(model)) as Box<dyn Completion>)
        }))
    }
}

/// One execution context's tenant.
struct Tenant(Model);

impl Completion for Tenant {
    fn complete(&mut self, prompt: &str, o: &Options) -> anyhow::Result<String> {
        // LlamaEdge's defaults where the metadata says nothing.
        let params = Params {
            max_tokens: o.n_predict.unwrap_or(1024),
            temperature: o.temp.unwrap_or(0.8),
            top_p: o.top_p.unwrap_or(0.95),
            ..crate::default_params()
        };
        let mut session = self.0.session(o.ctx_size.unwrap_or(0))?;
        let generation = session.generate(Prompt::Text(prompt.to_string()), params)?;
        let mut text = String::new();
        for chunk in generation {
            text.push_str(&chunk?.text);
        }
        Ok(text)
    }
}

/// What `run-wasm` runs: the app, its arguments, the wasi-nn preloads, the models served
/// to `realm:compute` (name, GGUF path) and the host directories it may read.
pub struct RunWasm {
    pub app: PathBuf,
    pub args: Vec<String>,
    pub preloads: Vec<Preload>,
    pub models: Vec<(String, PathBuf)>,
    pub dirs: Vec<PathBuf>,
}

/// The app's Store data: WASI, wasi-nn, and `realm:compute` for apps that embed the Realm
/// component.
struct AppState {
    wasi: WasiCtx,
    table: ResourceTable,
    nn: WasiNnCtx,
    compute: crate::compute::ComputeState,
}

impl WasiView for AppState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Runs `run.app`'s `wasi:cli/run` with stdio inherited; `Ok(false)` if it exited with a
/// failure status. The app may import WASI, `wasi:nn` and `realm:compute`.
pub fn run_wasm(engine: Arc<Engine>, run: RunWasm) -> anyhow::Result<bool> {
    let compute = engine.compute_state(&run.models)?;
    let models: Arc<dyn Models> = Arc::new(EngineModels(engine));
    let registry = realm_wasi_nn::preload(&models, &run.preloads)?;
    let backends = realm_wasi_nn::backends(models);
    let mut config = wasmtime::Config::new();
    // An app that embeds the Realm component is compiled once, then loaded from the cache.
    if let Ok(cache) = wasmtime::Cache::new(wasmtime::CacheConfig::new()) {
        config.cache(Some(cache));
    }
    let wt = wasmtime::Engine::new(&config)?;
    let component = Component::from_file(&wt, &run.app)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("cannot load the component {}", run.app.display()))?;
    let mut linker = Linker::new(&wt);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    wasmtime_wasi_nn::wit::add_to_linker(&mut linker, |s: &mut AppState| {
        WasiNnView::new(&mut s.table, &mut s.nn)
    })?;
    Engine::add_compute_to_linker(&mut linker, |s: &mut AppState| &mut s.compute)?;
    let name = run.app.display().to_string();
    let mut wasi = WasiCtx::builder();
    wasi.inherit_stdio().args(&[name]).args(&run.args);
    for dir in &run.dirs {
        let guest = dir.to_string_lossy();
        wasi.preopened_dir(dir, &guest, FsPerms::ReadOnly)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("cannot open the directory {}", dir.display()))?;
    }
    let mut store = Store::new(
        &wt,
        AppState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            nn: WasiNnCtx::new(backends, registry),
            compute,
        },
    );
    let command =
        wasmtime_wasi::p2::bindings::sync::Command::instantiate(&mut store, &component, &linker)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                format!(
                    "{} is not a WASI command component that imports only WASI and wasi:nn",
                    run.app.display()
                )
            })?;
    match command.wasi_cli_run().call_run(&mut store) {
        Ok(status) => Ok(status.is_ok()),
        // `exit(n)` from the app.
        Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
            Some(exit) => Ok(exit.0 == 0),
            None => Err(anyhow!("the app trapped: {e:?}")),
        },
    }
}
