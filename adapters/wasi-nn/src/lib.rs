//! A wasi-nn backend for GGUF language models, run by Realm.
//!
//! This crate implements `wasmtime-wasi-nn`'s public backend traits ([`BackendInner`],
//! [`BackendGraph`], [`BackendExecutionContext`]) for the `ggml` graph encoding (and
//! `autodetect`, which accepts a builder that starts with the GGUF magic). It speaks the
//! tensor conventions that LlamaEdge apps use with WasmEdge's GGML plugin:
//!
//! - input tensor 0 (or one named `prompt`): the prompt as UTF-8 bytes (`u8`);
//! - input tensor 1 (or one named `metadata`), optional: a JSON object of options,
//!   `n-predict`, `temp`, `top-p`, `ctx-size` and `stream` (see [`Options`]);
//! - `compute`, then output tensor 0 (named `output`): the generated text as UTF-8 bytes.
//!
//! The model itself is behind the [`Models`] trait, which the Realm host provider
//! implements with its engine (each execution context is one isolated tenant over the
//! shared mapped weights). Bad tensors, metadata or prompts come back as wasi-nn errors
//! with a message, never as traps.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, anyhow, bail};
use serde::Deserialize;
use wasmtime_wasi_nn::backend::{
    BackendError, BackendExecutionContext, BackendFromDir, BackendGraph, BackendInner, Id,
    NamedTensor,
};
use wasmtime_wasi_nn::wit::{ExecutionTarget, GraphEncoding, TensorType};
use wasmtime_wasi_nn::{Backend, ExecutionContext, Graph, GraphRegistry, Registry, Tensor};

/// Generation options from the metadata tensor (LlamaEdge's names). Unknown keys are
/// rejected, so a misspelt option is an error rather than silently ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Options {
    /// Tokens to generate at most (default: the provider's).
    pub n_predict: Option<u32>,
    /// Sampling temperature; 0 is greedy.
    pub temp: Option<f32>,
    pub top_p: Option<f32>,
    /// The context window, prompt and output together.
    pub ctx_size: Option<u32>,
    /// Accepted for compatibility: this wasi-nn version has no per-token call
    /// (`compute-single`), so the whole text comes back from `compute` either way.
    pub stream: Option<bool>,
}

impl Options {
    /// Parses and checks a metadata tensor's bytes.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Self> {
        let o: Options = serde_json::from_slice(bytes).context("invalid metadata JSON")?;
        if let Some(t) = o.temp
            && !(t.is_finite() && t >= 0.0)
        {
            bail!("metadata: `temp` must be a finite number >= 0, not {t}");
        }
        if let Some(p) = o.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            bail!("metadata: `top-p` must be in (0, 1], not {p}");
        }
        if o.ctx_size == Some(0) {
            bail!("metadata: `ctx-size` must be positive");
        }
        Ok(o)
    }
}

/// One execution context's model: an isolated tenant that completes prompts.
pub trait Completion: Send {
    /// The text generated for `prompt` (used as is: no chat template is applied).
    fn complete(&mut self, prompt: &str, options: &Options) -> anyhow::Result<String>;
}

/// Makes a fresh [`Completion`] per execution context.
pub type Tenants = Arc<dyn Fn() -> anyhow::Result<Box<dyn Completion>> + Send + Sync>;

/// What provides the models: Realm's engine, in the host provider.
pub trait Models: Send + Sync + 'static {
    /// Opens the GGUF file at `path` (checked and mapped once) and returns the factory of
    /// its tenants.
    fn open(&self, path: &Path) -> anyhow::Result<Tenants>;
}

/// The backend for the `ggml` (or `autodetect`) encoding.
pub struct GgmlBackend {
    models: Arc<dyn Models>,
    encoding: GraphEncoding,
}

impl GgmlBackend {
    pub fn new(models: Arc<dyn Models>, encoding: GraphEncoding) -> Self {
        GgmlBackend { models, encoding }
    }
}

/// Backends for both encodings that mean "a GGUF file" here.
pub fn backends(models: Arc<dyn Models>) -> Vec<Backend> {
    vec![
        Backend::from(GgmlBackend::new(models.clone(), GraphEncoding::Ggml)),
        Backend::from(GgmlBackend::new(models, GraphEncoding::Autodetect)),
    ]
}

/// A failure as wasmtime-wasi-nn reports it: the app gets a `runtime-error` whose data is
/// the crate's fixed text for this variant, so the reason is also logged (`tracing`, at
/// error level) for whoever runs the app, as WasmEdge's plugin logs its own.
fn backend_error(e: anyhow::Error) -> BackendError {
    tracing::error!("wasi-nn (Realm): {e:#}");
    BackendError::BackendAccess(wasmtime::Error::msg(format!("{e:#}")))
}

/// GGUF files start with these four bytes.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";

impl BackendInner for GgmlBackend {
    fn encoding(&self) -> GraphEncoding {
        self.encoding
    }

    /// One builder: the bytes of a GGUF file. They are written to a temporary file that is
    /// mapped like any model file and removed with the graph.
    fn load(&mut self, builders: &[&[u8]], target: ExecutionTarget) -> Result<Graph, BackendError> {
        let run = || -> anyhow::Result<Graph> {
            check_target(target)?;
            let [gguf] = builders else {
                bail!(
                    "expected one graph builder (the GGUF file's bytes), got {}",
                    builders.len()
                );
            };
            if !gguf.starts_with(GGUF_MAGIC) {
                bail!("the graph builder is not a GGUF file (no `GGUF` magic)");
            }
            let file = TempFile(temp_model_path());
            std::fs::File::create_new(&file.0)
                .and_then(|mut f| f.write_all(gguf))
                .with_context(|| format!("cannot write {}", file.0.display()))?;
            let tenants = self.models.open(&file.0)?;
            Ok(RealmGraph(tenants, Some(file)).into_graph())
        };
        run().map_err(backend_error)
    }

    fn as_dir_loadable(&mut self) -> Option<&mut dyn BackendFromDir> {
        Some(self)
    }
}

impl BackendFromDir for GgmlBackend {
    /// A GGUF file, or a directory holding exactly one.
    fn load_from_dir(
        &mut self,
        path: &Path,
        target: ExecutionTarget,
    ) -> Result<Graph, BackendError> {
        let run = || -> anyhow::Result<Graph> {
            check_target(target)?;
            let file = gguf_in(path)?;
            Ok(RealmGraph(self.models.open(&file)?, None).into_graph())
        };
        run().map_err(backend_error)
    }
}

fn check_target(target: ExecutionTarget) -> anyhow::Result<()> {
    match target {
        ExecutionTarget::Cpu => Ok(()),
        t => bail!("execution target {t:?} is not supported (Realm runs on the CPU)"),
    }
}

/// `path` itself if it is a file, else the only `.gguf` file in the directory.
fn gguf_in(path: &Path) -> anyhow::Result<PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let mut found = std::fs::read_dir(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        });
    match (found.next(), found.next()) {
        (Some(f), None) => Ok(f),
        (None, _) => bail!("no .gguf file in {}", path.display()),
        (Some(_), Some(_)) => bail!("more than one .gguf file in {}", path.display()),
    }
}

fn temp_model_path() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("realm-wasi-nn-{}-{n}.gguf", std::process::id()))
}

/// A file removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A loaded model: every execution context is a fresh tenant. A model loaded from bytes
/// keeps its temporary file while the graph lives.
struct RealmGraph(
    Tenants,
    #[allow(dead_code, reason = "held for its Drop")] Option<TempFile>,
);

impl RealmGraph {
    fn into_graph(self) -> Graph {
        Graph::from(Box::new(self) as Box<dyn BackendGraph>)
    }
}

impl BackendGraph for RealmGraph {
    fn init_execution_context(&self) -> Result<ExecutionContext, BackendError> {
        let tenant = (self.0)().map_err(backend_error)?;
        let ctx = RealmContext {
            tenant: Mutex::new(tenant),
            prompt: None,
            metadata: None,
            output: None,
        };
        Ok(ExecutionContext::from(
            Box::new(ctx) as Box<dyn BackendExecutionContext>
        ))
    }
}

/// One execution context: its tenant, and the tensors set through the index-based calls.
struct RealmContext {
    tenant: Mutex<Box<dyn Completion>>,
    prompt: Option<Tensor>,
    metadata: Option<Tensor>,
    output: Option<Tensor>,
}

/// Which input a tensor is: by name (`prompt`, `metadata`) or by position (0, 1).
fn input_slot(id: &Id) -> anyhow::Result<usize> {
    match id {
        Id::Index(i @ (0 | 1)) => Ok(*i as usize),
        Id::Name(n) if n == "prompt" || n == "0" => Ok(0),
        Id::Name(n) if n == "metadata" || n == "1" => Ok(1),
        Id::Index(i) => bail!("input {i} does not exist: 0 is the prompt, 1 the metadata"),
        Id::Name(n) => bail!("input `{n}` does not exist: use `prompt` and `metadata`"),
    }
}

/// A `u8` tensor's bytes, or an error naming what it is for.
fn bytes_of<'t>(t: &'t Tensor, what: &str) -> anyhow::Result<&'t [u8]> {
    if t.ty != TensorType::U8 {
        bail!(
            "the {what} tensor must be of type u8 (UTF-8 bytes), not {:?}",
            t.ty
        );
    }
    let n: u64 = t.dimensions.iter().map(|&d| u64::from(d)).product();
    if n != t.data.len() as u64 {
        bail!(
            "the {what} tensor's dimensions {:?} do not match its {} bytes",
            t.dimensions,
            t.data.len()
        );
    }
    Ok(&t.data)
}

impl RealmContext {
    fn run(&mut self) -> Result<Tensor, BackendError> {
        for (t, what) in [(&self.prompt, "prompt"), (&self.metadata, "metadata")] {
            if let Some(t) = t
                && t.ty != TensorType::U8
            {
                // The one variant whose text the app sees in full.
                let msg = format!(
                    "the {what} tensor must be of type u8 (UTF-8 bytes), not {:?}",
                    t.ty
                );
                tracing::error!("wasi-nn (Realm): {msg}");
                return Err(BackendError::UnsupportedTensorType(msg));
            }
        }
        self.generate().map_err(backend_error)
    }

    fn generate(&mut self) -> anyhow::Result<Tensor> {
        let prompt = self.prompt.as_ref().ok_or_else(|| {
            anyhow!("no prompt: set input tensor 0 (u8, the prompt's UTF-8 bytes)")
        })?;
        let prompt = std::str::from_utf8(bytes_of(prompt, "prompt")?)
            .map_err(|e| anyhow!("the prompt is not UTF-8: {e}"))?;
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        let options = match &self.metadata {
            Some(m) => Options::parse(bytes_of(m, "metadata")?)?,
            None => Options::default(),
        };
        let mut tenant = self
            .tenant
            .lock()
            .map_err(|_| anyhow!("this execution context failed earlier; create a new one"))?;
        let text = tenant.complete(prompt, &options)?;
        let len = u32::try_from(text.len()).context("output too large")?;
        Ok(Tensor::new(vec![len], TensorType::U8, text.into_bytes()))
    }
}

impl BackendExecutionContext for RealmContext {
    fn set_input(&mut self, id: Id, tensor: &Tensor) -> Result<(), BackendError> {
        let slot = input_slot(&id).map_err(backend_error)?;
        let t = Some(tensor.clone());
        if slot == 0 {
            self.prompt = t;
        } else {
            self.metadata = t;
        }
        Ok(())
    }

    fn get_output(&mut self, id: Id) -> Result<Tensor, BackendError> {
        match id {
            Id::Index(0) => {}
            Id::Name(n) if n == "output" || n == "0" => {}
            id => {
                return Err(backend_error(anyhow!(
                    "output {id:?} does not exist: 0 is the text"
                )));
            }
        }
        self.output
            .clone()
            .ok_or_else(|| backend_error(anyhow!("no output yet: call compute first")))
    }

    fn compute(
        &mut self,
        inputs: Option<Vec<NamedTensor>>,
    ) -> Result<Option<Vec<NamedTensor>>, BackendError> {
        let named = inputs.is_some();
        if let Some(inputs) = inputs {
            // Named tensors: by name, else by position.
            self.prompt = None;
            self.metadata = None;
            for (i, NamedTensor { name, tensor }) in inputs.into_iter().enumerate() {
                let id = if name.is_empty() {
                    Id::Index(i as u32)
                } else {
                    Id::Name(name)
                };
                let slot = input_slot(&id)
                    .or_else(|_| if i < 2 { Ok(i) } else { input_slot(&id) })
                    .map_err(backend_error)?;
                if slot == 0 {
                    self.prompt = Some(tensor);
                } else {
                    self.metadata = Some(tensor);
                }
            }
        }
        let out = self.run()?;
        self.output = Some(out.clone());
        Ok(named.then(|| {
            vec![NamedTensor {
                name: "output".into(),
                tensor: out,
            }]
        }))
    }
}

/// A model named on the command line: `NAME:ENCODING:TARGET:PATH`, as
/// `wasmedge --nn-preload` takes it (e.g. `default:GGML:AUTO:model.gguf`).
#[derive(Debug, Clone, PartialEq)]
pub struct Preload {
    pub name: String,
    pub path: PathBuf,
}

impl std::str::FromStr for Preload {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let mut parts = s.splitn(4, ':');
        let (Some(name), Some(encoding), Some(target), Some(path)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            bail!("`{s}`: expected NAME:ENCODING:TARGET:PATH, e.g. default:GGML:AUTO:model.gguf");
        };
        if name.is_empty() || path.is_empty() {
            bail!("`{s}`: the name and the path must not be empty");
        }
        if !matches!(
            encoding.to_ascii_lowercase().as_str(),
            "ggml" | "autodetect"
        ) {
            bail!("`{s}`: encoding `{encoding}` is not supported (use GGML)");
        }
        if !matches!(target.to_ascii_lowercase().as_str(), "auto" | "cpu") {
            bail!("`{s}`: target `{target}` is not supported (use AUTO or CPU)");
        }
        Ok(Preload {
            name: name.to_string(),
            path: PathBuf::from(path),
        })
    }
}

/// Graphs loaded ahead of time, found by `load-by-name`.
struct Named(Vec<(String, Graph)>);

impl GraphRegistry for Named {
    fn get(&self, name: &str) -> Option<&Graph> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, g)| g)
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Graph> {
        self.0.iter_mut().find(|(n, _)| n == name).map(|(_, g)| g)
    }
}

/// Opens every preloaded model (each mapped once) into a registry for `load-by-name`.
pub fn preload(models: &Arc<dyn Models>, preloads: &[Preload]) -> anyhow::Result<Registry> {
    let mut named = Vec::new();
    for p in preloads {
        let file = gguf_in(&p.path)?;
        let tenants = models
            .open(&file)
            .with_context(|| format!("cannot preload `{}` from {}", p.name, file.display()))?;
        named.push((p.name.clone(), RealmGraph(tenants, None).into_graph()));
    }
    Ok(Registry::from(Named(named)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preload_specs_parse_like_wasmedge() {
        let p: Preload = "default:GGML:AUTO:models/a.gguf".parse().expect("valid");
        assert_eq!(p.name, "default");
        assert_eq!(p.path, PathBuf::from("models/a.gguf"));
        // A path may itself hold colons.
        let p: Preload = "m:ggml:cpu:/tmp/x:y.gguf".parse().expect("valid");
        assert_eq!(p.path, PathBuf::from("/tmp/x:y.gguf"));
        for bad in [
            "default",
            "a:GGML:AUTO",
            ":GGML:AUTO:x",
            "a:ONNX:AUTO:x",
            "a:GGML:GPU:x",
        ] {
            let e = bad.parse::<Preload>().expect_err(bad).to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn metadata_is_checked() {
        let o = Options::parse(
            br#"{"n-predict": 8, "temp": 0, "top-p": 0.5, "ctx-size": 512, "stream": true}"#,
        )
        .expect("valid");
        assert_eq!(o.n_predict, Some(8));
        assert_eq!(o.temp, Some(0.0));
        assert_eq!(o.ctx_size, Some(512));
        for (bad, why) in [
            (&br#"{"n-predict": "8"}"#[..], "invalid metadata JSON"),
            (br#"{"n_predict": 8}"#, "unknown field"),
            (br#"{"temp": -1}"#, "temp"),
            (br#"{"top-p": 0}"#, "top-p"),
            (br#"{"ctx-size": 0}"#, "ctx-size"),
            (b"not json", "invalid metadata JSON"),
        ] {
            let e = format!("{:#}", Options::parse(bad).expect_err(why));
            assert!(e.contains(why), "{e}");
        }
    }

    /// A completion that echoes, to check the tensor plumbing without a model.
    struct Echo;

    impl Completion for Echo {
        fn complete(&mut self, prompt: &str, o: &Options) -> anyhow::Result<String> {
            Ok(format!("{prompt}|{:?}", o.n_predict))
        }
    }

    fn context() -> ExecutionContext {
        let tenants: Tenants = Arc::new(|| Ok(Box::new(Echo) as Box<dyn Completion>));
        RealmGraph(tenants, None)
            .init_execution_context()
            .expect("context")
    }

    fn u8_tensor(b: &[u8]) -> Tensor {
        Tensor::new(vec![b.len() as u32], TensorType::U8, b.to_vec())
    }

    #[test]
    fn tensors_follow_the_llamaedge_convention() {
        let mut ctx = context();
        let out = ctx
            .compute_with_io(vec![
                NamedTensor {
                    name: "prompt".into(),
                    tensor: u8_tensor(b"hi"),
                },
                NamedTensor {
                    name: "metadata".into(),
                    tensor: u8_tensor(br#"{"n-predict": 3}"#),
                },
            ])
            .expect("compute");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].name, "output");
        assert_eq!(out[0].tensor.data, b"hi|Some(3)");
        // Index-based (the witx calls): set_input, compute, get_output.
        ctx.set_input(Id::Index(0), &u8_tensor(b"yo")).expect("set");
        ctx.compute().expect("compute");
        assert_eq!(
            ctx.get_output(Id::Index(0)).expect("out").data,
            b"yo|Some(3)"
        );
    }

    #[test]
    fn bad_tensors_are_errors() {
        let mut ctx = context();
        let f32s = Tensor::new(vec![1], TensorType::Fp32, vec![0; 4]);
        let wrong_dims = Tensor::new(vec![7], TensorType::U8, b"abc".to_vec());
        let cases = [
            (vec![], "no prompt"),
            (vec![("prompt", f32s)], "must be of type u8"),
            (vec![("prompt", wrong_dims)], "do not match"),
            (vec![("prompt", u8_tensor(&[0xff, 0xfe]))], "not UTF-8"),
            (vec![("prompt", u8_tensor(b""))], "empty"),
            (
                vec![("prompt", u8_tensor(b"x")), ("metadata", u8_tensor(b"{"))],
                "invalid metadata JSON",
            ),
            (
                vec![
                    ("prompt", u8_tensor(b"x")),
                    ("metadata", u8_tensor(b"{}")),
                    ("extra", u8_tensor(b"x")),
                ],
                "does not exist",
            ),
        ];
        for (inputs, why) in cases {
            let inputs = inputs
                .into_iter()
                .map(|(name, tensor)| NamedTensor {
                    name: name.into(),
                    tensor,
                })
                .collect();
            let Err(e) = ctx.compute_with_io(inputs) else {
                panic!("{why}: computed");
            };
            let msg = match &e {
                BackendError::BackendAccess(e) => e.to_string(),
                other => other.to_string(),
            };
            if why.contains("type u8") {
                assert!(matches!(e, BackendError::UnsupportedTensorType(_)), "{msg}");
            }
            assert!(msg.contains(why), "{msg}");
        }
        assert!(ctx.get_output(Id::Index(1)).is_err());
    }

    #[test]
    fn only_gguf_builders_load() {
        struct NoModels;
        impl Models for NoModels {
            fn open(&self, path: &Path) -> anyhow::Result<Tenants> {
                bail!("would open {}", path.display())
            }
        }
        let mut b = GgmlBackend::new(Arc::new(NoModels), GraphEncoding::Autodetect);
        let err = |r: Result<Graph, BackendError>| match r {
            Err(BackendError::BackendAccess(e)) => e.to_string(),
            Err(e) => e.to_string(),
            Ok(_) => panic!("loaded"),
        };
        assert!(err(b.load(&[b"ONNX...."], ExecutionTarget::Cpu)).contains("not a GGUF file"));
        assert!(err(b.load(&[], ExecutionTarget::Cpu)).contains("one graph builder"));
        assert!(err(b.load(&[b"GGUF"], ExecutionTarget::Gpu)).contains("not supported"));
        // A GGUF builder reaches the model provider (through a temporary file, then gone).
        let e = err(b.load(&[b"GGUF\x03\0\0\0"], ExecutionTarget::Cpu));
        assert!(
            e.contains("would open") && e.contains("realm-wasi-nn-"),
            "{e}"
        );
    }
}
