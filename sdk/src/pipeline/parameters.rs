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
/// the package's quantization, the sequence length, the LoRA adapters merged into the transformer (`loras`, see
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
    if let Some(q) = &generation.quantization {
        text.push(("quantization", q.clone()));
    }
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
