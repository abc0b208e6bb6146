//! Whether this process's ONNX Runtime reads a package's saved packed weights as they were
//! written: the gate of a prebuilt prepacked layout (a graph entry's `cpu_prepacked`,
//! docs/package-format.md).
//!
//! ONNX Runtime's CPU kernels pack each constant GEMM weight into MLAS's blocked layout when a
//! session is created, and it can save those packed copies with the optimised graph and map
//! them at a later load. Their format belongs to the kernels MLAS picked on the machine that
//! wrote them. ONNX Runtime 1.31.1 still packs each weight at load and uses a saved copy only
//! when the hash of its own packing matches the saved key, but it reads a matching copy's bytes
//! unchecked (docs/loading.md, "Prepacked transformer"); a runtime that trusted the file more
//! would compute with misread weights. So a package carries a probe saved the same way (every kernel
//! variant the layout packs for, on small and blocking-size weights, values that are small
//! multiples of 1/8 so that every result is exact in float32), whose only output is the largest
//! |y - expected|. A layout is used only where its probe gives exactly 0 here. Anything else (a
//! difference, NaN, a probe ONNX Runtime cannot run) means the portable graph, which only costs
//! load time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ndarray::Array1;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::Tensor;

use super::library::Runtime;

/// Verdicts by probe file and checksum: a probe runs once per process (a few milliseconds), not
/// at every load of the graph (the sequential memory mode reloads it per generation).
static VERDICTS: Mutex<BTreeMap<(PathBuf, String), bool>> = Mutex::new(BTreeMap::new());

/// Whether the packed weights saved with the probe at `probe` (whose manifest checksum is
/// `sha256`) are read correctly by this runtime's CPU kernels.
pub fn packed_weights_readable(rt: &Runtime, probe: &Path, sha256: &str) -> bool {
    let key = (probe.to_path_buf(), sha256.to_ascii_lowercase());
    if let Some(verdict) = VERDICTS.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return *verdict;
    }
    let verdict = match largest_error(rt, probe) {
        // Exactly 0: the probe's products are exact whatever order a kernel adds in. NaN fails.
        Ok(0.0) => true,
        Ok(error) => {
            tracing::warn!(
                probe = %probe.display(),
                error,
                "this ONNX Runtime reads the package's packed weights differently: loading the portable graph"
            );
            false
        }
        Err(reason) => {
            tracing::warn!(probe = %probe.display(), reason = %reason, "the prepack probe did not run: loading the portable graph");
            false
        }
    };
    VERDICTS.lock().unwrap_or_else(|p| p.into_inner()).insert(key, verdict);
    verdict
}

fn largest_error(rt: &Runtime, probe: &Path) -> std::result::Result<f32, String> {
    let mut builder = Session::builder(&rt.env).map_err(|e| e.to_string())?;
    builder = builder.with_intra_threads(1).map_err(|e| e.to_string())?;
    // As the graphs are loaded (zimage's sessions all use level ALL with prepacking on).
    builder = builder.with_optimization_level(GraphOptimizationLevel::All).map_err(|e| e.to_string())?;
    // An internal question, not one of the user's sessions: kept out of the log.
    builder = builder.with_log_level(ort::logging::LogLevel::Error).map_err(|e| e.to_string())?;
    super::session_count::record(probe);
    let mut session = builder.commit_from_file(probe).map_err(|e| e.to_string())?;
    let one = Tensor::from_array(Array1::<f32>::ones(1)).map_err(|e| e.to_string())?;
    let outputs = session.run(ort::inputs!["one" => one]).map_err(|e| e.to_string())?;
    let (shape, values) = outputs["max_abs_error"].try_extract_tensor::<f32>().map_err(|e| e.to_string())?;
    match values {
        [error] => Ok(*error),
        _ => Err(format!("unexpected probe output shape {shape:?}")),
    }
}
