//! Execution providers: what each graph's provider needs (fixed at load time) and registering
//! it on a session builder.

use std::path::PathBuf;

use ort::session::builder::SessionBuilder;

use super::device::Device;
use super::gpu::{GpuOptions, ShapeProfile, TensorRtPrecision};
use super::library::ORT_VERSION;
use crate::error::{Error, Result};
use crate::package::graph::{GraphEntry, GraphKind};
use crate::package::Manifest;

/// Everything the execution provider of one graph needs, fixed at load time.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ProviderConfig {
    Cpu,
    Cuda {
        device_id: i32,
        memory_limit: Option<usize>,
        tf32: bool,
        exact_arena: bool,
        /// Build the session with `enable_cuda_graph` (see `runtime::cuda_graph`).
        cuda_graph: bool,
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
    /// The provider for one graph of a pipeline. `exact_arena`: grow the CUDA arena by what is
    /// asked for instead of in powers of two (the sequential memory mode's choice: a smaller
    /// peak for a few more allocations). A graph TensorRT does not serve (see
    /// [`TensorRtOptions::profile`](super::gpu::TensorRtOptions::profile)) runs on CUDA when
    /// TensorRT is asked for. `weights_key` names weights changed at load time (LoRA), which
    /// TensorRT's engines bake in: empty for the package's own.
    pub fn new(
        device: Device,
        graph: GraphKind,
        entry: &GraphEntry,
        manifest: &Manifest,
        gpu: &GpuOptions,
        exact_arena: bool,
        weights_key: &str,
    ) -> ProviderConfig {
        match device {
            Device::Cpu => ProviderConfig::Cpu,
            Device::Cuda { device_id } => Self::cuda(device_id, graph, gpu, exact_arena),
            Device::TensorRt { device_id } => match gpu.tensorrt.profile(graph, manifest) {
                Some(profile) => ProviderConfig::TensorRt {
                    device_id,
                    cache_dir: gpu.tensorrt.cache_dir_for_weights(graph, entry, &profile, weights_key),
                    profile,
                    precision: gpu.tensorrt.precision,
                    memory_limit: gpu.cuda_memory_limit,
                    tf32: gpu.cuda_tf32.for_graph(graph),
                    exact_arena,
                },
                None => Self::cuda(device_id, graph, gpu, exact_arena),
            },
        }
    }

    /// The provider for a graph that needs no package context: the CPU, or CUDA for any GPU
    /// device (the enhancer's decoder, which TensorRT does not serve).
    pub fn without_tensorrt(device: Device, graph: GraphKind, gpu: &GpuOptions, exact_arena: bool) -> ProviderConfig {
        match device {
            Device::Cpu => ProviderConfig::Cpu,
            Device::Cuda { device_id } | Device::TensorRt { device_id } => {
                Self::cuda(device_id, graph, gpu, exact_arena)
            }
        }
    }

    fn cuda(device_id: i32, graph: GraphKind, gpu: &GpuOptions, exact_arena: bool) -> ProviderConfig {
        ProviderConfig::Cuda {
            device_id,
            memory_limit: gpu.cuda_memory_limit,
            tf32: gpu.cuda_tf32.for_graph(graph),
            exact_arena,
            cuda_graph: false,
        }
    }

    /// Whether the session is to be built for CUDA graph capture.
    pub fn captures(&self) -> bool {
        matches!(self, ProviderConfig::Cuda { cuda_graph: true, .. })
    }

    /// The same provider with CUDA graph capture on or off (CUDA only).
    pub fn with_capture(&self, on: bool) -> ProviderConfig {
        let mut provider = self.clone();
        if let ProviderConfig::Cuda { cuda_graph, .. } = &mut provider {
            *cuda_graph = on;
        }
        provider
    }

    pub fn device(&self) -> Device {
        match self {
            ProviderConfig::Cpu => Device::Cpu,
            ProviderConfig::Cuda { device_id, .. } => Device::Cuda { device_id: *device_id },
            ProviderConfig::TensorRt { device_id, .. } => Device::TensorRt { device_id: *device_id },
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_dispatch(
    device_id: i32,
    memory_limit: Option<usize>,
    tf32: bool,
    exact_arena: bool,
    cuda_graph: bool,
) -> ort::ep::ExecutionProviderDispatch {
    // ONNX Runtime turns TF32 on by default; zimage decides per graph (`Tf32`).
    let mut cuda = ort::ep::CUDA::default().with_device_id(device_id).with_tf32(tf32).with_cuda_graph(cuda_graph);
    if exact_arena {
        cuda = cuda.with_arena_extend_strategy(ort::ep::ArenaExtendStrategy::SameAsRequested);
    }
    if let Some(limit) = memory_limit {
        cuda = cuda.with_memory_limit(limit);
    }
    cuda.build().error_on_failure()
}

// Without GPU features every provider but the CPU is refused before the registration below.
#[cfg_attr(not(feature = "cuda"), allow(unreachable_code, unused_variables))]
pub(crate) fn register_provider(builder: SessionBuilder, provider: &ProviderConfig) -> Result<SessionBuilder> {
    let name = provider.device().provider_name();
    let unavailable = |message: String| Error::provider(name, message);
    // Typed: in a build without GPU features every arm below returns, and the type would
    // otherwise be inferred as `()` (a CPU-only build failed to compile).
    let dispatches: Vec<ort::ep::ExecutionProviderDispatch> = match provider {
        ProviderConfig::Cpu => return Ok(builder),
        #[cfg(feature = "cuda")]
        ProviderConfig::Cuda { device_id, memory_limit, tf32, exact_arena, cuda_graph } => {
            vec![cuda_dispatch(*device_id, *memory_limit, *tf32, *exact_arena, *cuda_graph)]
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
            vec![trt, cuda_dispatch(*device_id, *memory_limit, *tf32, *exact_arena, false)]
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
        .caused_by(Error::detach_ort(e))
    })
}
