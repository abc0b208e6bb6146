//! The denoising step's arithmetic (guidance, renormalisation, Euler update, inpainting's
//! blend, the non-finite watch, the next transformer call's inputs) as a small ONNX graph
//! that runs on the transformer's device, so that the loop's state never leaves it. The
//! graphs are made by `export-scripts/zimage_export/step_graph.py` (which documents the
//! arithmetic) and embedded here: they belong to the SDK, not to a package.

use std::sync::Mutex;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::{IoBinding, Session};

use crate::error::{Error, Result};
use crate::runtime::library::Runtime;
use crate::runtime::provider::{register_provider, ProviderConfig};
use crate::runtime::run_context::RunContext;

static STEP: &[u8] = include_bytes!("step/step.onnx");
static STEP_INPAINT: &[u8] = include_bytes!("step/step_inpaint.onnx");

// Inputs.
pub(crate) const NOISE_PRED: &str = "noise_pred";
pub(crate) const LATENTS: &str = "latents";
pub(crate) const STEP_INDEX: &str = "step";
pub(crate) const BAD_STEP: &str = "bad_step";
pub(crate) const DT: &str = "dt";
pub(crate) const SCALE: &str = "scale";
pub(crate) const NORMALIZATION: &str = "normalization";
pub(crate) const MODEL_TIMESTEP: &str = "model_timestep";
pub(crate) const NEXT_ROWS: &str = "next_rows";
pub(crate) const IMAGE_LATENTS: &str = "image_latents";
pub(crate) const NOISE: &str = "noise";
pub(crate) const MASK: &str = "mask";
pub(crate) const SIGMA_NEXT: &str = "sigma_next";
pub(crate) const KNOWN_IS_IMAGE: &str = "known_is_image";
// Outputs.
pub(crate) const LATENTS_OUT: &str = "latents_out";
pub(crate) const MODEL_INPUT: &str = "model_input";
pub(crate) const TIMESTEP_OUT: &str = "timestep";
pub(crate) const STEP_OUT: &str = "step_out";
pub(crate) const BAD_STEP_OUT: &str = "bad_step_out";

/// Which of the two step graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StepKind {
    Plain,
    /// With inpainting's blend of the known region after the update.
    Inpaint,
}

impl StepKind {
    fn bytes(self) -> &'static [u8] {
        match self {
            StepKind::Plain => STEP,
            StepKind::Inpaint => STEP_INPAINT,
        }
    }
}

/// One step graph's session, on the transformer's device.
pub(crate) struct StepGraph {
    session: Mutex<Session>,
}

/// The provider the step graph runs on for a transformer built with `transformer`: the same
/// device; CUDA where the transformer runs on TensorRT (a graph this small gains nothing from
/// an engine, and its inputs are CUDA memory either way).
pub(crate) fn provider_for(transformer: &ProviderConfig) -> ProviderConfig {
    match transformer {
        ProviderConfig::Cpu => ProviderConfig::Cpu,
        ProviderConfig::Cuda { device_id, memory_limit, exact_arena, .. }
        | ProviderConfig::TensorRt { device_id, memory_limit, exact_arena, .. } => ProviderConfig::Cuda {
            device_id: *device_id,
            memory_limit: *memory_limit,
            tf32: false,
            exact_arena: *exact_arena,
            // Tiny and not bound to fixed buffers from one generation to the next.
            cuda_graph: false,
        },
    }
}

impl StepGraph {
    pub fn load(runtime: &Runtime, kind: StepKind, provider: &ProviderConfig) -> Result<StepGraph> {
        let failed = |what: &str, e: String| Error::runtime(format!("step graph: {what}: {e}"));
        let mut builder = Session::builder(&runtime.env).map_err(|e| failed("session options", e.to_string()))?;
        // Basic optimisations only: nothing may rewrite the float32 arithmetic (the host loop's
        // order of operations is what the goldens were made with).
        builder = builder
            .with_optimization_level(GraphOptimizationLevel::Level1)
            .map_err(|e| failed("options", e.to_string()))?
            .with_intra_threads(1)
            .map_err(|e| failed("options", e.to_string()))?;
        let mut builder = register_provider(builder, provider)?;
        let session = builder.commit_from_memory(kind.bytes()).map_err(|e| failed("load", e.to_string()))?;
        Ok(StepGraph { session: Mutex::new(session) })
    }

    pub fn binding(&self) -> Result<IoBinding> {
        let session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        session.create_binding().map_err(|e| Error::ort("step", e))
    }

    /// Runs one step on bound buffers.
    pub fn run(&self, binding: &IoBinding, context: &RunContext) -> Result<()> {
        context.check()?;
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let result =
            context.time_ort(|| session.run_binding_with_options(binding, context.run_options(false)).map(drop));
        if context.is_cancelled() {
            return Err(Error::Cancelled);
        }
        result.map_err(|e| Error::ort("step", e))
    }
}
