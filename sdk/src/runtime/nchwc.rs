//! The NCHWc block width of the loaded ONNX Runtime's CPU provider: which prebuilt CPU layout
//! of a graph (a package's `cpu_layout`, docs/package-format.md) this process may load.
//!
//! A prebuilt layout holds convolution filters already reordered into channel blocks of one
//! width; ONNX Runtime's kernels compute with the width its MLAS library picked for this CPU
//! (16 floats with AVX-512, 8 with AVX2). A layout of another width would load and run, and
//! give wrong pixels, so the width is asked of the runtime itself rather than inferred from
//! CPU flags: the probe is one `com.microsoft.nchwc` `ReorderInput` node on 4 channels, which
//! pads them to one block, so the output's channel count is the width. The probe's bytes are
//! written by `export-scripts/zimage_export/cpu_layout.py`, which asks the exporting runtime
//! the same way.

use std::sync::OnceLock;

use ndarray::Array4;
use ort::session::Session;
use ort::value::Tensor;

use super::library::Runtime;

const PROBE: &[u8] = include_bytes!("nchwc_probe.onnx");
const PROBE_CHANNELS: usize = 4;

static BLOCK_WIDTH: OnceLock<Option<u32>> = OnceLock::new();

/// The CPU provider's NCHWc block width, or `None` when this ONNX Runtime has no NCHWc kernels
/// (or the probe could not run: then no prebuilt layout is used, which only costs load time).
/// Asked once per process (about a millisecond).
pub fn block_width(rt: &Runtime) -> Option<u32> {
    *BLOCK_WIDTH.get_or_init(|| match probe(rt) {
        Ok(width) => {
            tracing::debug!(width, "ONNX Runtime's NCHWc block width");
            Some(width)
        }
        Err(reason) => {
            tracing::debug!(reason = %reason, "no NCHWc block width: prebuilt CPU layouts are not used");
            None
        }
    })
}

fn probe(rt: &Runtime) -> std::result::Result<u32, String> {
    let mut builder = Session::builder(&rt.env).map_err(|e| e.to_string())?;
    builder = builder.with_intra_threads(1).map_err(|e| e.to_string())?;
    // An internal question, not one of the user's sessions: kept out of the log.
    builder = builder.with_log_level(ort::logging::LogLevel::Error).map_err(|e| e.to_string())?;
    let mut session = builder.commit_from_memory(PROBE).map_err(|e| e.to_string())?;
    let x = Tensor::from_array(Array4::<f32>::zeros((1, PROBE_CHANNELS, 1, 1))).map_err(|e| e.to_string())?;
    let outputs = session.run(ort::inputs!["x" => x]).map_err(|e| e.to_string())?;
    let (shape, _) = outputs["y"].try_extract_tensor::<f32>().map_err(|e| e.to_string())?;
    match shape.get(1).copied() {
        Some(width) if width >= PROBE_CHANNELS as i64 && width <= 1024 => Ok(width as u32),
        _ => Err(format!("unexpected probe output shape {shape:?}")),
    }
}

#[cfg(test)]
mod tests {
    /// The probe's answer is MLAS's choice for this CPU (onnxruntime's mlas/lib/platform.cpp):
    /// 16-float blocks with AVX-512F, 8 with AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_probe_reports_the_width_mlas_uses_on_this_cpu() {
        let rt = crate::runtime::runtime(None).expect("ONNX Runtime");
        let expected = if std::arch::is_x86_feature_detected!("avx512f") {
            Some(16)
        } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            Some(8)
        } else {
            None
        };
        if expected.is_some() {
            assert_eq!(super::block_width(rt), expected);
        }
    }
}
