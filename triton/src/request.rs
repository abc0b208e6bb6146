//! One inference request's input tensors → a [`GenerateRequest`]; the images → output bytes.
//! No Triton calls here: the backend copies the tensors out first.

use std::collections::HashMap;
use std::path::Path;

use zimage::limits::{MAX_INPUT_FILE_BYTES, MAX_INPUT_SIDE};
use zimage::pipeline::edit;
use zimage::{
    ControlCondition, ControlPreprocess, EditRequest, GenerateRequest, GenerationDefaults, GrayImage, InitImage,
    Manifest, Prompt, RgbImage,
};

use crate::interface::{self, DataType};

/// An input tensor as received: its type, shape and bytes (gathered from Triton's buffers).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub data_type: DataType,
    pub shape: Vec<i64>,
    pub data: Vec<u8>,
}

impl Tensor {
    /// Elements the shape holds (`None` for a negative dimension or an overflow).
    pub fn elements(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| usize::try_from(d).ok().and_then(|d| n.checked_mul(d)))
    }
}

/// Per-model caps on a request (from the model's parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_prompt_bytes: usize,
    pub max_count: u32,
    /// Whether the model loads a ControlNet (parameter `controlnet`): CONTROL_IMAGE needs one.
    pub controlnet: bool,
    /// The model's size multiple: a picture without WIDTH/HEIGHT is made at its own size
    /// floored to it ([`zimage::pipeline::size_for_picture`]).
    pub size_multiple: usize,
    /// The most REFERENCE_IMAGES the package's editing rules take (`edit.reference.max_images`);
    /// 0 for a package that does not edit.
    pub max_references: usize,
}

impl Limits {
    /// The most bytes input `name` may hold for this model; `None` for a name the model does
    /// not take. The backend checks an input's declared size against this before it copies a
    /// byte of it: Triton hands over whatever a client sent (gigabytes through shared memory),
    /// and the copy is an allocation of that size.
    pub fn max_input_bytes(&self, name: &str) -> Option<u64> {
        let side = u64::from(MAX_INPUT_SIDE);
        Some(match name {
            // One BYTES element: its 4-byte length, then the text.
            "PROMPT" | "NEGATIVE_PROMPT" | "CONTROL_PREPROCESS" => 4 + self.max_prompt_bytes as u64,
            "INIT_IMAGE" | "CONTROL_IMAGE" => side * side * 3,
            "MASK" => side * side,
            "REFERENCE_IMAGES" => self.max_references as u64 * (4 + MAX_INPUT_FILE_BYTES),
            // Every other input is one number.
            _ => interface::input_spec(name)?.data_type.size()? as u64,
        })
    }

    /// Refuses input `name` of `byte_size` bytes when it cannot be one this model takes (see
    /// [`Limits::max_input_bytes`]); the message names the input and the limit.
    pub fn check_input_size(&self, name: &str, byte_size: u64) -> Result<(), InputError> {
        let max = self.max_input_bytes(name).ok_or_else(|| bad(format!("unknown input {name}")))?;
        if byte_size <= max {
            return Ok(());
        }
        if name == "REFERENCE_IMAGES" && self.max_references == 0 {
            return Err(bad(
                "REFERENCE_IMAGES makes an edit, and this model does not support editing (its package has no siglip / \
                 transformer_omni graphs)",
            ));
        }
        let what = match name {
            "PROMPT" | "NEGATIVE_PROMPT" | "CONTROL_PREPROCESS" => format!(
                "a 4-byte length, then at most {} bytes of text: parameter max_prompt_bytes",
                self.max_prompt_bytes
            ),
            "INIT_IMAGE" | "CONTROL_IMAGE" => format!("RGB, at most {MAX_INPUT_SIDE} x {MAX_INPUT_SIDE} pixels"),
            "MASK" => format!("at most {MAX_INPUT_SIDE} x {MAX_INPUT_SIDE} pixels"),
            "REFERENCE_IMAGES" => {
                format!("at most {} files of at most {} MiB each", self.max_references, MAX_INPUT_FILE_BYTES >> 20)
            }
            _ => "one value".to_string(),
        };
        Err(bad(format!("input {name} is {byte_size} bytes; this model takes at most {max} ({what})")))
    }
}

/// A request the backend rejects before it reaches the pipeline (Triton INVALID_ARG).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError(pub String);

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad(message: impl Into<String>) -> InputError {
    InputError(message.into())
}

/// The inputs a generation and an edit share, checked.
struct CommonInputs {
    prompt: String,
    negative_prompt: Option<String>,
    steps: Option<u32>,
    guidance: Option<f32>,
    cfg_normalization: Option<f32>,
    cfg_truncation: Option<f32>,
    seed: Option<u64>,
    count: Option<u32>,
    width: Option<u32>,
    height: Option<u32>,
}

/// Checks every input's type and byte count against the interface, then reads the inputs
/// every request may carry.
fn common_inputs(inputs: &HashMap<String, Tensor>, limits: &Limits) -> Result<CommonInputs, InputError> {
    for (name, tensor) in inputs {
        let spec = interface::input_spec(name).ok_or_else(|| bad(format!("unknown input {name}")))?;
        if tensor.data_type != spec.data_type {
            return Err(bad(format!(
                "input {name} must be {} (got {})",
                spec.data_type.wire_name(),
                tensor.data_type.wire_name()
            )));
        }
        if let Some(size) = spec.data_type.size() {
            let expected = tensor.elements().and_then(|n| n.checked_mul(size));
            if expected != Some(tensor.data.len()) {
                return Err(bad(format!(
                    "input {name}: shape {:?} does not match its {} bytes",
                    tensor.shape,
                    tensor.data.len()
                )));
            }
        }
    }
    let prompt = text(inputs, "PROMPT", limits)?.ok_or_else(|| bad("the input PROMPT is required"))?;
    let count = match scalar_i32(inputs, "COUNT")? {
        Some(count) => {
            let count = positive("COUNT", count)?;
            if count > limits.max_count {
                return Err(bad(format!(
                    "COUNT is {count}; this model serves at most {} (parameter max_count)",
                    limits.max_count
                )));
            }
            Some(count)
        }
        None => None,
    };
    Ok(CommonInputs {
        prompt,
        negative_prompt: text(inputs, "NEGATIVE_PROMPT", limits)?,
        steps: scalar_i32(inputs, "STEPS")?.map(|s| positive("STEPS", s)).transpose()?,
        guidance: finite_f32(inputs, "GUIDANCE")?,
        cfg_normalization: finite_f32(inputs, "CFG_NORMALIZATION")?,
        cfg_truncation: finite_f32(inputs, "CFG_TRUNCATION")?,
        seed: scalar(inputs, "SEED", 8)?.map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))),
        count,
        width: scalar_i32(inputs, "WIDTH")?.map(|w| positive("WIDTH", w)).transpose()?,
        height: scalar_i32(inputs, "HEIGHT")?.map(|h| positive("HEIGHT", h)).transpose()?,
    })
}

/// Whether a request is an instruction edit (it carries REFERENCE_IMAGES).
pub fn is_edit(inputs: &HashMap<String, Tensor>) -> bool {
    inputs.contains_key("REFERENCE_IMAGES")
}

/// Builds the SDK request from the input tensors, as `zimage generate` builds it from its
/// flags: without WIDTH/HEIGHT an INIT_IMAGE (else a CONTROL_IMAGE) sets the size (its own,
/// floored to the model's size multiple). CONTROL_IMAGE is a ControlNet condition, and with
/// INIT_IMAGE and MASK ControlNet inpainting (from noise, no STRENGTH), as
/// `zimage generate --controlnet`. Inputs left out take the model's recommended settings
/// (`defaults`, the package's `generation_defaults`).
///
/// The pictures go into the request as they were sent: the pipeline checks the request
/// (sizes against the model's limits) and only then resizes them to the output size and makes
/// the control map (`CONTROL_PREPROCESS`), so a small picture with a huge WIDTH x HEIGHT is
/// refused before any buffer of that size is made.
pub fn build_request(
    inputs: &mut HashMap<String, Tensor>,
    limits: &Limits,
    defaults: &GenerationDefaults,
) -> Result<GenerateRequest, InputError> {
    let common = common_inputs(inputs, limits)?;
    if is_edit(inputs) {
        return Err(bad("REFERENCE_IMAGES makes an edit: build it with build_edit_request"));
    }
    let mut request = GenerateRequest::with_defaults(defaults, common.prompt);
    request.negative_prompt = common.negative_prompt.map(Prompt::Text);
    request.steps = common.steps.unwrap_or(request.steps);
    request.guidance_scale = common.guidance.unwrap_or(request.guidance_scale);
    request.cfg_normalization = common.cfg_normalization.unwrap_or(request.cfg_normalization);
    request.cfg_truncation = common.cfg_truncation.unwrap_or(request.cfg_truncation);
    request.seed = common.seed;
    request.count = common.count.unwrap_or(request.count);
    let (width, height) = (common.width, common.height);
    let strength = match scalar(inputs, "STRENGTH", 8)? {
        Some(bytes) => {
            let s = f64::from_le_bytes(bytes.try_into().expect("8 bytes"));
            if !(0.0..=1.0).contains(&s) {
                return Err(bad(format!("STRENGTH must be within 0..1 (got {s})")));
            }
            Some(s)
        }
        None => None,
    };
    // Moved out of the inputs, not copied: a request's pictures are held once.
    let init = inputs.remove("INIT_IMAGE").map(|t| rgb_image(t, "INIT_IMAGE")).transpose()?;
    let mask = inputs.remove("MASK").map(mask).transpose()?;
    let control = inputs.remove("CONTROL_IMAGE").map(|t| rgb_image(t, "CONTROL_IMAGE")).transpose()?;
    let picture_size = init
        .as_ref()
        .or(control.as_ref())
        .map(|i| zimage::pipeline::size_for_picture(limits.size_multiple, i.width, i.height));
    request.width = width.or(picture_size.map(|s| s.0)).unwrap_or(request.width);
    request.height = height.or(picture_size.map(|s| s.1)).unwrap_or(request.height);
    if let Some(control) = control {
        if !limits.controlnet {
            return Err(bad("CONTROL_IMAGE needs a ControlNet: this model has none (parameter controlnet)"));
        }
        let init = match (init, mask) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(bad("INIT_IMAGE with CONTROL_IMAGE is ControlNet inpainting, which needs MASK"))
            }
            (None, Some(_)) => return Err(bad("MASK needs INIT_IMAGE")),
            (Some(image), Some(mask)) => Some((image, mask)),
        };
        if init.is_some() && strength.is_some() {
            return Err(bad("STRENGTH does not apply to ControlNet inpainting (it starts from noise)"));
        }
        if init.is_none() && strength.is_some() {
            return Err(bad("STRENGTH needs INIT_IMAGE"));
        }
        request.control = Some(control_condition(inputs, limits, control, init)?);
        return Ok(request);
    }
    for name in ["CONTROL_SCALE", "CONTROL_PREPROCESS"] {
        if inputs.contains_key(name) {
            return Err(bad(format!("{name} needs CONTROL_IMAGE")));
        }
    }
    match init {
        Some(image) => {
            let default_strength =
                if mask.is_some() { InitImage::DEFAULT_INPAINT_STRENGTH } else { InitImage::DEFAULT_STRENGTH };
            // A picture or mask of another size is resized by the pipeline (the mask as
            // diffusers' mask processor resizes it).
            request.init_image = Some(InitImage { image, mask, strength: strength.unwrap_or(default_strength) });
        }
        None if mask.is_some() => return Err(bad("MASK needs INIT_IMAGE")),
        None if strength.is_some() => return Err(bad("STRENGTH needs INIT_IMAGE")),
        None => {}
    }
    Ok(request)
}

/// Builds an instruction edit (diffusers' ZImageOmniPipeline, as `zimage edit`): PROMPT is the
/// instruction and REFERENCE_IMAGES the pictures, encoded files (PNG, JPEG, WebP) as BYTES
/// elements, in order; the last one sets the output size unless WIDTH and HEIGHT both do. An
/// empty REFERENCE_IMAGES (shape `[0]`) is ZImageOmniPipeline's text-to-image (WIDTH x HEIGHT,
/// or 1024 x 1024).
/// STEPS and GUIDANCE left out take the package's editing defaults (50 and 5.0 for Omni).
/// Only for an editing package (`manifest`, `dir`: the model's); pictures are checked against
/// its reference rules from their headers before they are decoded.
pub fn build_edit_request(
    inputs: &HashMap<String, Tensor>,
    limits: &Limits,
    manifest: &Manifest,
    dir: &Path,
) -> Result<EditRequest, InputError> {
    let common = common_inputs(inputs, limits)?;
    for name in ["INIT_IMAGE", "MASK", "STRENGTH", "CONTROL_IMAGE", "CONTROL_SCALE", "CONTROL_PREPROCESS"] {
        if inputs.contains_key(name) {
            return Err(bad(format!(
                "{name} does not apply to an edit: REFERENCE_IMAGES are the pictures and PROMPT says what to change"
            )));
        }
    }
    let references = &inputs["REFERENCE_IMAGES"];
    let declared =
        references.elements().ok_or_else(|| bad(format!("REFERENCE_IMAGES: bad shape {:?}", references.shape)))?;
    let no_reference = declared == 0 && references.data.is_empty();
    // The count the shape declares is checked before the elements are parsed: a tensor of
    // millions of empty elements passed the byte cap and aborted the server on the list of them.
    edit::check_edit_package(manifest, dir, declared).map_err(|e| bad(format!("REFERENCE_IMAGES: {e}")))?;
    let files = if no_reference {
        Vec::new() // no reference: text-to-image through the Omni transformer
    } else {
        bytes_elements(references, "REFERENCE_IMAGES")?
    };
    let images = files
        .iter()
        .enumerate()
        .map(|(i, file)| edit::decode_reference(manifest, dir, file, i + 1))
        .collect::<zimage::Result<Vec<RgbImage>>>()
        .map_err(|e| bad(format!("REFERENCE_IMAGES: {e}")))?;
    let mut request = EditRequest::new(common.prompt, images);
    request.negative_prompt = common.negative_prompt;
    match (common.width, common.height) {
        (Some(w), Some(h)) => (request.width, request.height) = (Some(w), Some(h)),
        (None, None) => {}
        _ => {
            return Err(bad(
                "give both WIDTH and HEIGHT, or neither (the last reference's size; 1024 x 1024 without references)",
            ))
        }
    }
    request.steps = common.steps.map(|s| s as usize);
    request.guidance_scale = common.guidance;
    if let Some(normalization) = common.cfg_normalization {
        request.cfg_normalization = normalization;
    }
    request.cfg_truncation = common.cfg_truncation;
    request.seed = common.seed;
    request.count = common.count.unwrap_or(1);
    Ok(request)
}

/// The ControlNet condition: CONTROL_IMAGE with its preprocessing and scale, and for ControlNet
/// inpainting the picture and mask, all as sent: the pipeline resizes them to the output size
/// and then makes the control map, as `ControlCondition::resized` (what `zimage generate`
/// uses) does.
fn control_condition(
    inputs: &HashMap<String, Tensor>,
    limits: &Limits,
    control: RgbImage,
    inpaint: Option<(RgbImage, GrayImage)>,
) -> Result<ControlCondition, InputError> {
    let preprocess: ControlPreprocess = match text(inputs, "CONTROL_PREPROCESS", limits)? {
        None => ControlPreprocess::None,
        Some(name) => name.parse().map_err(|e: zimage::Error| bad(format!("CONTROL_PREPROCESS: {e}")))?,
    };
    let mut condition = match inpaint {
        Some((picture, mask)) => ControlCondition::inpaint(control, picture, mask),
        None => ControlCondition::new(control),
    };
    condition.preprocess = preprocess;
    if let Some(scale) = finite_f32(inputs, "CONTROL_SCALE")? {
        condition.conditioning_scale = scale;
    }
    Ok(condition)
}

/// A one-element BYTES input as UTF-8 text. Triton's BYTES elements are a 4-byte
/// little-endian length, then the bytes.
fn text(inputs: &HashMap<String, Tensor>, name: &str, limits: &Limits) -> Result<Option<String>, InputError> {
    let Some(tensor) = inputs.get(name) else { return Ok(None) };
    if tensor.elements() != Some(1) {
        return Err(bad(format!("{name} must hold one string (shape {:?})", tensor.shape)));
    }
    let data = &tensor.data;
    let length = data
        .get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        .ok_or_else(|| bad(format!("{name}: BYTES element without its length")))?;
    if data.len() != 4 + length {
        return Err(bad(format!("{name}: BYTES element of {length} bytes in a buffer of {}", data.len())));
    }
    if length > limits.max_prompt_bytes {
        return Err(bad(format!(
            "{name} is {length} bytes long; this model accepts at most {} (parameter max_prompt_bytes)",
            limits.max_prompt_bytes
        )));
    }
    String::from_utf8(data[4..].to_vec()).map(Some).map_err(|_| bad(format!("{name} is not UTF-8")))
}

/// The elements of a BYTES input, each a 4-byte little-endian length then its bytes, as many
/// as the shape holds (at least one).
fn bytes_elements<'a>(tensor: &'a Tensor, name: &str) -> Result<Vec<&'a [u8]>, InputError> {
    let count = tensor.elements().ok_or_else(|| bad(format!("{name}: bad shape {:?}", tensor.shape)))?;
    if count == 0 {
        return Err(bad(format!("{name} holds no element")));
    }
    let mut rest = tensor.data.as_slice();
    let mut elements = Vec::with_capacity(count.min(64));
    for index in 0..count {
        let length = rest
            .get(..4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
            .ok_or_else(|| bad(format!("{name}: element {index} without its length")))?;
        let element = rest.get(4..4 + length).ok_or_else(|| {
            bad(format!("{name}: element {index} of {length} bytes runs past the {} bytes sent", tensor.data.len()))
        })?;
        elements.push(element);
        rest = &rest[4 + length..];
    }
    if !rest.is_empty() {
        return Err(bad(format!("{name}: {} bytes after its {count} element(s)", rest.len())));
    }
    Ok(elements)
}

/// The bytes of a one-element input.
fn scalar<'a>(inputs: &'a HashMap<String, Tensor>, name: &str, size: usize) -> Result<Option<&'a [u8]>, InputError> {
    match inputs.get(name) {
        None => Ok(None),
        Some(t) if t.elements() == Some(1) && t.data.len() == size => Ok(Some(&t.data)),
        Some(t) => Err(bad(format!("{name} must hold one value (shape {:?})", t.shape))),
    }
}

/// A one-element FP32 input, which must be finite.
fn finite_f32(inputs: &HashMap<String, Tensor>, name: &str) -> Result<Option<f32>, InputError> {
    match scalar(inputs, name, 4)?.map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))) {
        Some(value) if !value.is_finite() => Err(bad(format!("{name} must be a finite number (got {value})"))),
        value => Ok(value),
    }
}

fn scalar_i32(inputs: &HashMap<String, Tensor>, name: &str) -> Result<Option<i32>, InputError> {
    Ok(scalar(inputs, name, 4)?.map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes"))))
}

fn positive(name: &str, value: i32) -> Result<u32, InputError> {
    u32::try_from(value).ok().filter(|v| *v > 0).ok_or_else(|| bad(format!("{name} must be positive (got {value})")))
}

/// A picture's dimensions, each positive and at most [`MAX_INPUT_SIDE`]: a picture is resized
/// to the output size, and a side far beyond any output (1 x 20,000,000) would make the
/// resize's weight tables and buffers as large.
fn dims(tensor: &Tensor, name: &str, rank: usize) -> Result<Vec<u32>, InputError> {
    if tensor.shape.len() != rank {
        return Err(bad(format!("{name} must have {rank} dimensions (got shape {:?})", tensor.shape)));
    }
    let dims = tensor
        .shape
        .iter()
        .map(|&d| {
            u32::try_from(d).ok().filter(|d| *d > 0).ok_or_else(|| bad(format!("{name}: bad shape {:?}", tensor.shape)))
        })
        .collect::<Result<Vec<u32>, InputError>>()?;
    if dims[..2].iter().any(|&side| side > MAX_INPUT_SIDE) {
        return Err(bad(format!(
            "{name} is {} x {} pixels (shape {:?}); input pictures may be at most {MAX_INPUT_SIDE} pixels on a side",
            dims[1], dims[0], tensor.shape
        )));
    }
    Ok(dims)
}

fn rgb_image(tensor: Tensor, name: &str) -> Result<RgbImage, InputError> {
    let d = dims(&tensor, name, 3)?;
    if d[2] != 3 {
        return Err(bad(format!("{name} must be [H, W, 3] RGB (got shape {:?})", tensor.shape)));
    }
    let image = RgbImage { width: d[1], height: d[0], pixels: tensor.data };
    image.check().map_err(|e| bad(e.to_string()))?;
    Ok(image)
}

fn mask(tensor: Tensor) -> Result<GrayImage, InputError> {
    let d = dims(&tensor, "MASK", 2)?;
    let mask = GrayImage { width: d[1], height: d[0], pixels: tensor.data };
    mask.check().map_err(|e| bad(e.to_string()))?;
    Ok(mask)
}

/// The IMAGE output: `[N, H, W, 3]` and its bytes, the images one after another.
pub fn image_output(images: &[RgbImage]) -> Result<([i64; 4], Vec<u8>), String> {
    let first = images.first().ok_or("the pipeline returned no image")?;
    let (width, height) = (first.width, first.height);
    if images.iter().any(|i| i.width != width || i.height != height) {
        return Err("the pipeline returned images of different sizes".into());
    }
    let mut bytes = Vec::with_capacity(images.len() * first.pixels.len());
    for image in images {
        bytes.extend_from_slice(&image.pixels);
    }
    Ok(([images.len() as i64, height as i64, width as i64, 3], bytes))
}

/// A BYTES element as Triton lays it out (for tests and clients of this module).
pub fn bytes_element(text: &str) -> Vec<u8> {
    let mut out = (text.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out
}
