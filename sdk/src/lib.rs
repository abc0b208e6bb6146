//! # zimage
//!
//! Z-Image-Turbo text-to-image on ONNX Runtime: the same image as diffusers for the same
//! seed, from one native library.
//!
//! The crate, by layer (each depends only on the ones above it):
//! - [`error`], [`limits`]: the error type and the caps on requests;
//! - [`package`]: the model package format: manifest, [`GraphKind`], [`Precision`], files;
//! - [`runtime`]: ONNX Runtime: the library, devices and GPU options, sessions, one run's
//!   context and cancellation;
//! - `model`: the networks (text encoder, transformer, VAE), the only place that knows a
//!   graph's input and output names;
//! - [`enhancer`]: the prompt enhancer ([`PromptEnhancer`]): a Qwen3 decoder with a KV cache,
//!   token sampling;
//! - [`pipeline`]: [`Pipeline`]: requests and their checks, prompts, noise, schedule, start
//!   strategies (text-to-image, image-to-image, inpainting), the denoising loop;
//! - [`image_io`]: RGB8 conversion, PNG and input image files.
//!
//! Where new work goes: a graph kind in `package::graph` (the compiler then lists what must
//! handle it); its network in `model`; a conditioning input or start strategy in `pipeline`;
//! a load-time option in [`LoadOptions`]; a request field in [`GenerateRequest`].
//!
//! ```no_run
//! use zimage::{GenerateRequest, LoadOptions, Pipeline};
//! let pipeline = Pipeline::load("models/tiny-zimage", &LoadOptions::default())?;
//! let mut request = GenerateRequest::new("a red fox in the snow");
//! request.width = 64;
//! request.height = 64;
//! request.seed = Some(42);
//! let result = pipeline.generate(&request, None)?;
//! zimage::image_io::write_png("fox.png".as_ref(), &result.images[0], &[])?;
//! # Ok::<(), zimage::Error>(())
//! ```

pub mod control_preprocess;
pub mod enhancer;
pub mod error;
pub mod image_io;
pub mod limits;
mod load_options;
pub mod lora;
mod model;
pub mod package;
pub mod pil_resize;
pub mod pipeline;
mod random;
pub mod runtime;

pub use control_preprocess::ControlPreprocess;
pub use enhancer::sampling::{RandomSampling, Sampling};
pub use enhancer::{
    default_system_prompt, EnhanceOptions, EnhanceTimings, Enhancement, FinishReason, PromptEnhancer, TokenEvent,
    DEFAULT_MAX_CONTEXT_TOKENS, MAX_CONTEXT_TOKENS, MAX_NEW_TOKENS, PREFILL_CHUNK,
};
pub use error::{Error, ErrorKind, Result};
pub use image_io::{GrayImage, RgbImage};
pub use limits::{MAX_IMAGES_PER_REQUEST, MAX_PROMPT_BYTES, MAX_REQUEST_PIXELS, MAX_STEPS};
pub use load_options::{LoadOptions, MAX_THREADS};
pub use lora::{LoraAdapter, LoraFile, LoraSetting};
pub use model::siglip_processor::{siglip_inputs, SiglipInputs};
pub use model::text_encoder::{PromptEmbedding, TokenizedPrompt};
pub use model::vae_tiling::VaeTiling;
pub use package::generation_defaults::{GenerationDefaults, Variant};
pub use package::graph::GraphKind;
pub use package::quantization::{ActivationQuantization, QuantizationInfo, QuantizedLmHead, WeightQuantization};
pub use package::scheduler_config::SchedulerConfig;
pub use package::{Manifest, Precision};
pub use pipeline::control::{ControlCondition, ControlInpaint};
pub use pipeline::edit::EditRequest;
pub use pipeline::noise::TorchGenerator;
pub use pipeline::parameters::{
    control_parameters, edit_parameters, image_parameters, lora_records, ControlNames, InputNames, ReferenceRecord,
};
pub use pipeline::request::{
    GenerateRequest, Generation, HostTraffic, InitImage, Progress, Prompt, Providers, Timings,
};
pub use pipeline::scheduler::Schedule;
pub use pipeline::Pipeline;
pub use runtime::cuda_graph::CudaGraphs;
pub use runtime::device::Device;
pub use runtime::gpu::{GpuOptions, ResolutionRange, TensorRtOptions, TensorRtPrecision, Tf32};
pub use runtime::graph::MemoryMode;
pub use runtime::run_context::CancelHandle;

/// The zimage version (from Cargo).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
