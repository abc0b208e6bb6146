//! The generation parameters stored with an image (PNG text chunks): one list, so that every
//! front end (the `zimage` command, the server) records the same keys in the same order and
//! writes the same bytes for the same generation.

use std::path::Path;

use super::request::{GenerateRequest, Generation, Prompt};
use crate::lora::LoraSetting;

/// How the front end names the request's input pictures (a file path, an upload's file name).
/// Recorded only when the request has an input picture (and a mask).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InputNames {
    pub init_image: String,
    pub mask: String,
}

/// The parameters of image `index` of `generation`, made from `request` with the package in
/// `model`: prompt (the rewritten one when enhanced, then the original), negative prompt, seed,
/// steps, size, guidance and CFG settings, batch size and index, model, software, and where set
/// the package's quantization, the VAE tiling, the sequence length, the LoRA adapters merged into the transformer (`loras`, see
/// [`lora_records`]) and the input pictures with their strength.
pub fn image_parameters(
    request: &GenerateRequest,
    generation: &Generation,
    index: usize,
    model: &Path,
    loras: &[LoraSetting],
    inputs: &InputNames,
) -> Vec<(&'static str, String)> {
    let text_of = |prompt: Option<&Prompt>| match prompt {
        Some(Prompt::Text(text)) => text.clone(),
        _ => String::new(),
    };
    let prompt = text_of(Some(&request.prompt));
    let mut text = vec![
        ("prompt", generation.enhanced_prompt.clone().unwrap_or_else(|| prompt.clone())),
        ("negative_prompt", text_of(request.negative_prompt.as_ref())),
        ("seed", generation.seed.to_string()),
        ("steps", request.steps.to_string()),
        ("size", format!("{}x{}", request.width, request.height)),
        ("guidance", request.guidance_scale.to_string()),
        ("cfg_normalization", request.cfg_normalization.to_string()),
        ("cfg_truncation", request.cfg_truncation.to_string()),
        // An image is reproduced from the seed only together with the batch it came from.
        ("count", request.count.to_string()),
        ("batch_index", index.to_string()),
        ("model", model.display().to_string()),
        ("software", format!("zimage {}", env!("CARGO_PKG_VERSION"))),
    ];
    push_weights_and_decoding(generation, &mut text);
    if generation.enhanced_prompt.is_some() {
        text.push(("original_prompt", prompt));
    }
    if let Some(n) = request.max_sequence_length {
        text.push(("max_sequence_length", n.to_string()));
    }
    if !loras.is_empty() {
        text.push(("loras", lora_records(loras).to_string()));
    }
    if let Some(init) = &request.init_image {
        text.push(("init_image", inputs.init_image.clone()));
        text.push(("strength", init.strength.to_string()));
        if init.mask.is_some() {
            text.push(("mask", inputs.mask.clone()));
        }
    }
    text
}

/// Each adapter as `{"file", "sha256", "scale"}` (the file name only: paths are
/// machine-specific), in the order they are merged.
pub fn lora_records(loras: &[LoraSetting]) -> serde_json::Value {
    serde_json::Value::Array(
        loras
            .iter()
            .map(|l| {
                // The shortest decimal that reads back as the f32 (0.7, not 0.699999988...).
                let scale = l.scale.to_string().parse::<f64>().unwrap_or(f64::from(l.scale));
                serde_json::json!({"file": l.adapter.file_name(), "sha256": l.adapter.sha256(), "scale": scale})
            })
            .collect(),
    )
}

/// A reference picture of an edit as recorded with its images: the file name (no folder:
/// paths are machine-specific) and the sha256 of the file's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceRecord {
    pub file: String,
    pub sha256: String,
}

impl ReferenceRecord {
    /// The record of a picture read from `name` (a path or an upload's name) with `bytes`.
    pub fn new(name: &str, bytes: &[u8]) -> Self {
        use sha2::Digest;
        let file = Path::new(name).file_name().map_or_else(|| name.to_string(), |f| f.to_string_lossy().into_owned());
        let sha256 = sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        ReferenceRecord { file, sha256 }
    }
}

/// The parameters of image `index` of an edit: the instruction (the rewritten one when
/// enhanced, then the original), negative prompt, the references (`[{"file", "sha256"}]` in
/// order), seed, the steps / guidance / size actually used (the package's defaults where the
/// request left them unset), batch size and index, model and software, and the LoRA adapters
/// merged (`loras`, as for generations) when there are any.
pub fn edit_parameters(
    request: &super::edit::EditRequest,
    generation: &Generation,
    index: usize,
    model: &Path,
    defaults: &crate::package::edit::EditDefaults,
    references: &[ReferenceRecord],
    loras: &[LoraSetting],
) -> Vec<(&'static str, String)> {
    let refs: Vec<serde_json::Value> =
        references.iter().map(|r| serde_json::json!({"file": r.file, "sha256": r.sha256})).collect();
    let size = generation.images.get(index).map_or_else(String::new, |i| format!("{}x{}", i.width, i.height));
    let mut text = vec![
        ("prompt", generation.enhanced_prompt.clone().unwrap_or_else(|| request.prompt.clone())),
        ("negative_prompt", request.negative_prompt.clone().unwrap_or_default()),
        ("reference_images", serde_json::Value::Array(refs).to_string()),
        ("seed", generation.seed.to_string()),
        ("steps", request.steps.unwrap_or(defaults.num_inference_steps).to_string()),
        ("size", size),
        ("guidance", request.guidance_scale.unwrap_or(defaults.guidance_scale).to_string()),
        ("cfg_normalization", request.cfg_normalization.to_string()),
        ("cfg_truncation", request.cfg_truncation.unwrap_or(defaults.cfg_truncation).to_string()),
        ("count", request.count.to_string()),
        ("batch_index", index.to_string()),
        ("model", model.display().to_string()),
        ("software", format!("zimage {}", env!("CARGO_PKG_VERSION"))),
    ];
    if generation.enhanced_prompt.is_some() {
        text.push(("original_prompt", request.prompt.clone()));
    }
    if let Some(n) = request.max_sequence_length {
        text.push(("max_sequence_length", n.to_string()));
    }
    if !loras.is_empty() {
        text.push(("loras", lora_records(loras).to_string()));
    }
    push_weights_and_decoding(generation, &mut text);
    text
}

/// What produced the pixels beyond the request, for generations and edits alike: the package's
/// quantization, a lossy VAE decoder, VAE tiling (each absent on the exact float path, so those
/// images' parameters are unchanged).
fn push_weights_and_decoding(generation: &Generation, text: &mut Vec<(&'static str, String)>) {
    if let Some(q) = &generation.quantization {
        text.push(("quantization", q.clone()));
    }
    if let Some(d) = &generation.vae_decoder {
        text.push(("vae_decoder", d.clone()));
    }
    if let Some(t) = &generation.vae_tiling {
        text.push(("vae_tiling", format!("tile {}, overlap {}", t.tile_size, t.overlap)));
    }
}

/// How the front end names a ControlNet request's inputs, and how the control map was made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControlNames {
    /// The ControlNet's name in the package.
    pub controlnet: String,
    pub control_image: String,
    /// `none`, `canny`, `canny:LOW:HIGH` (`ControlPreprocess::name`).
    pub preprocess: String,
    /// ControlNet inpainting's picture and mask.
    pub inpaint_image: String,
    pub mask: String,
}

/// The ControlNet parameters of `request`, appended after [`image_parameters`]' by front ends
/// that ran a ControlNet: its name, the control image and how it was prepared, the
/// conditioning scale, and for ControlNet inpainting the picture and mask. Empty without a
/// control condition.
pub fn control_parameters(request: &GenerateRequest, names: &ControlNames) -> Vec<(&'static str, String)> {
    let Some(control) = &request.control else { return Vec::new() };
    let mut text = vec![
        ("controlnet", names.controlnet.clone()),
        ("control_image", names.control_image.clone()),
        ("control_preprocess", names.preprocess.clone()),
        ("control_scale", control.conditioning_scale.to_string()),
    ];
    if control.inpaint.is_some() {
        text.push(("control_inpaint_image", names.inpaint_image.clone()));
        text.push(("mask", names.mask.clone()));
    }
    text
}
