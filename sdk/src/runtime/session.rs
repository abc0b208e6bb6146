//! Building one ONNX Runtime session for one graph: options, the provider (with CPU
//! fallback), and the CPU's optimised-graph cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;
use ort::value::{DynValue, TensorElementType};

use super::device::Device;
use super::library::Runtime;
use super::provider::{register_provider, ProviderConfig};
use crate::error::{Error, Result};
use crate::package::files::sha256_hex;
use crate::package::graph::{GraphEntry, GraphKind, TensorSpec};

/// How sessions are built.
#[derive(Debug, Clone, Default)]
pub struct SessionSettings {
    /// Intra-op threads; `None` lets ONNX Runtime use one per physical core.
    pub intra_threads: Option<usize>,
    /// Use CPU when the requested provider cannot be registered, instead of failing.
    pub allow_cpu_fallback: bool,
    /// The graph's weights file is also used by another session (the text encoder and the
    /// enhancer's decoder read one Qwen3 weights file). ONNX Runtime maps page-aligned external
    /// data and, on CPU, runs on the mapped pages, so sessions of one file share one copy, but
    /// only with prepacking off: a prepacked weight is a private per-session copy. Measured on
    /// a 1.07 GiB weights file, encoder + decoder loaded: 1118 MiB PSS this way, 2132 MiB with
    /// prepacking, 3290 MiB when the file is handed over in memory (ONNX Runtime copies out
    /// of such a buffer).
    pub shares_weights: bool,
    /// Leave the weights unpacked (ONNX Runtime's prepacking off) although nothing shares
    /// them: for a graph that runs once per generation (the float text encoder), packing each
    /// weight when it is used costs about what packing it at load does, so the load is faster
    /// (mid-size model: text encoder session 2.3-2.9 s -> 0.2 s on a busy 2-core machine) and the
    /// weights stay in the mapped file instead of a private copy. Not for MatMulNBits graphs:
    /// unpacked, their CPU kernel leaves the int8 path for a slower dequantizing one.
    pub skip_prepacking: bool,
    /// Hand freed activation buffers to the system instead of keeping them in ONNX Runtime's
    /// CPU arena. For the VAE graphs: their activations are large and they run once per image,
    /// so the arena only adds to the peak (VAE decoder at 512x512, mid-size model: peak 2.7 GB
    /// with the arena, 1.5 GB without, same speed). The transformer keeps its arena: without
    /// it a step is 20 % slower.
    pub release_activations: bool,
    /// CPU only: a folder for this graph's optimised model. The first load saves ONNX
    /// Runtime's optimised graph there; later loads read it and skip optimisation (mid-size
    /// model: transformer 1.56 s -> 0.57 s, VAE decoder 0.38 s -> 0.04 s). The key of the
    /// folder must cover the graph, the runtime and the CPU (the optimised graph may use
    /// CPU-specific layouts); [`optimized_cache_dir`] builds it.
    pub optimized_cache: Option<PathBuf>,
    /// CPU only: the graph as the CPU provider's optimisation leaves it, saved by the export
    /// for this CPU's NCHWc block width (a package's `cpu_layout`, checked against
    /// [`super::nchwc::block_width`] by the caller). Loaded instead of the graph file, which
    /// skips the rewrite of every convolution filter (mid-size VAE decoder: session 0.29-0.35 s
    /// -> 0.03-0.05 s). If ONNX Runtime refuses it, the graph file is loaded as without.
    pub prebuilt_cpu_graph: Option<PathBuf>,
    /// Tensors that replace initializers of the graph file, by name (LoRA-merged weights).
    pub initializers: ExternalInitializers,
    /// Use ONNX Runtime's exact uint8 x uint8 kernels for the graph's int8 products: for a
    /// transformer with int8 activations on a CPU where uint8 x int8 can saturate
    /// ([`super::int8_products`]).
    pub exact_int8_products: bool,
    /// The graph's inputs and outputs as its manifest entry declares them (already checked
    /// against what the runtime feeds it): a session whose file has others is refused at load,
    /// as a package error, instead of failing on its first run.
    pub declared_io: Option<Arc<DeclaredIo>>,
}

/// A graph's inputs and outputs as the package's manifest declares them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredIo {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

impl DeclaredIo {
    pub fn of(entry: &GraphEntry) -> Arc<DeclaredIo> {
        Arc::new(DeclaredIo { inputs: entry.inputs.clone(), outputs: entry.outputs.clone() })
    }

    /// Whether `session` has exactly these inputs and outputs (names and element types; the
    /// runtime binds them by name, so order does not matter); the error says what it has.
    fn check(&self, session: &Session, graph: GraphKind, file: &Path) -> Result<()> {
        let has = |outlets: &[ort::value::Outlet]| -> Vec<String> {
            let mut specs: Vec<String> =
                outlets.iter().map(|o| format!("{}:{}", o.name(), element_name(o.dtype().tensor_type()))).collect();
            specs.sort();
            specs
        };
        let declared = |specs: &[TensorSpec]| -> Vec<String> {
            let mut specs: Vec<String> = specs.iter().map(TensorSpec::to_string).collect();
            specs.sort();
            specs
        };
        let (inputs, outputs) = (has(session.inputs()), has(session.outputs()));
        let (want_inputs, want_outputs) = (declared(&self.inputs), declared(&self.outputs));
        if inputs == want_inputs && outputs == want_outputs {
            return Ok(());
        }
        let name = file.file_name().map_or_else(|| file.display().to_string(), |n| n.to_string_lossy().into_owned());
        Err(Error::package(
            file,
            format!(
                "graph {graph}: {name} has inputs [{}] and outputs [{}], where the manifest declares inputs [{}] \
                 and outputs [{}]: not this package's {graph} graph",
                inputs.join(", "),
                outputs.join(", "),
                want_inputs.join(", "),
                want_outputs.join(", ")
            ),
        ))
    }
}

/// The manifest's name of an element type (numpy's), or what ONNX Runtime calls another.
fn element_name(element: Option<TensorElementType>) -> String {
    use TensorElementType as T;
    let Some(element) = element else { return "not-a-tensor".into() };
    match element {
        T::Float32 => "float32",
        T::Float16 => "float16",
        T::Bfloat16 => "bfloat16",
        T::Float64 => "float64",
        T::Int64 => "int64",
        T::Int32 => "int32",
        T::Int16 => "int16",
        T::Int8 => "int8",
        T::Uint8 => "uint8",
        T::Uint16 => "uint16",
        T::Uint32 => "uint32",
        T::Uint64 => "uint64",
        T::Bool => "bool",
        other => return format!("{other:?}").to_lowercase(),
    }
    .into()
}

/// Tensors handed to ONNX Runtime in place of the graph file's initializers of the same names.
/// One the file keeps in its external data goes in with `AddExternalInitializers` (it replaces
/// the file's tensor before the graph is optimised, and that tensor is never read); one stored
/// inside the `.onnx` protobuf (ONNX Runtime refuses to replace those that way) with
/// `AddInitializer`, which overrides it when the session's weights are set up. Shared, not
/// copied, by every session built with them; `key` names the set (for engine caches).
#[derive(Clone, Default)]
pub struct ExternalInitializers {
    /// (initializer name, value, whether the file keeps that initializer in external data)
    tensors: Vec<(String, Arc<DynValue>, bool)>,
    key: String,
    bytes: usize,
}

impl ExternalInitializers {
    pub(crate) fn new(tensors: Vec<(String, Arc<DynValue>, bool)>, key: String, bytes: usize) -> Self {
        ExternalInitializers { tensors, key, bytes }
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// What the set is (empty for none): adapters and scales.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Bytes of tensor data held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl std::fmt::Debug for ExternalInitializers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExternalInitializers({} tensors, {} bytes)", self.tensors.len(), self.bytes)
    }
}

/// The cache folder for one graph's optimised model under `base`, keyed by the graph's
/// sha256, the ONNX Runtime build and the CPU model and features.
pub fn optimized_cache_dir(base: &Path, graph: GraphKind, graph_sha256: &str) -> PathBuf {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .map(|info| {
            info.lines()
                .filter(|l| l.starts_with("model name") || l.starts_with("flags"))
                .take(2)
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_else(|_| std::env::consts::ARCH.to_string());
    let key = sha256_hex(format!("{graph_sha256}|{}|{cpu}", ort::info()).as_bytes());
    base.join(format!("{graph}-{}", &key[..16]))
}

/// A session, the provider that runs it, and why it is not the requested one when the
/// provider could not be set up and the CPU took over.
pub(crate) struct BuiltSession {
    pub session: Session,
    pub device: Device,
    pub fallback_reason: Option<String>,
    /// Why the session was built without CUDA graph capture although it was asked for: ONNX
    /// Runtime refused it (a node not on CUDA, control flow).
    pub capture_refusal: Option<String>,
}

/// Builds a session for one graph.
pub(crate) fn build_session(
    rt: &Runtime,
    graph: GraphKind,
    path: &Path,
    provider: &ProviderConfig,
    settings: &SessionSettings,
) -> Result<BuiltSession> {
    let failed = |what: &str, e: ort::Error<SessionBuilder>| {
        Error::runtime(format!("{graph}: {what}: {e}")).caused_by(Error::detach_ort(e))
    };
    let base = || -> Result<SessionBuilder> {
        let mut b =
            Session::builder(&rt.env).map_err(|e| Error::runtime(format!("session options: {e}")).caused_by(e))?;
        b = b.with_optimization_level(GraphOptimizationLevel::All).map_err(|e| failed("optimization level", e))?;
        if let Some(n) = settings.intra_threads {
            b = b.with_intra_threads(n).map_err(|e| failed("threads", e))?;
        }
        if settings.shares_weights || settings.skip_prepacking {
            b = b.with_prepacking(false).map_err(|e| failed("prepacking", e))?;
        }
        if settings.exact_int8_products {
            b = b
                .with_config_entry(super::int8_products::EXACT_PRODUCTS_KEY, "1")
                .map_err(|e| failed("exact int8 products", e))?;
        }
        if settings.release_activations {
            disable_cpu_arena(&mut b).map_err(|e| Error::runtime(format!("{graph}: CPU arena: {e}")))?;
        }
        for (name, value, external) in &settings.initializers.tensors {
            b = if *external {
                b.with_external_initializer(name, Arc::clone(value)).map_err(|e| failed("external initializer", e))?
            } else {
                b.with_initializer(name, Arc::clone(value)).map_err(|e| failed("initializer", e))?
            };
        }
        Ok(b)
    };
    let commit_file = |mut b: SessionBuilder, file: &Path| -> Result<Session> {
        super::session_count::record(file);
        let session = b.commit_from_file(file).map_err(|e| {
            Error::package(file, format!("ONNX Runtime could not load graph {graph}: {e}")).caused_by(e)
        })?;
        if let Some(declared) = &settings.declared_io {
            declared.check(&session, graph, file)?;
        }
        Ok(session)
    };
    let commit = |b: SessionBuilder| commit_file(b, path);
    let on_cpu = |session| BuiltSession { session, device: Device::Cpu, fallback_reason: None, capture_refusal: None };
    if *provider == ProviderConfig::Cpu {
        if let Some(prebuilt) = &settings.prebuilt_cpu_graph {
            match commit_file(base()?, prebuilt) {
                Ok(session) => {
                    tracing::debug!(graph = graph.name(), path = %prebuilt.display(), "loaded the prebuilt CPU layout");
                    return Ok(on_cpu(session));
                }
                Err(e) => tracing::warn!(
                    graph = graph.name(),
                    reason = %e,
                    "the prebuilt CPU layout did not load; loading the portable graph"
                ),
            }
        }
        if let Some(cache) = &settings.optimized_cache {
            return Ok(on_cpu(load_through_cache(graph, cache, &base, &commit)?));
        }
        return Ok(on_cpu(commit(base()?)?));
    }
    match register_provider(base()?, provider) {
        Ok(b) => match commit(b) {
            Ok(session) => {
                Ok(BuiltSession { session, device: provider.device(), fallback_reason: None, capture_refusal: None })
            }
            // ONNX Runtime checks the capture conditions only when it builds the session: build
            // it again without, and keep why.
            Err(e) if provider.captures() => {
                let reason = format!("CUDA graphs not used: ONNX Runtime refused to capture this graph: {e}");
                tracing::warn!(graph = graph.name(), reason = %reason, "building the session without CUDA graphs");
                let session = commit(register_provider(base()?, &provider.with_capture(false))?)?;
                Ok(BuiltSession {
                    session,
                    device: provider.device(),
                    fallback_reason: None,
                    capture_refusal: Some(reason),
                })
            }
            Err(e) => Err(e),
        },
        Err(e) if settings.allow_cpu_fallback => {
            let reason = e.to_string();
            tracing::warn!(graph = graph.name(), reason = %reason, "provider unavailable, running on the CPU");
            Ok(BuiltSession { fallback_reason: Some(reason), ..on_cpu(commit(base()?)?) })
        }
        Err(e) => Err(e),
    }
}

const CACHED_MODEL: &str = "model.onnx";

/// Loads the cached optimised graph when there is one; otherwise loads `path` normally and
/// saves the optimised graph (into a private folder renamed into place, so that concurrent
/// first loads never see half-written files). A cache that cannot be read or written is
/// skipped, never an error: it only costs load time.
fn load_through_cache(
    graph: GraphKind,
    cache: &Path,
    base: &dyn Fn() -> Result<SessionBuilder>,
    commit: &dyn Fn(SessionBuilder) -> Result<Session>,
) -> Result<Session> {
    let cached = cache.join(CACHED_MODEL);
    if cached.is_file() {
        let from_cache = base().and_then(|b| {
            let mut b = b
                .with_optimization_level(GraphOptimizationLevel::Disable)
                .map_err(|e| Error::runtime(format!("{graph}: {e}")))?;
            super::session_count::record(&cached);
            b.commit_from_file(&cached).map_err(|e| Error::runtime(format!("{graph}: cached model: {e}")))
        });
        if let Ok(session) = from_cache {
            return Ok(session);
        }
    }
    let staging = cache.with_extension(format!("tmp-{}", std::process::id()));
    let saving = std::fs::create_dir_all(&staging).is_ok();
    let mut builder = base()?;
    if saving {
        // ort's error hands the builder back (a large Err), which is dropped here anyway.
        #[allow(clippy::result_large_err)]
        let with_save = builder
            .with_optimized_model_path(staging.join(CACHED_MODEL))
            .and_then(|b| {
                b.with_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
            })
            .and_then(|b| {
                b.with_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            });
        builder = match with_save {
            Ok(b) => b,
            Err(_) => base()?,
        };
    }
    let session = commit(builder)?;
    if saving && std::fs::rename(&staging, cache).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    Ok(session)
}

/// ort 2.0.0-rc.15 has no builder method for this session option; the C API call is direct.
fn disable_cpu_arena(builder: &mut SessionBuilder) -> std::result::Result<(), String> {
    use ort::AsPointer;
    let api = ort::api();
    // SAFETY: the pointer is the builder's live OrtSessionOptions; a returned status is read
    // and released here.
    unsafe {
        let status = (api.DisableCpuMemArena)(builder.ptr_mut());
        if status.0.is_null() {
            return Ok(());
        }
        let message = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0)).to_string_lossy().into_owned();
        (api.ReleaseStatus)(status.0);
        Err(message)
    }
}
