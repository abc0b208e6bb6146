//! Finding and loading the ONNX Runtime shared library, once per process.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;

use crate::error::{Error, Result};

/// The ONNX Runtime release zimage is built and tested against.
pub const ORT_VERSION: &str = "1.31.1";
const INSTALL_HINT: &str = "install it with `python3 -m pip install onnxruntime==1.31.1` (CPU) or \
`onnxruntime-gpu==1.31.1` (CUDA/TensorRT) and point ORT_DYLIB_PATH at \
site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1, or run scripts/setup.sh";

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
                return Err(Error::runtime(format!(
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
                let env = builder.with_name("zimage").with_telemetry(false).build().map_err(|e| {
                    Error::runtime(format!("creating the ONNX Runtime environment failed: {e}")).caused_by(e)
                })?;
                env.set_log_level(ort_log_level(tracing::level_filters::LevelFilter::current()));
                let rt = Runtime { env, library_path: candidate };
                return Ok(RUNTIME.get_or_init(|| rt));
            }
            Err(e) => tried.push(format!("{} ({e})", candidate.display())),
        }
    }
    Err(Error::runtime(format!(
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

/// ONNX Runtime's own log lines arrive as `tracing` events (target `ort::…`). ONNX Runtime is
/// asked for warnings and errors always (rare, and cheap when nobody listens), and for its
/// informational or verbose lines only when a subscriber enables them as the library loads: it
/// formats every line it logs, and at the verbose level it logs every node of every session it
/// creates. A host that wants those lines installs its subscriber before the first load.
fn ort_log_level(max: tracing::level_filters::LevelFilter) -> ort::logging::LogLevel {
    use ort::logging::LogLevel;
    use tracing::level_filters::LevelFilter;
    if max >= LevelFilter::TRACE {
        LogLevel::Verbose
    } else if max >= LevelFilter::INFO {
        LogLevel::Info
    } else {
        LogLevel::Warning
    }
}
