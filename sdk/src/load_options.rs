//! How a pipeline or a prompt enhancer is loaded: where ONNX Runtime is, where each graph runs,
//! threads, memory mode, GPU settings, caches.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::lora::LoraSetting;
use crate::model::vae_tiling::VaeTiling;
use crate::runtime::device::Device;
use crate::runtime::gpu::GpuOptions;
use crate::runtime::graph::MemoryMode;
use crate::runtime::session::{ExternalInitializers, SessionSettings};

/// How a pipeline (or a prompt enhancer) is loaded. Build it from `Default` and set the fields
/// that differ; new fields may be added, so it cannot be built with a struct literal:
/// ```
/// let mut options = zimage::LoadOptions::default();
/// options.threads = Some(2);
/// options.device = zimage::Device::Cpu;
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct LoadOptions {
    /// The ONNX Runtime shared library; `None` searches (see [`crate::runtime::library_candidates`]).
    pub runtime_library: Option<PathBuf>,
    /// Where every graph runs unless overridden below.
    pub device: Device,
    /// Where the transformer runs, when it should differ from `device` (e.g. TensorRT for the
    /// transformer, CUDA for the rest).
    pub transformer_device: Option<Device>,
    /// Intra-op threads per graph; `None` lets ONNX Runtime pick.
    pub threads: Option<usize>,
    /// Check the sha256 of every file, also the large ones (always done below 64 MB).
    pub verify_checksums: bool,
    /// Fall back to CPU when the requested provider cannot be set up, instead of failing.
    pub allow_cpu_fallback: bool,
    /// Keep every graph loaded, or load each for its stage only.
    pub memory_mode: MemoryMode,
    /// TensorRT profiles and caches, CUDA memory limit (ignored on CPU).
    pub gpu: GpuOptions,
    /// CPU: keep ONNX Runtime's optimised transformer and VAE graphs in this folder so later
    /// loads skip graph optimisation (the text encoder loads faster without). `None`: off.
    pub optimized_model_cache: Option<PathBuf>,
    /// CPU: decode with the package's `vae_decoder_cpu`, whose wide 3x3 convolutions run as
    /// Winograd F(4x4, 3x3): same weights, images within one 8-bit level of `vae_decoder`'s,
    /// decoding about 15-20 % faster, at the cost of more activation memory while decoding
    /// (mid-size model at 512x512: +0.2 to +0.5 GB peak RSS). Off: `vae_decoder`. Ignored where
    /// the decoder runs on a GPU; an InvalidRequest error when the package has no such graph.
    pub winograd_vae: bool,
    /// CPU: decode with the package's `vae_decoder_int8`, whose high-resolution convolutions
    /// compute in int8 (written by `quantize_package.py --int8-vae`): decoding about 2x faster,
    /// at a cost in image quality that the exact decoders do not have (measured in
    /// docs/quantization.md, "int8 VAE decoder"). Off: `vae_decoder`. Ignored where the decoder
    /// runs on a GPU; an InvalidRequest error when the package has no such graph, or together
    /// with `winograd_vae`.
    pub int8_vae: bool,
    /// Decode images larger than a tile in overlapping tiles, and encode input pictures (image to
    /// image, inpainting, ControlNet conditions, editing references) larger than one the same way,
    /// as diffusers' `vae.enable_tiling()` does (same tiles, same blending: see [`VaeTiling`]): the
    /// VAE then needs one tile's activations instead of the whole image's (mid-size model, 512x512
    /// on the CPU: see docs/loading.md), costs the overlaps' extra arithmetic, and gives different
    /// pixels (the VAE normalises each tile on its own, visibly so on small tiles). Sizes that are not multiples
    /// of the VAE's scale factor, or a VAE decoder on TensorRT (whose engines serve their profile's
    /// sizes, not the tiles'), are `InvalidRequest` errors at load. `None` (the default): whole
    /// images.
    pub vae_tiling: Option<VaeTiling>,
    /// LoRA adapters merged into the transformer's weights at load time, each with its scale
    /// (see [`crate::lora`]); change them later with `Pipeline::set_loras`. Empty: none.
    pub loras: Vec<LoraSetting>,
    /// Run the denoising loop on the host (latents copied to and from the transformer's device
    /// every step) instead of the device-resident loop (`pipeline::device_loop`), which is
    /// the default. Both give the same latents; this is for comparison and diagnosis.
    pub host_denoise_loop: bool,
    /// The package's ControlNet (its name in the manifest's `controlnets`) to run from the
    /// start: its combined transformer + ControlNet graph is then the only transformer session
    /// ever created (no plain transformer loaded first, as with `Pipeline::set_controlnet`
    /// after loading). A name the package does not have, or a ControlNet that does not fit, is
    /// a `Package` error at load; together with `loras`, an `InvalidRequest` error.
    pub controlnet: Option<String>,
}

/// The most intra-op threads a graph may be given ([`LoadOptions::threads`]).
pub const MAX_THREADS: usize = 1024;

impl LoadOptions {
    /// Refuses settings no load can honour: `threads` outside 1..=1024 (ONNX Runtime crashed
    /// on 100000 and hung on 1025). Every load (pipelines, enhancers) checks it first.
    pub fn check(&self) -> Result<()> {
        if let Some(n) = self.threads {
            if n == 0 || n > MAX_THREADS {
                return Err(Error::invalid(format!(
                    "threads must be 1..={MAX_THREADS} (got {n}); leave unset for the default"
                )));
            }
        }
        Ok(())
    }

    /// Whether the CUDA arena grows by what is asked for (the sequential mode's smaller peak)
    /// rather than in powers of two.
    pub(crate) fn exact_gpu_arena(&self) -> bool {
        self.memory_mode == MemoryMode::Sequential
    }

    /// The session settings every graph starts from; stages adjust their own.
    pub(crate) fn session_settings(&self) -> SessionSettings {
        SessionSettings {
            intra_threads: self.threads,
            allow_cpu_fallback: self.allow_cpu_fallback,
            shares_weights: false,
            skip_prepacking: false,
            release_activations: false,
            optimized_cache: None,
            prebuilt_cpu_graph: None,
            initializers: ExternalInitializers::default(),
            exact_int8_products: false,
            declared_io: None,
        }
    }
}
