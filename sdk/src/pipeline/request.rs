//! What a generation is asked for and what it gives back: requests, prompts, input pictures,
//! progress, results and their timings.

use std::time::Duration;

use ndarray::Array4;

use super::control::ControlCondition;
use crate::image_io::{GrayImage, RgbImage};
use crate::model::text_encoder::{PromptEmbedding, TokenizedPrompt};
use crate::package::generation_defaults::GenerationDefaults;
use crate::package::Manifest;
use crate::runtime::device::Device;

/// A prompt given as text, or already encoded with [`Pipeline::encode_prompt`](crate::Pipeline::encode_prompt).
#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    Embedded(PromptEmbedding),
}

impl From<&str> for Prompt {
    fn from(s: &str) -> Self {
        Prompt::Text(s.to_string())
    }
}

impl From<String> for Prompt {
    fn from(s: String) -> Self {
        Prompt::Text(s)
    }
}

impl From<PromptEmbedding> for Prompt {
    fn from(e: PromptEmbedding) -> Self {
        Prompt::Embedded(e)
    }
}

/// One generation. `Default` is Z-Image-Turbo's recommended setting: 1024x1024, 8 steps,
/// no guidance, a random seed. New fields may be added (conditioning, adapters), so build it
/// with [`GenerateRequest::new`] or `Default` and set the fields that differ:
/// ```
/// let mut request = zimage::GenerateRequest::new("a red fox in the snow");
/// request.width = 768;
/// request.seed = Some(42);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GenerateRequest {
    pub prompt: Prompt,
    /// Used only with guidance (`guidance_scale > 0`); `None` means the empty prompt.
    pub negative_prompt: Option<Prompt>,
    pub width: u32,
    pub height: u32,
    /// 1..=[`MAX_STEPS`](crate::limits::MAX_STEPS).
    pub steps: u32,
    /// Classifier-free guidance scale, 0..=[`MAX_GUIDANCE_SCALE`](crate::limits::MAX_GUIDANCE_SCALE)
    /// (100); 0 turns guidance off.
    pub guidance_scale: f32,
    /// 0 = off; otherwise the guided prediction's norm is capped at this factor times the
    /// conditional one's. At most [`MAX_CFG_NORMALIZATION`](crate::limits::MAX_CFG_NORMALIZATION) (100).
    pub cfg_normalization: f32,
    /// Guidance stops at steps whose normalised time exceeds this (1.0 or more = never stops);
    /// finite and not negative.
    pub cfg_truncation: f32,
    /// `None` draws a random seed, reported in the result.
    pub seed: Option<u64>,
    /// Images generated from this prompt (one noise tensor for all of them, as diffusers).
    pub count: u32,
    /// `None` uses the package's default (512).
    pub max_sequence_length: Option<usize>,
    /// Starting latents `[count, C, h, w]` instead of seeded noise.
    pub latents: Option<Array4<f32>>,
    /// Return the final latents too.
    pub return_latents: bool,
    /// Image-to-image or inpainting: start from this picture instead of pure noise.
    pub init_image: Option<InitImage>,
    /// ControlNet conditioning (text-to-image or ControlNet inpainting); needs a ControlNet
    /// attached to the pipeline. Not together with `init_image`.
    pub control: Option<ControlCondition>,
    /// Previews passed to the progress callback ([`Progress::preview`]): this many, at evenly
    /// spaced steps before the last, at most one per step (a larger number means every step).
    /// Each costs one VAE decode. 0 (the default) = none; ignored without a progress callback.
    pub previews: u32,
}

/// The picture an image-to-image or inpainting request starts from.
#[derive(Debug, Clone)]
pub struct InitImage {
    /// Any size: a picture of another size than the request's is resized to it as diffusers'
    /// image processor resizes it (Pillow's Lanczos, `image_io::resize_rgb`).
    pub image: RgbImage,
    /// Inpainting mask: white (>= 128 after binarising) = repaint. Resized to the request's
    /// size when it has another, as diffusers' mask processor does (`image_io::resize_gray`).
    pub mask: Option<GrayImage>,
    /// How much of the picture is re-generated, 0..=1 (1 = all of it).
    pub strength: f64,
}

impl InitImage {
    /// diffusers' default strength for image-to-image.
    pub const DEFAULT_STRENGTH: f64 = 0.6;
    /// diffusers' default strength for inpainting.
    pub const DEFAULT_INPAINT_STRENGTH: f64 = 1.0;

    /// Image-to-image from `image`, at diffusers' default strength (set `strength` to change it).
    pub fn image_to_image(image: RgbImage) -> InitImage {
        InitImage { image, mask: None, strength: Self::DEFAULT_STRENGTH }
    }

    /// Inpainting: repaint where `mask` is white, at diffusers' default strength.
    pub fn inpaint(image: RgbImage, mask: GrayImage) -> InitImage {
        InitImage { image, mask: Some(mask), strength: Self::DEFAULT_INPAINT_STRENGTH }
    }
}

impl Default for GenerateRequest {
    fn default() -> Self {
        GenerateRequest {
            prompt: Prompt::Text(String::new()),
            negative_prompt: None,
            width: 1024,
            height: 1024,
            steps: 8,
            guidance_scale: 0.0,
            cfg_normalization: 0.0,
            cfg_truncation: 1.0,
            seed: None,
            count: 1,
            max_sequence_length: None,
            latents: None,
            return_latents: false,
            init_image: None,
            control: None,
            previews: 0,
        }
    }
}

impl GenerateRequest {
    /// A request with Z-Image-Turbo's settings ([`Default`]); for a package that recommends
    /// others (the base model), use [`GenerateRequest::for_package`].
    pub fn new(prompt: impl Into<Prompt>) -> Self {
        GenerateRequest { prompt: prompt.into(), ..Default::default() }
    }

    /// A request with the package's recommended steps and guidance (its manifest's
    /// `generation_defaults`; Turbo's when it has none): what front ends start from before
    /// applying what the user set.
    pub fn for_package(manifest: &Manifest, prompt: impl Into<Prompt>) -> Self {
        Self::with_defaults(&manifest.generation_defaults, prompt)
    }

    /// A request with these recommended steps, guidance and CFG settings.
    pub fn with_defaults(defaults: &GenerationDefaults, prompt: impl Into<Prompt>) -> Self {
        GenerateRequest {
            steps: defaults.steps,
            guidance_scale: defaults.guidance_scale,
            cfg_normalization: defaults.cfg_normalization,
            cfg_truncation: defaults.cfg_truncation,
            ..GenerateRequest::new(prompt)
        }
    }
}

/// Where a generation is, passed to the progress callback after every denoising step.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Progress {
    /// Steps done (1..=`total_steps`), counted over the steps that run (image-to-image runs
    /// fewer than the request's `steps`).
    pub step: usize,
    pub total_steps: usize,
    pub elapsed: Duration,
    /// At the steps a request's `previews` asked for: one picture per image of the request,
    /// decoded from the model's current estimate of the finished latents (what the image would
    /// be if denoising stopped here; blurry early, close to the result late). `None` otherwise.
    pub preview: Option<Vec<RgbImage>>,
}

/// Time spent in each stage of one generation.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Timings {
    pub tokenize: Duration,
    pub text_encode: Duration,
    pub denoise_steps: Vec<Duration>,
    pub vae_decode: Duration,
    /// Decoding the previews the request asked for (also inside `total`).
    pub previews: Duration,
    pub total: Duration,
    /// Time inside ONNX Runtime calls, summed over all stages.
    pub onnx_runtime: Duration,
    /// What the denoising loop copied between host and device; `None` when the host loop ran
    /// (`LoadOptions::host_denoise_loop`).
    pub host_traffic: Option<HostTraffic>,
}

/// Bytes the denoising loop copied between host and device memory, by the copies its code
/// path issues (uploads, downloads). Copies ONNX Runtime makes inside a graph call (for nodes
/// it places on the CPU) are not seen here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HostTraffic {
    /// Before the first step: latents, caption features and masks, per-step tables.
    pub setup_bytes: u64,
    /// The most copied by any one step: 0 for runs of up to 8 steps without previews; 8 (the
    /// non-finite flag, read every 8 steps) for longer ones; more with previews (the latents).
    pub max_step_bytes: u64,
    /// After the last step: the latents and the non-finite flag.
    pub final_bytes: u64,
}

/// The result of [`Pipeline::generate`](crate::Pipeline::generate).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Generation {
    pub images: Vec<RgbImage>,
    /// `[count, C, h, w]` before VAE scaling, when requested.
    pub latents: Option<Array4<f32>>,
    /// The seed used (drawn at random when the request had none).
    pub seed: u64,
    pub prompt_tokens: TokenizedPrompt,
    pub negative_prompt_tokens: Option<TokenizedPrompt>,
    /// The rewritten prompt the images were made from, when the prompt was enhanced.
    pub enhanced_prompt: Option<String>,
    pub timings: Timings,
    /// How the package's weights are quantized (`int8 rtn, block 32`), when they are: the
    /// images then differ slightly from the float package's (docs/quantization.md).
    pub quantization: Option<String>,
    /// The tiles the images were decoded in (`LoadOptions::vae_tiling`), when they were larger
    /// than one: the pixels then differ slightly from a whole-image decode's.
    pub vae_tiling: Option<crate::model::vae_tiling::VaeTiling>,
    /// `Some("int8")` when the images were decoded by the package's int8 VAE decoder
    /// (`LoadOptions::int8_vae`): the pixels then differ visibly more than quantized weights
    /// alone make them (docs/quantization.md). `None`: an exact decoder.
    pub vae_decoder: Option<String>,
}

impl Generation {
    /// True when the prompt was longer than `max_sequence_length` and its end was dropped.
    pub fn prompt_truncated(&self) -> bool {
        self.prompt_tokens.truncated()
    }
}

/// Which provider runs each graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Providers {
    pub text_encoder: Device,
    pub transformer: Device,
    pub vae_decoder: Device,
    pub vae_encoder: Device,
}

impl GenerateRequest {
    /// This request with its pictures (init image and mask, control image, ControlNet
    /// inpainting picture and mask) at the request's width and height: those of another size
    /// resized as diffusers' image and mask processors resize them (Pillow's Lanczos), then the
    /// control map made by the condition's `preprocess`. Borrowed unchanged when every picture
    /// already has the size and there is nothing to preprocess. Check the request first (a
    /// resize allocates the target).
    pub(crate) fn pictures_at_size(&self) -> crate::error::Result<std::borrow::Cow<'_, GenerateRequest>> {
        use crate::control_preprocess::ControlPreprocess;
        use crate::image_io::{resize_gray, resize_rgb};
        let size = (self.width, self.height);
        let rgb_fits = |p: &RgbImage| (p.width, p.height) == size;
        let gray_fits = |p: &GrayImage| (p.width, p.height) == size;
        let init_fits =
            self.init_image.as_ref().is_none_or(|i| rgb_fits(&i.image) && i.mask.as_ref().is_none_or(gray_fits));
        let control_fits = self.control.as_ref().is_none_or(|c| {
            rgb_fits(&c.image)
                && c.preprocess == ControlPreprocess::None
                && c.inpaint.as_ref().is_none_or(|i| rgb_fits(&i.image) && gray_fits(&i.mask))
        });
        if init_fits && control_fits {
            return Ok(std::borrow::Cow::Borrowed(self));
        }
        let (width, height) = size;
        let mut resized = self.clone();
        if let Some(init) = &mut resized.init_image {
            init.image = resize_rgb(&init.image, width, height)?;
            if let Some(mask) = &mut init.mask {
                *mask = resize_gray(mask, width, height)?;
            }
        }
        if let Some(control) = &mut resized.control {
            control.image = control.preprocess.apply(&resize_rgb(&control.image, width, height)?)?;
            control.preprocess = ControlPreprocess::None;
            if let Some(inpaint) = &mut control.inpaint {
                inpaint.image = resize_rgb(&inpaint.image, width, height)?;
                inpaint.mask = resize_gray(&inpaint.mask, width, height)?;
            }
        }
        Ok(std::borrow::Cow::Owned(resized))
    }
}
