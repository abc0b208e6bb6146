//! # zimage
//!
//! Z-Image-Turbo text-to-image on ONNX Runtime: the same image as diffusers for the same
//! seed, from one native library.
//!
//! The pipeline, stage by stage:
//! - [`manifest`]: the model package a pipeline loads (`docs/package-format.md`);
//! - [`runtime`]: finding ONNX Runtime and creating sessions on CPU, CUDA or TensorRT;
//! - [`gpu`]: TensorRT profiles and engine caches, CUDA settings;
//! - [`text_encoding`]: Qwen3 chat template, tokenizer, text encoder → caption features;
//! - [`noise`]: seeded Gaussian noise identical to `torch.randn` on CPU;
//! - [`scheduler`]: the flow-matching Euler schedule;
//! - [`denoising`]: the transformer loop with classifier-free guidance;
//! - [`vae`]: latents to pixels and back;
//! - `image_to_image`: starting latents for image-to-image and inpainting;
//! - [`image_io`]: RGB8 conversion and PNG files;
//! - [`pipeline`]: [`Pipeline`], tying them together;
//! - [`prompt_enhancer`]: rewriting prompts locally with Qwen3 ([`PromptEnhancer`]), picking
//!   tokens with [`sampling`].
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

pub mod cancel;
pub mod denoising;
pub mod error;
pub mod gpu;
pub mod image_io;
mod image_to_image;
mod kv_decoder;
pub mod manifest;
pub mod noise;
pub mod pipeline;
pub mod prompt_enhancer;
pub mod runtime;
pub mod sampling;
pub mod scheduler;
mod session;
pub mod text_encoding;
pub mod vae;

pub use cancel::CancelHandle;
pub use denoising::Guidance;
pub use error::{Error, ErrorKind, Result};
pub use gpu::{GpuOptions, ResolutionRange, TensorRtPrecision, Tf32};
pub use image_io::{GrayImage, RgbImage};
pub use manifest::Manifest;
pub use pipeline::{
    GenerateRequest, Generation, InitImage, LoadOptions, Pipeline, Progress, Prompt, Providers, Timings,
    MAX_IMAGES_PER_REQUEST, MAX_STEPS,
};
pub use prompt_enhancer::{EnhanceOptions, Enhancement, FinishReason, PromptEnhancer, TokenEvent};
pub use runtime::Device;
pub use sampling::{RandomSampling, Sampling};
pub use session::MemoryMode;
pub use text_encoding::{PromptEmbedding, TokenizedPrompt};

/// The zimage version (from Cargo).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
