//! The manifest's `edit` section (docs/editing.md): what the editing (Omni) pipeline needs
//! besides its graphs: the SigLIP2 image processor's settings, the reference picture rules,
//! the prompt segments around each reference, and the pipeline's defaults.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::lora_table::LoraParameter;

use crate::limits::{check_guidance, MAX_INPUT_SIDE, MAX_SIGLIP_VALUES, MAX_STEPS};

/// The `edit` section.
#[derive(Debug, Clone, Deserialize)]
pub struct EditInfo {
    pub siglip: SiglipInfo,
    pub image_processor: SiglipProcessorSettings,
    pub reference: ReferenceRules,
    pub prompt_segments: PromptSegments,
    pub defaults: EditDefaults,
    /// Set when `transformer_omni.onnx` reads the transformer's weights from `transformer.onnx`'s
    /// files at fixed offsets (export.py's last step, `zimage_export/shared_weights.py`): the
    /// weights are stored once, and LoRAs merged into them reach edits too. Absent in packages
    /// whose Omni graph holds its own copy.
    #[serde(default)]
    pub transformer_weights: Option<SharedTransformerWeights>,
    /// The Omni graph's Linear weights by diffusers parameter name, as
    /// `transformer.lora_parameters` (export.py since 2026-12-03): LoRA keys on the modules
    /// only the Omni transformer has (its SigLIP embedder and refiner) are merged through it.
    #[serde(default)]
    pub omni_parameters: Option<BTreeMap<String, LoraParameter>>,
}

/// The transformer file the Omni graph reads its weights from.
#[derive(Debug, Clone, Deserialize)]
pub struct SharedTransformerWeights {
    /// `transformer.onnx`'s sha256 when the offsets were written: another file means other
    /// offsets, so the package is refused rather than run with the wrong bytes.
    pub sha256: String,
    pub shared_bytes: u64,
}

/// The SigLIP2 vision encoder's shape.
#[derive(Debug, Clone, Deserialize)]
pub struct SiglipInfo {
    /// Width of a vision token (the transformer's `siglip_feat_dim`).
    pub hidden_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
}

/// transformers' `Siglip2ImageProcessor` settings (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SiglipProcessorSettings {
    pub patch_size: usize,
    pub max_num_patches: usize,
    /// PIL filter: "bilinear", "bicubic", "lanczos" or "nearest".
    pub resample: String,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

impl SiglipProcessorSettings {
    /// transformers' defaults (patch 16, 256 patches, bilinear, mean = std = 0.5).
    pub fn transformers_defaults() -> Self {
        SiglipProcessorSettings {
            patch_size: 16,
            max_num_patches: 256,
            resample: "bilinear".into(),
            do_resize: true,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
        }
    }
}

/// diffusers' `Flux2ImageProcessor.check_image_input` limits and the VAE crop multiple.
#[derive(Debug, Clone, Deserialize)]
pub struct ReferenceRules {
    pub min_side: u32,
    pub max_aspect_ratio: f64,
    /// Larger references are first resized (Lanczos) to about this many pixels.
    pub max_area: u64,
    /// References are centre-cropped to multiples of this for the VAE.
    pub multiple: u32,
    pub max_images: usize,
}

/// Longest piece of an editing package's chat markup (`PromptSegments`' strings; Qwen3's are
/// tens of bytes). The instruction between them is bounded by `MAX_PROMPT_BYTES` on its own.
pub const MAX_SEGMENT_MARKUP_BYTES: usize = 64 << 10;

/// `ZImageOmniPipeline._encode_prompt`'s text segments for N >= 1 references: `first`,
/// N - 1 times `between`, `prompt_prefix + prompt + prompt_suffix`, `last`.
#[derive(Debug, Clone, Deserialize)]
pub struct PromptSegments {
    pub first: String,
    pub between: String,
    pub prompt_prefix: String,
    pub prompt_suffix: String,
    pub last: String,
    /// Without references (Omni-mode text-to-image) the prompt is one segment, between these
    /// (diffusers' template; packages exported before 2026-12-03 do not record them).
    #[serde(default = "no_image_prefix")]
    pub no_image_prefix: String,
    #[serde(default = "no_image_suffix")]
    pub no_image_suffix: String,
}

fn no_image_prefix() -> String {
    "<|im_start|>user\n".into()
}

fn no_image_suffix() -> String {
    "<|im_end|>\n<|im_start|>assistant\n".into()
}

impl PromptSegments {
    /// The N + 2 segments for `images` references around `prompt`; one for none.
    pub fn for_prompt(&self, prompt: &str, images: usize) -> Vec<String> {
        if images == 0 {
            return vec![format!("{}{prompt}{}", self.no_image_prefix, self.no_image_suffix)];
        }
        let mut segments = vec![self.first.clone()];
        segments.extend(std::iter::repeat_n(self.between.clone(), images.saturating_sub(1)));
        segments.push(format!("{}{prompt}{}", self.prompt_prefix, self.prompt_suffix));
        segments.push(self.last.clone());
        segments
    }
}

/// The pipeline's defaults (`ZImageOmniPipeline.__call__`).
#[derive(Debug, Clone, Deserialize)]
pub struct EditDefaults {
    pub num_inference_steps: usize,
    pub guidance_scale: f32,
    pub cfg_truncation: f32,
    pub max_sequence_length: usize,
}

impl EditInfo {
    /// Value checks (a hostile manifest is refused at load rather than overflowing later).
    /// `size_multiple`: what image sides must be multiples of (`Manifest::size_multiple`).
    pub fn check(
        &self,
        cap_feat_dim: usize,
        size_multiple: usize,
        transformer_sha256: &str,
    ) -> std::result::Result<(), String> {
        if let Some(shared) = &self.transformer_weights {
            if !shared.sha256.eq_ignore_ascii_case(transformer_sha256) {
                return Err(format!(
                    "transformer_omni.onnx reads the weights of another transformer.onnx (sha256 {}) at fixed \
                     offsets; re-export the package with export.py",
                    shared.sha256
                ));
            }
        }
        if let Some(table) = &self.omni_parameters {
            super::lora_table::check_table("edit.omni_parameters", table)?;
        }
        let s = &self.prompt_segments;
        for (name, text) in [
            ("first", &s.first),
            ("between", &s.between),
            ("prompt_prefix", &s.prompt_prefix),
            ("prompt_suffix", &s.prompt_suffix),
            ("last", &s.last),
            ("no_image_prefix", &s.no_image_prefix),
            ("no_image_suffix", &s.no_image_suffix),
        ] {
            if text.len() > MAX_SEGMENT_MARKUP_BYTES {
                return Err(format!(
                    "edit.prompt_segments.{name} is {} bytes; chat markup is at most {MAX_SEGMENT_MARKUP_BYTES}",
                    text.len()
                ));
            }
        }
        let p = &self.image_processor;
        if !matches!(p.resample.as_str(), "bilinear" | "bicubic" | "lanczos" | "nearest") {
            return Err(format!("edit.image_processor.resample {:?} is not supported", p.resample));
        }
        if p.patch_size == 0 || p.patch_size > 1024 || p.max_num_patches == 0 || p.max_num_patches > 1 << 16 {
            return Err("edit.image_processor: patch_size must be 1..=1024 and max_num_patches 1..=65536".into());
        }
        // The processor's output is max_num_patches x patch_size^2 x 3 floats per reference;
        // SigLIP2's is 256 x 768. Each bound alone still allowed 824 GB.
        let values = p.max_num_patches as u64 * (p.patch_size as u64).pow(2) * 3;
        if values > MAX_SIGLIP_VALUES {
            return Err(format!(
                "edit.image_processor: max_num_patches x patch_size^2 x 3 is {values} values per reference, above {MAX_SIGLIP_VALUES}"
            ));
        }
        if p.patch_size != self.siglip.patch_size || self.siglip.num_channels != 3 {
            return Err("edit: the processor's patch_size must equal siglip.patch_size, with 3 channels".into());
        }
        if p.image_std.iter().any(|&s| s == 0.0 || !s.is_finite())
            || p.image_mean.iter().any(|m| !m.is_finite())
            || !p.rescale_factor.is_finite()
        {
            return Err("edit.image_processor: image_std must be non-zero, every value finite".into());
        }
        let r = &self.reference;
        if r.multiple == 0 || r.multiple > 1024 || r.min_side < r.multiple || r.max_images == 0 || r.max_images > 64 {
            return Err("edit.reference: multiple 1..=1024, min_side >= multiple, max_images 1..=64".into());
        }
        if r.max_aspect_ratio.is_nan() || r.max_aspect_ratio < 1.0 || r.max_area == 0 || r.max_area > 1 << 26 {
            return Err("edit.reference: max_aspect_ratio >= 1 and max_area 1..=2^26".into());
        }
        // Rules no reference could meet would load, then refuse every request.
        if r.min_side > MAX_INPUT_SIDE {
            return Err(format!(
                "edit.reference.min_side {} is above the largest input side, {MAX_INPUT_SIDE}",
                r.min_side
            ));
        }
        if size_multiple == 0 || !(r.multiple as usize).is_multiple_of(size_multiple) {
            return Err(format!(
                "edit.reference.multiple {} must be a multiple of {size_multiple} (vae.scale_factor x \
                 transformer.patch_size): references are cropped to it and encoded as image latents",
                r.multiple
            ));
        }
        let d = &self.defaults;
        if d.num_inference_steps == 0 || d.num_inference_steps > MAX_STEPS as usize || d.max_sequence_length == 0 {
            return Err(format!("edit.defaults: num_inference_steps must be 1..={MAX_STEPS}, max_sequence_length > 0"));
        }
        // The bounds a request's settings meet: a package cannot recommend what it would refuse.
        check_guidance(d.guidance_scale, 0.0, d.cfg_truncation).map_err(|e| format!("edit.defaults: {e}"))?;
        if self.siglip.hidden_size == 0 || self.siglip.hidden_size > 1 << 20 || cap_feat_dim == 0 {
            return Err("edit.siglip.hidden_size must be 1..=2^20".into());
        }
        Ok(())
    }
}
