//! GPU settings: TensorRT engine caches and optimisation profiles, CUDA memory limits.
//!
//! TensorRT builds one engine per graph for a range of input shapes. Declaring that range up
//! front (from the image sizes and image counts the caller will use) means changing the size
//! within it never triggers a rebuild; without explicit profiles TensorRT rebuilds on every
//! new shape. Engines and timing caches are kept in a folder per package so a second start
//! loads them instead of building (minutes for the 6B transformer).

use std::path::{Path, PathBuf};

use super::cuda_graph::CudaGraphs;
use crate::error::{Error, Result};
use crate::limits::MAX_IMAGES_PER_REQUEST;
use crate::package::files::sha256_hex;
use crate::package::graph::{GraphEntry, GraphKind};
use crate::package::Manifest;

/// Precision TensorRT may use inside its engines (inputs and outputs stay float32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TensorRtPrecision {
    Fp32,
    Fp16,
    /// The default: Z-Image is trained in bf16, and fp16 activations can overflow into NaN
    /// (black images). Needs an Ampere or newer GPU; use `Fp32` on older ones.
    #[default]
    Bf16,
}

/// When CUDA may run float32 work in TF32 (10-bit mantissa, much faster on Ampere and later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tf32 {
    /// PyTorch's defaults, so float32 packages give the reference's image: TF32 for the VAE's
    /// convolutions (cuDNN's `allow_tf32` is on in PyTorch), full float32 for the text encoder
    /// and the transformer (PyTorch's float32 matmuls). ONNX Runtime has one switch per session,
    /// so the VAE's few attention matmuls use TF32 too.
    #[default]
    LikePyTorch,
    /// Full float32 everywhere.
    Off,
    /// TF32 in every graph (fastest; the transformer's results drift from the reference's).
    On,
}

impl Tf32 {
    /// Whether the session of a graph of this kind may use TF32.
    pub fn for_graph(self, graph: GraphKind) -> bool {
        match self {
            Tf32::LikePyTorch => graph.is_vae(),
            Tf32::Off => false,
            Tf32::On => true,
        }
    }
}

/// Image sizes (width, height in pixels) an engine must serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolutionRange {
    pub min: (u32, u32),
    pub opt: (u32, u32),
    pub max: (u32, u32),
}

impl Default for ResolutionRange {
    fn default() -> Self {
        ResolutionRange { min: (512, 512), opt: (1024, 1024), max: (1536, 1536) }
    }
}

/// Settings for graphs that run on a GPU (ignored on the CPU).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct GpuOptions {
    /// Cap on the CUDA memory arena, in bytes.
    pub cuda_memory_limit: Option<usize>,
    /// Where CUDA may use TF32 for float32 work (fp16 graphs are unaffected). Default: like
    /// PyTorch (the VAE's convolutions only).
    pub cuda_tf32: Tf32,
    /// Engines, caches and optimisation profiles for graphs that run on TensorRT.
    pub tensorrt: TensorRtOptions,
    /// CUDA graph capture of the transformer's denoising calls where it is safe (see
    /// [`crate::runtime::cuda_graph`]); `Pipeline::cuda_graph_fallback` says why not when not.
    pub cuda_graphs: CudaGraphs,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            cuda_memory_limit: None,
            cuda_tf32: Tf32::LikePyTorch,
            tensorrt: TensorRtOptions::default(),
            cuda_graphs: CudaGraphs::default(),
        }
    }
}

/// TensorRT's engines: where they are cached, their precision, and the shapes they serve.
///
/// Build it from `Default` and set the fields that differ:
/// ```
/// let mut trt = zimage::TensorRtOptions::default();
/// trt.max_images = 4;
/// trt.resolutions.max = (2048, 2048);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TensorRtOptions {
    /// Where TensorRT keeps engines and timing caches; `None` = `$XDG_CACHE_HOME/zimage/tensorrt`
    /// (or `~/.cache/zimage/tensorrt`).
    pub cache_dir: Option<PathBuf>,
    pub precision: TensorRtPrecision,
    pub resolutions: ResolutionRange,
    /// Most images per request the engines are built for (doubled under guidance).
    pub max_images: u32,
    /// Whether requests will use classifier-free guidance (batch of 2 per image).
    pub guidance: bool,
    /// Caption tokens the profiles optimise for (the maximum is the package's limit).
    pub typical_caption_tokens: u32,
}

impl Default for TensorRtOptions {
    fn default() -> Self {
        TensorRtOptions {
            cache_dir: None,
            precision: TensorRtPrecision::default(),
            resolutions: ResolutionRange::default(),
            max_images: 1,
            guidance: false,
            typical_caption_tokens: 128,
        }
    }
}

/// TensorRT optimisation profile of one graph, in the provider's `name:AxBxC,...` syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeProfile {
    pub min: String,
    pub opt: String,
    pub max: String,
}

impl TensorRtOptions {
    /// Checks the declared ranges against the package's size rules and limits.
    pub fn check(&self, manifest: &Manifest) -> Result<()> {
        let r = &self.resolutions;
        let multiple = manifest.size_multiple() as u32;
        for (label, (w, h)) in [("min", r.min), ("opt", r.opt), ("max", r.max)] {
            if w == 0 || h == 0 || w % multiple != 0 || h % multiple != 0 {
                return Err(Error::invalid(format!(
                    "TensorRT {label} resolution {w}x{h}: sides must be positive multiples of {multiple}"
                )));
            }
            if w as usize > manifest.max_image_width() || h as usize > manifest.max_image_height() {
                return Err(Error::invalid(format!("TensorRT {label} resolution {w}x{h} exceeds the model's limit")));
            }
        }
        let ordered = |a: (u32, u32), b: (u32, u32)| a.0 <= b.0 && a.1 <= b.1;
        if !ordered(r.min, r.opt) || !ordered(r.opt, r.max) {
            return Err(Error::invalid("TensorRT resolutions must satisfy min <= opt <= max on both sides"));
        }
        if self.max_images == 0 || self.max_images > MAX_IMAGES_PER_REQUEST {
            return Err(Error::invalid(format!("max_images must be 1..={MAX_IMAGES_PER_REQUEST}")));
        }
        if self.typical_caption_tokens == 0
            || self.typical_caption_tokens as usize > manifest.transformer.max_caption_tokens
        {
            return Err(Error::invalid("typical_caption_tokens must be 1..=the model's caption limit"));
        }
        Ok(())
    }

    /// Whether a request of this size and batch fits the engines built from these options.
    pub fn covers(&self, width: u32, height: u32, images: u32) -> bool {
        let r = &self.resolutions;
        (r.min.0..=r.max.0).contains(&width) && (r.min.1..=r.max.1).contains(&height) && images <= self.max_images
    }

    /// The profile of a graph, or `None` for a graph TensorRT does not serve: the enhancer's
    /// decoder, whose cache grows every step (a new shape each call would rebuild engines), so
    /// it runs on CUDA instead.
    pub fn profile(&self, graph: GraphKind, manifest: &Manifest) -> Option<ShapeProfile> {
        let f = manifest.vae.scale_factor as u32;
        let c = manifest.vae.latent_channels;
        let latent = |(w, h): (u32, u32)| (h / f, w / f);
        let r = &self.resolutions;
        let max_caption = manifest.transformer.max_caption_tokens.min(manifest.text_encoder.max_sequence_length);
        let opt_caption = (self.typical_caption_tokens as usize).min(max_caption);
        let max_batch = self.max_images as usize * if self.guidance { 2 } else { 1 };
        let opt_batch = if self.guidance { 2 } else { 1 };
        let profile = match graph {
            GraphKind::TextEncoder => {
                let s = |n: usize| format!("input_ids:1x{n},attention_mask:1x{n}");
                ShapeProfile { min: s(1), opt: s(opt_caption), max: s(max_caption) }
            }
            GraphKind::Transformer => {
                let s = |b: usize, (h, w): (u32, u32), l: usize| {
                    let d = manifest.transformer.cap_feat_dim;
                    format!("latents:{b}x{c}x{h}x{w},timestep:{b},cap_feats:{b}x{l}x{d},cap_mask:{b}x{l}")
                };
                ShapeProfile {
                    min: s(1, latent(r.min), 1),
                    opt: s(opt_batch, latent(r.opt), opt_caption),
                    max: s(max_batch, latent(r.max), max_caption),
                }
            }
            GraphKind::VaeDecoder | GraphKind::VaeDecoderCpu | GraphKind::VaeDecoderInt8 => {
                let s = |(h, w): (u32, u32)| format!("latents:1x{c}x{h}x{w}");
                ShapeProfile { min: s(latent(r.min)), opt: s(latent(r.opt)), max: s(latent(r.max)) }
            }
            GraphKind::VaeEncoder => {
                let s = |(w, h): (u32, u32)| format!("image:1x3x{h}x{w}");
                ShapeProfile { min: s(r.min), opt: s(r.opt), max: s(r.max) }
            }
            // Editing graphs: TensorRT builds them with dynamic shapes (no declared profile).
            GraphKind::TextDecoder | GraphKind::VisionEncoder | GraphKind::TransformerOmni => return None,
        };
        Some(profile)
    }

    /// The engine/timing cache folder for one graph: keyed by the sha256 of the graph entry
    /// actually loaded (so a different package, precision or graph variant never picks up a
    /// stale engine) and the profile and precision (which change the engine). ONNX Runtime's
    /// TensorRT provider adds the GPU architecture to the engine file names itself.
    pub fn cache_dir_for(&self, graph: GraphKind, entry: &GraphEntry, profile: &ShapeProfile) -> PathBuf {
        self.cache_dir_for_weights(graph, entry, profile, "")
    }

    /// [`cache_dir_for`](Self::cache_dir_for) for a graph whose weights are changed at load
    /// time: `weights_key` names the change (the LoRA set: files by sha256 and scales), so each
    /// set has its own engines (a switch builds, or finds, that set's engine). An empty key is
    /// the package's own weights, the same folder as `cache_dir_for`.
    pub fn cache_dir_for_weights(
        &self,
        graph: GraphKind,
        entry: &GraphEntry,
        profile: &ShapeProfile,
        weights_key: &str,
    ) -> PathBuf {
        let base = self.cache_dir.clone().unwrap_or_else(default_cache_dir);
        let mut key = format!("{}|{}|{}|{}|{:?}", entry.sha256, profile.min, profile.opt, profile.max, self.precision);
        if !weights_key.is_empty() {
            key.push_str("|weights:");
            key.push_str(weights_key);
        }
        let digest = sha256_hex(key.as_bytes());
        base.join(format!("{graph}-{}", &digest[..16]))
    }
}

fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("zimage").join("tensorrt")
}
