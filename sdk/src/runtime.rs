//! Finding and loading ONNX Runtime (one environment per process), and building one session
//! per graph on the requested execution provider.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;

use crate::error::{Error, Result};
use crate::gpu::{GpuOptions, ShapeProfile, TensorRtPrecision};
use crate::manifest::Manifest;

/// The ONNX Runtime release zimage is built and tested against.
pub const ORT_VERSION: &str = "1.31.1";
const INSTALL_HINT: &str = "install it with `python3 -m pip install onnxruntime==1.31.1` (CPU) or \
`onnxruntime-gpu==1.31.1` (CUDA/TensorRT) and point ORT_DYLIB_PATH at \
site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1, or run scripts/setup.sh";

/// Where a graph runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda {
        device_id: i32,
    },
    TensorRt {
        device_id: i32,
    },
}

impl Device {
    pub fn provider_name(&self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda { .. } => "cuda",
            Device::TensorRt { .. } => "tensorrt",
        }
    }
}

impl std::str::FromStr for Device {
    type Err = Error;

    /// `cpu`, `cuda`, `cuda:N`, `tensorrt`, `tensorrt:N`.
    fn from_str(s: &str) -> Result<Device> {
        let (name, id) = match s.split_once(':') {
            Some((n, i)) => {
                let id = i.parse::<i32>().ok().filter(|v| *v >= 0).ok_or_else(|| {
                    Error::invalid(format!("device {s:?}: the index after ':' must be a non-negative integer"))
                })?;
                (n, id)
            }
            None => (s, 0),
        };
        match name {
            "cpu" if !s.contains(':') => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda { device_id: id }),
            "tensorrt" | "trt" => Ok(Device::TensorRt { device_id: id }),
            _ => Err(Error::invalid(format!("unknown device {s:?}: use cpu, cuda[:N] or tensorrt[:N]"))),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda { device_id } => write!(f, "cuda:{device_id}"),
            Device::TensorRt { device_id } => write!(f, "tensorrt:{device_id}"),
        }
    }
}

/// The loaded ONNX Runtime: its environment and where it came from.
pub struct Runtime {
    pub(crate) env: Environment,
    pub library_path: PathBuf,
}

impl Runtime {
    /// ONNX Runtime's build description (version, commit).
    pub fn build_info(&self) -> &'static str {
        ort::info()
    }
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// Loads ONNX Runtime once per process. Later calls return the same runtime; asking for a
/// different library after one is loaded is an error, since a process can hold only one.
pub fn runtime(explicit_library: Option<&Path>) -> Result<&'static Runtime> {
    let _guard = INIT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(rt) = RUNTIME.get() {
        if let Some(wanted) = explicit_library {
            if !same_file(wanted, &rt.library_path) {
                return Err(Error::Runtime(format!(
                    "ONNX Runtime is already loaded from {} in this process; it cannot also load {}",
                    rt.library_path.display(),
                    wanted.display()
                )));
            }
        }
        return Ok(rt);
    }
    let candidates = library_candidates(explicit_library);
    let mut tried = Vec::new();
    for candidate in candidates {
        if !candidate.is_file() {
            tried.push(format!("{} (not found)", candidate.display()));
            continue;
        }
        match ort::init_from(&candidate) {
            Ok(builder) => {
                let env = builder
                    .with_name("zimage")
                    .with_telemetry(false)
                    .build()
                    .map_err(|e| Error::Runtime(format!("creating the ONNX Runtime environment failed: {e}")))?;
                let rt = Runtime { env, library_path: candidate };
                return Ok(RUNTIME.get_or_init(|| rt));
            }
            Err(e) => tried.push(format!("{} ({e})", candidate.display())),
        }
    }
    Err(Error::Runtime(format!(
        "ONNX Runtime {ORT_VERSION} (shared library) was not found or could not be loaded. Tried:\n  {}\nTo fix: {INSTALL_HINT}",
        tried.join("\n  ")
    )))
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

#[cfg(target_os = "linux")]
const LIBRARY_NAMES: &[&str] = &["libonnxruntime.so.1.31.1", "libonnxruntime.so.1", "libonnxruntime.so"];
#[cfg(target_os = "macos")]
const LIBRARY_NAMES: &[&str] = &["libonnxruntime.1.31.1.dylib", "libonnxruntime.dylib"];
#[cfg(windows)]
const LIBRARY_NAMES: &[&str] = &["onnxruntime.dll"];
#[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
const LIBRARY_NAMES: &[&str] = &["libonnxruntime.so"];

/// The search order: the caller's path, then `ORT_DYLIB_PATH`, then beside the executable,
/// beside the library that contains zimage, then the project-local copy from the setup step.
/// An explicit path (option or variable) is the only candidate when given.
pub fn library_candidates(explicit_library: Option<&Path>) -> Vec<PathBuf> {
    if let Some(path) = explicit_library {
        return vec![absolute(path)];
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()) {
        return vec![absolute(Path::new(&path))];
    }
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
        dirs.push(dir);
    }
    if let Some(dir) = containing_library_dir() {
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.runtime/lib"));
    dirs.iter().flat_map(|d| LIBRARY_NAMES.iter().map(move |n| d.join(n))).collect()
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
    }
}

/// The folder of the shared object that holds this code (libzimage.so when zimage is used
/// from C), found with dladdr.
#[cfg(unix)]
fn containing_library_dir() -> Option<PathBuf> {
    use std::ffi::CStr;
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    let symbol = containing_library_dir as *const libc::c_void;
    if unsafe { libc::dladdr(symbol, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    let name = unsafe { CStr::from_ptr(info.dli_fname) }.to_str().ok()?;
    let path = std::fs::canonicalize(name).ok()?;
    path.parent().map(Path::to_path_buf)
}

#[cfg(not(unix))]
fn containing_library_dir() -> Option<PathBuf> {
    None
}

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
}

/// The cache folder for one graph's optimised model under `base`, keyed by the graph's
/// sha256, the ONNX Runtime build and the CPU model and features.
pub fn optimized_cache_dir(base: &Path, graph: &str, graph_sha256: &str) -> PathBuf {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .map(|info| {
            info.lines()
                .filter(|l| l.starts_with("model name") || l.starts_with("flags"))
                .take(2)
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_else(|_| std::env::consts::ARCH.to_string());
    let key = crate::manifest::sha256_hex(format!("{graph_sha256}|{}|{cpu}", ort::info()).as_bytes());
    base.join(format!("{graph}-{}", &key[..16]))
}

/// Everything the execution provider of one graph needs, fixed at load time.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ProviderConfig {
    Cpu,
    Cuda {
        device_id: i32,
        memory_limit: Option<usize>,
        tf32: bool,
        exact_arena: bool,
    },
    TensorRt {
        device_id: i32,
        profile: ShapeProfile,
        cache_dir: PathBuf,
        precision: TensorRtPrecision,
        memory_limit: Option<usize>,
        tf32: bool,
        exact_arena: bool,
    },
}

impl ProviderConfig {
    /// `exact_arena`: grow the CUDA arena by what is asked for instead of in powers of two (the
    /// sequential memory mode's choice: a smaller peak for a few more allocations).
    pub fn new(
        device: Device,
        graph: &str,
        manifest: &Manifest,
        gpu: &GpuOptions,
        exact_arena: bool,
    ) -> ProviderConfig {
        match device {
            Device::Cpu => ProviderConfig::Cpu,
            Device::Cuda { device_id } => ProviderConfig::Cuda {
                device_id,
                memory_limit: gpu.cuda_memory_limit,
                tf32: gpu.cuda_tf32.for_graph(graph),
                exact_arena,
            },
            Device::TensorRt { device_id } => ProviderConfig::TensorRt {
                device_id,
                profile: gpu.profile(graph, manifest),
                cache_dir: gpu.cache_dir_for(graph, manifest),
                precision: gpu.tensorrt_precision,
                memory_limit: gpu.cuda_memory_limit,
                tf32: gpu.cuda_tf32.for_graph(graph),
                exact_arena,
            },
        }
    }

    pub fn device(&self) -> Device {
        match self {
            ProviderConfig::Cpu => Device::Cpu,
            ProviderConfig::Cuda { device_id, .. } => Device::Cuda { device_id: *device_id },
            ProviderConfig::TensorRt { device_id, .. } => Device::TensorRt { device_id: *device_id },
        }
    }
}

/// Builds a session for one graph, returning it with the provider that runs it.
pub(crate) fn build_session(
    rt: &Runtime,
    graph: &str,
    path: &Path,
    provider: &ProviderConfig,
    settings: &SessionSettings,
) -> Result<(Session, Device)> {
    let base = || -> Result<SessionBuilder> {
        let mut b = Session::builder(&rt.env).map_err(|e| Error::Runtime(format!("session options: {e}")))?;
        b = b
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| Error::Runtime(format!("{graph}: optimization level: {e}")))?;
        if let Some(n) = settings.intra_threads {
            b = b.with_intra_threads(n).map_err(|e| Error::Runtime(format!("{graph}: threads: {e}")))?;
        }
        if settings.shares_weights {
            b = b.with_prepacking(false).map_err(|e| Error::Runtime(format!("{graph}: prepacking: {e}")))?;
        }
        if settings.release_activations {
            disable_cpu_arena(&mut b).map_err(|e| Error::Runtime(format!("{graph}: CPU arena: {e}")))?;
        }
        Ok(b)
    };
    let commit = |mut b: SessionBuilder| -> Result<Session> {
        b.commit_from_file(path)
            .map_err(|e| Error::package(path, format!("ONNX Runtime could not load graph {graph}: {e}")))
    };
    if *provider == ProviderConfig::Cpu {
        if let Some(cache) = &settings.optimized_cache {
            return Ok((load_through_cache(graph, cache, &base, &commit)?, Device::Cpu));
        }
        return Ok((commit(base()?)?, Device::Cpu));
    }
    match register_provider(base()?, provider) {
        Ok(b) => Ok((commit(b)?, provider.device())),
        Err(_) if settings.allow_cpu_fallback => Ok((commit(base()?)?, Device::Cpu)),
        Err(e) => Err(e),
    }
}

const CACHED_MODEL: &str = "model.onnx";

/// Loads the cached optimised graph when there is one; otherwise loads `path` normally and
/// saves the optimised graph (into a private folder renamed into place, so that concurrent
/// first loads never see half-written files). A cache that cannot be read or written is
/// skipped, never an error: it only costs load time.
fn load_through_cache(
    graph: &str,
    cache: &Path,
    base: &dyn Fn() -> Result<SessionBuilder>,
    commit: &dyn Fn(SessionBuilder) -> Result<Session>,
) -> Result<Session> {
    let cached = cache.join(CACHED_MODEL);
    if cached.is_file() {
        let from_cache = base().and_then(|b| {
            let mut b = b
                .with_optimization_level(GraphOptimizationLevel::Disable)
                .map_err(|e| Error::Runtime(format!("{graph}: {e}")))?;
            b.commit_from_file(&cached).map_err(|e| Error::Runtime(format!("{graph}: cached model: {e}")))
        });
        if let Ok(session) = from_cache {
            return Ok(session);
        }
    }
    let staging = cache.with_extension(format!("tmp-{}", std::process::id()));
    let saving = std::fs::create_dir_all(&staging).is_ok();
    let mut builder = base()?;
    if saving {
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

#[cfg(feature = "cuda")]
fn cuda_dispatch(
    device_id: i32,
    memory_limit: Option<usize>,
    tf32: bool,
    exact_arena: bool,
) -> ort::ep::ExecutionProviderDispatch {
    // ONNX Runtime turns TF32 on by default; zimage decides per graph (`Tf32`).
    let mut cuda = ort::ep::CUDA::default().with_device_id(device_id).with_tf32(tf32);
    if exact_arena {
        cuda = cuda.with_arena_extend_strategy(ort::ep::ArenaExtendStrategy::SameAsRequested);
    }
    if let Some(limit) = memory_limit {
        cuda = cuda.with_memory_limit(limit);
    }
    cuda.build().error_on_failure()
}

fn register_provider(builder: SessionBuilder, provider: &ProviderConfig) -> Result<SessionBuilder> {
    let name = provider.device().provider_name();
    let unavailable = |message: String| Error::Provider { provider: name.into(), message };
    let dispatches = match provider {
        ProviderConfig::Cpu => return Ok(builder),
        #[cfg(feature = "cuda")]
        ProviderConfig::Cuda { device_id, memory_limit, tf32, exact_arena } => {
            vec![cuda_dispatch(*device_id, *memory_limit, *tf32, *exact_arena)]
        }
        #[cfg(all(feature = "tensorrt", feature = "cuda"))]
        ProviderConfig::TensorRt { device_id, profile, cache_dir, precision, memory_limit, tf32, exact_arena } => {
            std::fs::create_dir_all(cache_dir).map_err(|e| Error::io(cache_dir, e))?;
            let cache = cache_dir.display().to_string();
            let trt = ort::ep::TensorRT::default()
                .with_device_id(*device_id)
                .with_engine_cache(true)
                .with_engine_cache_path(&cache)
                .with_timing_cache(true)
                .with_timing_cache_path(&cache)
                .with_fp16(*precision == TensorRtPrecision::Fp16)
                .with_bf16(*precision == TensorRtPrecision::Bf16)
                .with_profile_min_shapes(&profile.min)
                .with_profile_opt_shapes(&profile.opt)
                .with_profile_max_shapes(&profile.max)
                .build()
                .error_on_failure();
            // Nodes TensorRT cannot take run on CUDA rather than silently on the CPU.
            vec![trt, cuda_dispatch(*device_id, *memory_limit, *tf32, *exact_arena)]
        }
        #[allow(unreachable_patterns)]
        _ => return Err(unavailable(format!("this zimage was built without the `{name}` feature"))),
    };
    builder.with_execution_providers(dispatches).map_err(|e| {
        unavailable(format!(
            "{e}. The loaded ONNX Runtime cannot run {name}: it needs onnxruntime-gpu=={ORT_VERSION} \
             (CUDA 13, cuDNN 9{}) with its provider libraries beside libonnxruntime, and a visible GPU",
            if name == "tensorrt" { ", TensorRT 10" } else { "" }
        ))
    })
}
