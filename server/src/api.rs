//! The request fields of `/v1/images/generations` (JSON) and `/v1/images/edits` (multipart),
//! OpenAI's and zimage's extensions, turned into an SDK request: a generation ([`prepare`]), or
//! on an editing (Omni / Edit) package an instruction edit of the uploaded references
//! ([`prepare_edit`]).
//!
//! Steps, guidance and the CFG settings start from the model's recommendation (its package's
//! `generation_defaults`: 8 steps without guidance for Z-Image-Turbo, more steps with guidance
//! for the base model). `quality` scales the recommended steps when `num_inference_steps` is not
//! given: `low` half, `medium` / `standard` / `auto` as recommended, `high` / `hd` 1.5x,
//! `xhigh` / `max` 2x (for Turbo: 4, 8, 12, 16).

use serde::Deserialize;
use zimage::package::edit::EditDefaults;
use zimage::pipeline::size_for_picture;
use zimage::{
    ControlCondition, ControlNames, ControlPreprocess, EditRequest, GenerateRequest, GenerationDefaults, GrayImage,
    InitImage, InputNames, Prompt, ReferenceRecord, RgbImage, MAX_IMAGES_PER_REQUEST, MAX_PROMPT_BYTES,
};

use crate::error::ApiError;
use crate::output::OutputFormat;
use crate::workers::{JobSpec, Work};

/// Every field either endpoint reads; unknown fields (`user`, `style`, `moderation` ...) are
/// accepted and ignored, as OpenAI-compatible servers do.
#[derive(Debug, Default, Deserialize)]
pub struct ImageParams {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub n: Option<u32>,
    pub size: Option<String>,
    pub quality: Option<String>,
    pub response_format: Option<String>,
    pub output_format: Option<String>,
    pub output_compression: Option<i64>,
    pub background: Option<String>,
    pub stream: Option<bool>,
    /// With `stream`: 0..=3 previews of the image while it is made, as
    /// `image_generation.partial_image` events (`Progress::preview` of the SDK: the model's
    /// estimate of the finished image at evenly spaced steps; each costs one VAE decode).
    pub partial_images: Option<u32>,
    // zimage's extensions (the names vLLM-Omni uses where it has them)
    pub negative_prompt: Option<String>,
    pub seed: Option<u64>,
    pub num_inference_steps: Option<u32>,
    pub guidance_scale: Option<f32>,
    pub cfg_normalization: Option<f32>,
    pub cfg_truncation: Option<f32>,
    pub enhance_prompt: Option<bool>,
    pub max_sequence_length: Option<usize>,
    /// Edits: how much of the picture is regenerated (0.6 image-to-image, 1.0 inpainting).
    pub strength: Option<f64>,
    /// Generations with a ControlNet loaded (`zimage-server --controlnet`): the control map
    /// (edges, depth, pose ...) as a base64 PNG, JPEG or WebP file (a `data:` URL too), resized
    /// to the output size (which it sets when `size` is not given).
    pub control_image: Option<String>,
    /// The ControlNet's conditioning scale (default 0.75, as diffusers).
    pub control_scale: Option<f32>,
    /// `none` (the default: a ready-made map), `canny` or `canny:LOW:HIGH` (edges from a photo).
    pub control_preprocess: Option<String>,
}

/// OpenAI's limit on `partial_images`.
const MAX_PARTIAL_IMAGES: u32 = 3;

/// Multipart fields that are numbers or booleans (multipart sends everything as text).
const TYPED_FIELDS: [&str; 13] = [
    "n",
    "output_compression",
    "partial_images",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "cfg_normalization",
    "cfg_truncation",
    "max_sequence_length",
    "strength",
    "stream",
    "enhance_prompt",
    "control_scale",
];

impl ImageParams {
    /// From a JSON body (an object); a type error names the field.
    pub fn from_json(body: &[u8]) -> Result<ImageParams, ApiError> {
        // serde's derive also takes a JSON array as the struct's fields in order: a request is
        // an object (a syntax error is left to the parser, which says where it is).
        match body.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') | None => {}
            Some(_) => return Err(ApiError::invalid("the request body must be a JSON object")),
        }
        let mut de = serde_json::Deserializer::from_slice(body);
        let params = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let error = ApiError::invalid(format!("invalid JSON body: {inner}"));
            let message = inner.to_string();
            // A key sent twice is about that key, though serde reports it on the object.
            if let Some(key) = message.strip_prefix("duplicate field `").and_then(|rest| rest.split_once('`')) {
                return error.with_param(key.0.to_string());
            }
            // Only a type error is about a field, and a number out of range (the parser's error,
            // met inside the field): another syntax error or a truncated body is about the body
            // (its path is where the parser stopped, `?` for an unnamed spot).
            let about_field =
                inner.classify() == serde_json::error::Category::Data || message.starts_with("number out of range");
            if !about_field || path.is_empty() || path == "." || path == "?" {
                error
            } else {
                error.with_param(path)
            }
        })?;
        // deserialize stops after the object; `end` refuses what follows it (trailing garbage
        // was accepted), as serde_json::from_slice does.
        de.end().map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))?;
        Ok(params)
    }

    /// From multipart text fields (name, value). A field sent twice is refused, as a JSON key
    /// sent twice is (one of them would be silently dropped).
    pub fn from_fields(fields: &[(String, String)]) -> Result<ImageParams, ApiError> {
        let mut object = serde_json::Map::new();
        for (name, value) in fields {
            if object.contains_key(name) {
                return Err(ApiError::invalid(format!("the field '{name}' is sent twice")).with_param(name.clone()));
            }
            let typed = if TYPED_FIELDS.contains(&name.as_str()) {
                serde_json::from_str::<serde_json::Value>(value.trim())
                    .ok()
                    .filter(|v| v.is_number() || v.is_boolean())
                    .unwrap_or_else(|| serde_json::Value::String(value.clone()))
            } else {
                serde_json::Value::String(value.clone())
            };
            object.insert(name.clone(), typed);
        }
        let body = serde_json::to_vec(&object).expect("a JSON object serialises");
        // A type error names the field; its message is serde's about a JSON body, with a line
        // and column of the JSON made here: said of the form field instead.
        Self::from_json(&body).map_err(|e| match e.param.clone() {
            Some(param) => {
                let detail = e.message.strip_prefix("invalid JSON body: ").unwrap_or(&e.message);
                let detail = detail.rsplit_once(" at line ").map_or(detail, |(d, _)| d);
                ApiError { message: format!("the form field '{param}' has the wrong type: {detail}"), ..e }
            }
            None => e,
        })
    }
}

/// The response's shape: how images are returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFormat {
    B64Json,
    Url,
}

/// A request ready to queue, with what the response echoes.
pub struct Prepared {
    pub model: Option<String>,
    pub spec: JobSpec,
    pub meta: Meta,
}

/// How the response is shaped.
#[derive(Debug, Clone)]
pub struct Meta {
    pub stream: bool,
    pub response_format: ResponseFormat,
    pub format: OutputFormat,
    pub size: String,
    pub quality: &'static str,
    /// `/v1/images/edits` (events are `image_edit.*`).
    pub edit: bool,
}

/// The control map of a generation, decoded, and the ControlNet the model was loaded with.
pub struct ControlInput {
    pub image: RgbImage,
    /// What the PNG parameters call it: the uploaded file's name, or `control_image`.
    pub name: String,
    /// `None`: the model was loaded without a ControlNet (the request is refused).
    pub controlnet: Option<String>,
}

/// The input picture of an edit, decoded.
pub struct EditInput {
    pub image: RgbImage,
    pub image_name: String,
    pub mask: Option<(GrayImage, String)>,
}

/// This server's output pixel limits.
#[derive(Debug, Clone, Copy)]
pub struct PixelLimits {
    /// Most output pixels per image (`--max-pixels`).
    pub image: u64,
    /// Most output pixels of a request, `n` images together (`--max-batch-pixels`): the whole
    /// batch runs through the transformer and the VAE at once.
    pub batch: u64,
}

/// What a request is checked against before any work is done for it (resizing an upload,
/// queueing): the model's recommended settings and checks, and this server's pixel limits.
pub struct Limits<'a> {
    pub defaults: GenerationDefaults,
    pub pixels: PixelLimits,
    /// The model's size multiple: a picture without `size` is made at its own size floored to
    /// it ([`zimage::pipeline::size_for_picture`]).
    pub size_multiple: usize,
    /// The model's own checks (`Pipeline::check_request`: size multiple, largest side,
    /// TensorRT profile, steps).
    pub check: &'a dyn Fn(&GenerateRequest) -> zimage::Result<()>,
}

impl Limits<'_> {
    /// Refuses an output size over this server's limits or the model's, and settings the model
    /// refuses (steps, n, guidance, an edit's `strength`), naming the field; every route calls
    /// it before resizing an upload or queueing, so that a request the worker would refuse is a
    /// 400 now, not a queued job (or, streamed, a 200 with an error event).
    fn check_fields(&self, r: &GenerateRequest, strength: Option<f64>) -> Result<(), ApiError> {
        check_pixels(r.width, r.height, r.count, self.pixels)?;
        // The SDK's checks, one field at a time so that the error names it: the model's
        // recommended settings at the request's size, then with each of its fields in turn.
        let mut probe = GenerateRequest::with_defaults(&self.defaults, "");
        (probe.width, probe.height) = (r.width, r.height);
        // A stand-in picture: the strength's check is about the steps, and the upload is
        // resized to the output size only after these checks.
        let start =
            |strength| InitImage { image: RgbImage { width: 1, height: 1, pixels: vec![0; 3] }, mask: None, strength };
        let fields: [FieldSetter<'_, GenerateRequest>; 7] = [
            ("size", &|_| {}),
            ("num_inference_steps", &|p| p.steps = r.steps),
            ("n", &|p| p.count = r.count),
            ("guidance_scale", &|p| p.guidance_scale = r.guidance_scale),
            ("cfg_normalization", &|p| p.cfg_normalization = r.cfg_normalization),
            ("cfg_truncation", &|p| p.cfg_truncation = r.cfg_truncation),
            ("strength", &|p| p.init_image = strength.map(start)),
        ];
        check_one_at_a_time(probe, &fields, self.check)
    }
}

/// A request field's name and how to copy it into a probe request.
type FieldSetter<'a, R> = (&'a str, &'a dyn Fn(&mut R));

/// Applies `fields` to `probe` one at a time, checking after each, so that the model's refusal
/// names the field that caused it (the SDK's checks name values, not request fields).
fn check_one_at_a_time<R>(
    mut probe: R,
    fields: &[FieldSetter<'_, R>],
    check: &dyn Fn(&R) -> zimage::Result<()>,
) -> Result<(), ApiError> {
    for (param, set) in fields {
        set(&mut probe);
        check(&probe).map_err(|e| ApiError::from_sdk(&e).with_param(*param))?;
    }
    Ok(())
}

/// Refuses an output size over `--max-pixels` (naming `size`), and `n` images of it over
/// `--max-batch-pixels` (naming `n`).
fn check_pixels(width: u32, height: u32, n: u32, limits: PixelLimits) -> Result<(), ApiError> {
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.image {
        return Err(ApiError::invalid(format!(
            "size {width}x{height} is {pixels} pixels; this server makes images of at most {} pixels \
             (zimage-server --max-pixels)",
            limits.image
        ))
        .with_param("size"));
    }
    let batch = pixels * u64::from(n);
    if batch > limits.batch {
        return Err(ApiError::invalid(format!(
            "n={n} images of {width}x{height} are {batch} pixels; this server makes at most {} pixels in one \
             request (zimage-server --max-batch-pixels): ask for fewer or smaller images",
            limits.batch
        ))
        .with_param("n"));
    }
    Ok(())
}

/// Refuses what the SDK would refuse only in the worker, when it reads the text: a prompt or
/// negative prompt over its byte limit, a `max_sequence_length` of 0.
fn check_text(params: &ImageParams) -> Result<(), ApiError> {
    for (text, param) in [(&params.prompt, "prompt"), (&params.negative_prompt, "negative_prompt")] {
        let bytes = text.as_ref().map_or(0, String::len);
        if bytes > MAX_PROMPT_BYTES {
            return Err(ApiError::invalid(format!(
                "{param} is {bytes} bytes, more than the limit of {MAX_PROMPT_BYTES} (1 MiB; the text encoder \
                 reads only its first max_sequence_length tokens)"
            ))
            .with_param(param));
        }
    }
    if params.max_sequence_length == Some(0) {
        return Err(ApiError::invalid("max_sequence_length must be at least 1").with_param("max_sequence_length"));
    }
    Ok(())
}

/// An edit's strength: the request's, or the default for image-to-image or inpainting.
fn edit_strength(given: Option<f64>, masked: bool) -> f64 {
    given.unwrap_or(if masked { InitImage::DEFAULT_INPAINT_STRENGTH } else { InitImage::DEFAULT_STRENGTH })
}

/// `n`, the images asked for: 1 by default, at most `MAX_IMAGES_PER_REQUEST`.
fn image_count(params: &ImageParams) -> Result<u32, ApiError> {
    let n = params.n.unwrap_or(1);
    if n == 0 || n > MAX_IMAGES_PER_REQUEST {
        return Err(ApiError::invalid(format!("n must be 1..={MAX_IMAGES_PER_REQUEST} (got {n})")).with_param("n"));
    }
    Ok(n)
}

/// `size` as WIDTHxHEIGHT; `None` when absent or `auto` (the caller's default).
fn requested_size(params: &ImageParams) -> Result<Option<(u32, u32)>, ApiError> {
    match params.size.as_deref().filter(|s| *s != "auto") {
        None => Ok(None),
        Some(s) => parse_size(s).map(Some).ok_or_else(|| {
            ApiError::invalid(format!("size must be WIDTHxHEIGHT, e.g. 1024x1024 (got {s:?})")).with_param("size")
        }),
    }
}

/// Builds the SDK request from the model's recommended settings and the request's fields,
/// within `limits`. `edit` carries the decoded input picture for `/v1/images/edits`.
pub fn prepare(
    params: ImageParams,
    edit: Option<EditInput>,
    control: Option<ControlInput>,
    limits: &Limits,
) -> Result<Prepared, ApiError> {
    let defaults = &limits.defaults;
    if let (Some(edit), Some(_)) = (&edit, &control) {
        // ControlNet inpainting: diffusers' ZImageControlNetInpaintPipeline starts from noise.
        if edit.mask.is_none() {
            return Err(ApiError::invalid(
                "a control_image on /v1/images/edits is ControlNet inpainting, which needs a mask",
            )
            .with_param("mask"));
        }
        if params.strength.is_some() {
            return Err(ApiError::invalid(
                "strength does not apply to ControlNet inpainting (it starts from noise); leave it out",
            )
            .with_param("strength"));
        }
    }
    if control.is_none() {
        for (given, name) in [
            (params.control_image.is_some(), "control_image"),
            (params.control_scale.is_some(), "control_scale"),
            (params.control_preprocess.is_some(), "control_preprocess"),
        ] {
            if given {
                let message = format!("{name} needs a control_image");
                return Err(ApiError::invalid(message).with_param(name));
            }
        }
    }
    let output = output_options(&params)?;
    check_text(&params)?;
    let (count, size) = (image_count(&params)?, requested_size(&params)?);
    let prompt = params
        .prompt
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::invalid("'prompt' is required").with_param("prompt"))?;
    let mut request = GenerateRequest::with_defaults(defaults, prompt.as_str());
    request.negative_prompt = params.negative_prompt.map(Prompt::Text);
    let (steps, quality) = steps_for_quality(params.quality.as_deref(), defaults.steps)?;
    request.steps = params.num_inference_steps.unwrap_or(steps);
    if let Some(g) = params.guidance_scale {
        request.guidance_scale = g;
    }
    if let Some(v) = params.cfg_normalization {
        request.cfg_normalization = v;
    }
    if let Some(v) = params.cfg_truncation {
        request.cfg_truncation = v;
    }
    request.seed = params.seed;
    request.max_sequence_length = params.max_sequence_length;
    request.count = count;
    request.previews = output.partial_images;

    let (width, height) = match (size, &edit) {
        (Some(size), _) => size,
        // An edit keeps its picture's size, as `zimage generate --init-image` does; a control
        // map sets it too, as `zimage generate --control-image` does (floored to the model's
        // multiple, as diffusers' image processor floors it; the picture is resized to it).
        (None, Some(e)) => size_for_picture(limits.size_multiple, e.image.width, e.image.height),
        (None, None) => control.as_ref().map_or((request.width, request.height), |c| {
            size_for_picture(limits.size_multiple, c.image.width, c.image.height)
        }),
    };
    request.width = width;
    request.height = height;
    // An edit's strength (ControlNet inpainting has none: it starts from noise).
    let strength = match (&edit, &control) {
        (Some(edit), None) => Some(edit_strength(params.strength, edit.mask.is_some())),
        _ => None,
    };
    let size_from = match (size, &edit, &control) {
        (Some(_), _, _) | (None, None, None) => None,
        (None, Some(_), _) => Some("image"),
        (None, None, Some(_)) => Some("control_image"),
    };
    limits.check_fields(&request, strength).map_err(|e| {
        size_taken_from(e, size_from, &format!("its sides floored to multiples of {}", limits.size_multiple))
    })?;

    let mut inputs = InputNames::default();
    let is_edit = edit.is_some();
    let mut control_inpaint = None;
    match edit {
        Some(edit) if control.is_some() => {
            let (mask, mask_name) = edit.mask.expect("checked above");
            control_inpaint = Some((edit.image, edit.image_name, mask, mask_name));
        }
        Some(edit) => {
            // Resized here (the SDK would resize it too) so that a queued job holds a picture of
            // the output size, not an upload of up to --max-input-side.
            let image = zimage::image_io::resize_rgb(&edit.image, width, height)
                .map_err(|e| ApiError::from_sdk(&e).with_param("image"))?;
            inputs.init_image = edit.image_name;
            let strength = edit_strength(params.strength, edit.mask.is_some());
            // A mask of another size is resized to the image's, as diffusers' mask processor does.
            let mask = match edit.mask {
                Some((mask, name)) => {
                    inputs.mask = name;
                    Some(
                        zimage::image_io::resize_gray(&mask, width, height)
                            .map_err(|e| ApiError::from_sdk(&e).with_param("mask"))?,
                    )
                }
                None => None,
            };
            request.init_image = Some(InitImage { image, mask, strength });
        }
        None if params.strength.is_some() => {
            return Err(ApiError::invalid("strength applies to /v1/images/edits only").with_param("strength"))
        }
        None => {}
    }
    let mut control_names = ControlNames::default();
    if let Some(control) = control {
        control_names = control_condition(
            &mut request,
            control,
            control_inpaint,
            params.control_scale,
            params.control_preprocess.as_deref(),
        )?;
    }

    let work = Work::Generate(Box::new(request));
    Ok(prepared(params.model, output, work, (inputs, control_names), (width, height), quality, is_edit))
}

/// An instruction edit on an editing (Omni / Edit) package, from `/v1/images/edits`: the
/// uploaded pictures are the references, in order (`references`, decoded and checked by the
/// SDK's reference rules), the prompt the instruction. Without `size` the image takes the last
/// reference's size as the model prepares it (`model.output_size`: scaled down to the
/// package's reference area when larger, sides floored to its multiple), as `zimage edit` and
/// diffusers' `ZImageOmniPipeline` do. Steps and guidance start from the package's editing
/// defaults; `quality` scales the steps as for generations. Masks, strength and ControlNet
/// fields do not apply and are refused, naming the field; so are settings the model's
/// `check` (`Pipeline::check_edit`) refuses.
pub fn prepare_edit(
    params: ImageParams,
    references: Vec<(RgbImage, ReferenceRecord)>,
    pixels: PixelLimits,
    model: &EditModel<'_>,
) -> Result<Prepared, ApiError> {
    let (defaults, size_multiple) = (model.defaults, model.size_multiple);
    for (given, name) in [
        (params.strength.is_some(), "strength"),
        (params.control_image.is_some(), "control_image"),
        (params.control_scale.is_some(), "control_scale"),
        (params.control_preprocess.is_some(), "control_preprocess"),
    ] {
        if given {
            return Err(ApiError::invalid(format!(
                "{name} does not apply to this model: it edits by instruction (the pictures are references)"
            ))
            .with_param(name));
        }
    }
    let prompt = params.prompt.clone().ok_or_else(|| ApiError::invalid("'prompt' is required").with_param("prompt"))?;
    check_text(&params)?;
    // (the route checks this first; OpenAI's edits take at least one picture)
    let Some((last, _)) = references.last() else {
        return Err(ApiError::invalid("'image' is required").with_param("image"));
    };
    let size = requested_size(&params)?;
    let (width, height) = match size {
        Some(size) => size,
        None => (model.output_size)(last.width, last.height).map_err(|e| ApiError::from_sdk(&e).with_param("image"))?,
    };
    let n = image_count(&params)?;
    let size_from = if size.is_some() { None } else { Some("image") };
    let taken_from = |e| size_taken_from(e, size_from, &format!("{EDIT_SIZE_RULE} {size_multiple}"));
    check_pixels(width, height, n, pixels).map_err(taken_from)?;
    let recommended = u32::try_from(defaults.num_inference_steps).unwrap_or(u32::MAX);
    let (steps, quality) = steps_for_quality(params.quality.as_deref(), recommended)?;
    let (images, records): (Vec<RgbImage>, Vec<ReferenceRecord>) = references.into_iter().unzip();
    let mut request = EditRequest::new(prompt, images);
    request.negative_prompt = params.negative_prompt.clone();
    if size.is_some() {
        (request.width, request.height) = (Some(width), Some(height));
    }
    request.steps = Some(params.num_inference_steps.unwrap_or(steps) as usize);
    request.guidance_scale = params.guidance_scale;
    if let Some(v) = params.cfg_normalization {
        request.cfg_normalization = v;
    }
    request.cfg_truncation = params.cfg_truncation;
    request.seed = params.seed;
    request.count = n;
    request.max_sequence_length = params.max_sequence_length;
    let output = output_options(&params)?;
    request.previews = output.partial_images;
    check_edit_fields(&request, (width, height), model.check).map_err(taken_from)?;
    let work = Work::Edit { request, references: records };
    let names = (InputNames::default(), ControlNames::default());
    Ok(prepared(params.model, output, work, names, (width, height), quality, true))
}

/// What an instruction edit does to the last reference's size when the request gives none
/// (followed by the multiple).
const EDIT_SIZE_RULE: &str =
    "as the model prepares it: scaled down to the model's reference area when larger, its sides floored to multiples of";

/// What an instruction edit needs of its model, besides the request.
pub struct EditModel<'a> {
    /// The package's editing defaults (steps, guidance).
    pub defaults: &'a EditDefaults,
    /// The package's size multiple (for messages).
    pub size_multiple: usize,
    /// The output size without a requested size, from the last reference's
    /// (`zimage::pipeline::edit::edit_output_size`).
    pub output_size: &'a dyn Fn(u32, u32) -> zimage::Result<(u32, u32)>,
    /// The model's own checks (`Pipeline::check_edit`).
    pub check: &'a dyn Fn(&EditRequest) -> zimage::Result<()>,
}

/// A refusal of the output size names `size`; when the request gave none and the size was
/// taken from a picture (`picture_field`: an edit's `image`, a `control_image`), it names that
/// field instead and says where the size came from (`rule`: how the picture's size became
/// the output's).
fn size_taken_from(error: ApiError, picture_field: Option<&'static str>, rule: &str) -> ApiError {
    match picture_field {
        Some(field) if error.param.as_deref() == Some("size") => {
            let message = format!(
                "{} (the request gives no size, so the output takes the {field}'s, {rule}; give size to choose one)",
                error.message
            );
            ApiError { message, ..error }.with_param(field)
        }
        _ => error,
    }
}

/// The model's checks of an instruction edit, one field at a time so that the error names it
/// (as [`Limits::check_fields`] for generations): a request without references at the output
/// size, then with each of the request's fields in turn.
fn check_edit_fields(
    r: &EditRequest,
    (width, height): (u32, u32),
    check: &dyn Fn(&EditRequest) -> zimage::Result<()>,
) -> Result<(), ApiError> {
    let mut probe = EditRequest::new(String::new(), Vec::new());
    (probe.width, probe.height) = (Some(width), Some(height));
    let fields: [FieldSetter<'_, EditRequest>; 7] = [
        ("size", &|_| {}),
        ("num_inference_steps", &|p| p.steps = r.steps),
        ("n", &|p| p.count = r.count),
        ("guidance_scale", &|p| p.guidance_scale = r.guidance_scale),
        ("cfg_normalization", &|p| p.cfg_normalization = r.cfg_normalization),
        ("cfg_truncation", &|p| p.cfg_truncation = r.cfg_truncation),
        ("max_sequence_length", &|p| p.max_sequence_length = r.max_sequence_length),
    ];
    check_one_at_a_time(probe, &fields, check)
}

/// What a request asks of its output, read from its fields before the request is built.
struct OutputOptions {
    format: OutputFormat,
    /// JPEG quality.
    compression: Option<u8>,
    response_format: ResponseFormat,
    stream: bool,
    /// Previews to stream (0 without `stream`).
    partial_images: u32,
    enhance: bool,
}

/// The job and the response shape of a prepared request (a generation or an instruction edit).
fn prepared(
    model: Option<String>,
    output: OutputOptions,
    work: Work,
    (inputs, control): (InputNames, ControlNames),
    (width, height): (u32, u32),
    quality: &'static str,
    edit: bool,
) -> Prepared {
    let OutputOptions { format, compression, response_format, stream, enhance, .. } = output;
    Prepared {
        model,
        spec: JobSpec { work, enhance, format, compression, inputs, control },
        meta: Meta { stream, response_format, format, size: format!("{width}x{height}"), quality, edit },
    }
}

/// The output file format, its JPEG quality and how images are returned (a transparent
/// background is refused: the images are opaque), whether to stream and to enhance the prompt.
fn output_options(params: &ImageParams) -> Result<OutputOptions, ApiError> {
    let format = match params.output_format.as_deref() {
        None => OutputFormat::Png,
        Some(f) => OutputFormat::parse(f).ok_or_else(|| {
            ApiError::invalid(format!("output_format must be png, jpeg or webp (got {f:?})"))
                .with_param("output_format")
        })?,
    };
    let compression = match params.output_compression {
        None => None,
        Some(c @ 0..=100) => Some(c as u8),
        Some(c) => {
            return Err(ApiError::invalid(format!("output_compression must be 0..=100 (got {c})"))
                .with_param("output_compression"))
        }
    };
    let response_format = match params.response_format.as_deref() {
        None | Some("b64_json") => ResponseFormat::B64Json,
        Some("url") => ResponseFormat::Url,
        Some(f) => {
            return Err(ApiError::invalid(format!("response_format must be b64_json or url (got {f:?})"))
                .with_param("response_format"))
        }
    };
    if let Some(b) = params.background.as_deref().filter(|b| !matches!(*b, "auto" | "opaque")) {
        return Err(ApiError::invalid(format!("background {b:?} is not supported: the images are opaque"))
            .with_param("background"));
    }
    let stream = params.stream.unwrap_or(false);
    if stream && response_format == ResponseFormat::Url {
        // A stream's events carry the images themselves (OpenAI's carry b64_json only).
        return Err(ApiError::invalid("response_format 'url' is not available with stream: the events carry b64_json")
            .with_param("response_format"));
    }
    let partial_images = match params.partial_images {
        None => 0,
        Some(n @ 0..=MAX_PARTIAL_IMAGES) => n,
        Some(n) => {
            return Err(ApiError::invalid(format!("partial_images must be 0..={MAX_PARTIAL_IMAGES} (got {n})"))
                .with_param("partial_images"))
        }
    };
    Ok(OutputOptions {
        format,
        compression,
        response_format,
        stream,
        // Previews only reach a client through a stream, as OpenAI's.
        partial_images: if stream { partial_images } else { 0 },
        enhance: params.enhance_prompt.unwrap_or(false),
    })
}

/// Sets `request.control` from the decoded control map and the scale, with `inpaint`'s picture
/// and mask, and their names, for ControlNet inpainting (`ControlCondition::resized`: both
/// pictures resized to the request's size); returns the names the PNG parameters record.
fn control_condition(
    request: &mut GenerateRequest,
    control: ControlInput,
    inpaint: Option<(RgbImage, String, GrayImage, String)>,
    scale: Option<f32>,
    preprocess: Option<&str>,
) -> Result<ControlNames, ApiError> {
    let controlnet = control.controlnet.ok_or_else(|| {
        ApiError::invalid("this model was loaded without a ControlNet (zimage-server --controlnet)")
            .with_param("control_image")
    })?;
    let preprocess: ControlPreprocess = match preprocess {
        None => ControlPreprocess::None,
        Some(p) => p.parse().map_err(|e: zimage::Error| ApiError::from_sdk(&e).with_param("control_preprocess"))?,
    };
    let mut names = ControlNames {
        controlnet,
        control_image: control.name,
        preprocess: preprocess.name(),
        ..ControlNames::default()
    };
    let (picture, mask) = match inpaint {
        Some((picture, picture_name, mask, mask_name)) => {
            (names.inpaint_image, names.mask) = (picture_name, mask_name);
            (Some(picture), Some(mask))
        }
        None => (None, None),
    };
    let mut condition = ControlCondition::resized(
        &control.image,
        preprocess,
        request.width,
        request.height,
        picture.as_ref().zip(mask),
    )
    .map_err(|e| ApiError::from_sdk(&e).with_param("control_image"))?;
    if let Some(scale) = scale {
        ControlCondition::check_scale(scale).map_err(|e| ApiError::from_sdk(&e).with_param("control_scale"))?;
        condition.conditioning_scale = scale;
    }
    request.control = Some(condition);
    Ok(names)
}

/// Steps for OpenAI's `quality` from the model's recommended steps (see the module's
/// documentation), and the quality to echo.
fn steps_for_quality(quality: Option<&str>, recommended: u32) -> Result<(u32, &'static str), ApiError> {
    // Halves and 1.5x round up, and never below one step.
    let scaled = |num: u32, den: u32| (recommended.saturating_mul(num).div_ceil(den)).max(1);
    Ok(match quality {
        None | Some("auto") => (recommended, "medium"),
        Some("low") => (scaled(1, 2), "low"),
        Some("medium") | Some("standard") => (recommended, "medium"),
        Some("high") | Some("hd") => (scaled(3, 2), "high"),
        Some("xhigh") => (scaled(2, 1), "xhigh"),
        Some("max") => (scaled(2, 1), "max"),
        Some(q) => {
            return Err(ApiError::invalid(format!(
                "quality must be low, medium, high, xhigh, max, standard, hd or auto (got {q:?})"
            ))
            .with_param("quality"))
        }
    })
}

/// `WIDTHxHEIGHT`.
pub fn parse_size(s: &str) -> Option<(u32, u32)> {
    let (w, h) = s.split_once(['x', 'X'])?;
    Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(json: &str) -> ImageParams {
        ImageParams::from_json(json.as_bytes()).unwrap()
    }

    fn turbo() -> GenerationDefaults {
        GenerationDefaults::default()
    }

    fn accept(_: &GenerateRequest) -> zimage::Result<()> {
        Ok(())
    }

    /// No model checks (the HTTP tests run them), no pixel limit.
    /// No model checks (the HTTP tests run them); at most 4 images of 1024x1024 in a request.
    fn lim(defaults: &GenerationDefaults) -> Limits<'static> {
        let pixels = PixelLimits { image: u64::MAX, batch: 4 << 20 };
        Limits { defaults: *defaults, pixels, size_multiple: 16, check: &accept }
    }

    #[test]
    fn the_models_recommended_settings_are_the_starting_point() {
        let base: GenerationDefaults = serde_json::from_str(
            r#"{"variant": "base", "steps": 50, "guidance_scale": 4.0, "cfg_normalization": 0.5, "cfg_truncation": 0.9}"#,
        )
        .unwrap();
        let r = prepare(params(r#"{"prompt":"x"}"#), None, None, &lim(&base)).unwrap().spec.work.into_generate();
        assert_eq!((r.steps, r.guidance_scale, r.cfg_normalization, r.cfg_truncation), (50, 4.0, 0.5, 0.9));
        let steps = |q: &str, d: &GenerationDefaults| {
            prepare(params(&format!(r#"{{"prompt":"x","quality":"{q}"}}"#)), None, None, &lim(d))
                .unwrap()
                .spec
                .work
                .into_generate()
                .steps
        };
        assert_eq!(["low", "medium", "high", "xhigh"].map(|q| steps(q, &base)), [25, 50, 75, 100]);
        assert_eq!(["low", "medium", "high", "max"].map(|q| steps(q, &turbo())), [4, 8, 12, 16]);
        let given =
            prepare(params(r#"{"prompt":"x","guidance_scale":0,"num_inference_steps":9}"#), None, None, &lim(&base))
                .unwrap()
                .spec
                .work
                .into_generate();
        assert_eq!((given.steps, given.guidance_scale), (9, 0.0));
    }

    #[test]
    fn fields_map_onto_the_sdk_request() {
        let p = prepare(
            params(
                r#"{"prompt":"a fox","n":2,"size":"64x48","quality":"low","seed":7,"negative_prompt":"blur",
                    "guidance_scale":1.5,"cfg_truncation":0.5,"output_format":"jpeg","output_compression":80,
                    "response_format":"url","user":"ignored"}"#,
            ),
            None,
            None,
            &lim(&turbo()),
        )
        .unwrap();
        let r = &p.spec.work.into_generate();
        assert_eq!((r.width, r.height, r.count, r.steps, r.seed), (64, 48, 2, 4, Some(7)));
        assert_eq!((r.guidance_scale, r.cfg_truncation), (1.5, 0.5));
        assert!(matches!(&r.negative_prompt, Some(Prompt::Text(t)) if t == "blur"));
        assert_eq!((p.spec.format, p.spec.compression), (OutputFormat::Jpeg, Some(80)));
        assert_eq!(
            (p.meta.response_format, p.meta.size.as_str(), p.meta.quality),
            (ResponseFormat::Url, "64x48", "low")
        );
        let steps =
            prepare(params(r#"{"prompt":"x","quality":"high","num_inference_steps":3}"#), None, None, &lim(&turbo()))
                .unwrap();
        assert_eq!(steps.spec.work.into_generate().steps, 3);
    }

    #[test]
    fn bad_fields_are_400_naming_the_field() {
        for (body, param) in [
            (r#"{"n":1}"#, "prompt"),
            (r#"{"prompt":"x","size":"big"}"#, "size"),
            (r#"{"prompt":"x","n":0}"#, "n"),
            (r#"{"prompt":"x","quality":"ultra"}"#, "quality"),
            (r#"{"prompt":"x","output_format":"gif"}"#, "output_format"),
            (r#"{"prompt":"x","response_format":"blob"}"#, "response_format"),
            (r#"{"prompt":"x","output_compression":101}"#, "output_compression"),
            (r#"{"prompt":"x","background":"transparent"}"#, "background"),
            (r#"{"prompt":"x","strength":0.5}"#, "strength"),
            (r#"{"prompt":"x","stream":true,"response_format":"url"}"#, "response_format"),
            (r#"{"prompt":"x","stream":true,"partial_images":4}"#, "partial_images"),
            (r#"{"prompt":"x","max_sequence_length":0}"#, "max_sequence_length"),
            (r#"{"prompt":"x","size":"1024x1024","n":5}"#, "n"),
        ] {
            let e = prepare(params(body), None, None, &lim(&turbo()))
                .err()
                .unwrap_or_else(|| panic!("{body} was accepted"));
            assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some(param)), "{body}: {}", e.message);
        }
        let e = ImageParams::from_json(br#"{"prompt":"x","n":"two"}"#).err().unwrap();
        assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some("n")), "{}", e.message);
        // A key sent twice, and a number JSON cannot hold, are about their field too.
        for (body, param) in [
            (&br#"{"prompt":"x","prompt":"y"}"#[..], "prompt"),
            (br#"{"prompt":"x","size":"64x64","guidance_scale":1e400}"#, "guidance_scale"),
        ] {
            let e = ImageParams::from_json(body).err().unwrap();
            assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some(param)), "{}", e.message);
        }
        // A syntax error is about the body, wherever the parser stopped.
        for body in [&br#"{"prompt":"x","guidance_scale":1.5.5}"#[..], br#"{"prompt":"x","#] {
            let e = ImageParams::from_json(body).err().unwrap();
            assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, None), "{}", e.message);
        }
        let e = ImageParams::from_json(b"{not json").err().unwrap();
        assert_eq!(e.status.as_u16(), 400);
        // serde's derive takes an array as the fields in order; a request is an object.
        for body in [&br#"["x", 1]"#[..], b" \n[{\"prompt\":\"x\"}]", b"\"x\"", b"7"] {
            let e = ImageParams::from_json(body).err().unwrap_or_else(|| panic!("{body:?} was accepted"));
            assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, None), "{}", e.message);
        }
        assert_eq!(ImageParams::from_json(b" {\"prompt\":\"x\"}").unwrap().prompt.as_deref(), Some("x"));
    }

    #[test]
    fn partial_images_are_previews_of_a_stream_only() {
        let previews =
            |json: &str| prepare(params(json), None, None, &lim(&turbo())).unwrap().spec.work.into_generate().previews;
        assert_eq!(previews(r#"{"prompt":"x","size":"64x64","stream":true,"partial_images":3}"#), 3);
        assert_eq!(previews(r#"{"prompt":"x","size":"64x64","stream":true}"#), 0);
        assert_eq!(previews(r#"{"prompt":"x","size":"64x64","partial_images":2}"#), 0);
        let n4 = prepare(params(r#"{"prompt":"x","size":"1024x1024","n":4}"#), None, None, &lim(&turbo())).unwrap();
        assert_eq!(n4.spec.work.into_generate().count, 4, "at the batch limit");
    }

    /// Without `size` the output takes a picture's size: its refusal names that picture's field.
    #[test]
    fn a_size_taken_from_a_picture_is_refused_naming_the_picture() {
        let small = Limits { pixels: PixelLimits { image: 64 * 64, batch: 4 * 64 * 64 }, ..lim(&turbo()) };
        let picture = || RgbImage { width: 80, height: 80, pixels: vec![0; 80 * 80 * 3] };
        let control = || ControlInput { image: picture(), name: "c.png".into(), controlnet: Some("union".into()) };
        let edit = || EditInput { image: picture(), image_name: "e.png".into(), mask: None };
        let refused = |json: &str, edit: Option<EditInput>, control: Option<ControlInput>| {
            prepare(params(json), edit, control, &small).err().expect("refused")
        };
        let e = refused(r#"{"prompt":"x"}"#, None, Some(control()));
        assert_eq!(e.param.as_deref(), Some("control_image"), "{}", e.message);
        assert!(e.message.contains("takes the control_image's, its sides floored to multiples of 16"), "{}", e.message);
        let e = refused(r#"{"prompt":"x"}"#, Some(edit()), None);
        assert_eq!(e.param.as_deref(), Some("image"), "{}", e.message);
        // A size the request gives is named as before.
        let e = refused(r#"{"prompt":"x","size":"80x80"}"#, None, Some(control()));
        assert_eq!(e.param.as_deref(), Some("size"), "{}", e.message);
        assert!(!e.message.contains("floored"), "{}", e.message);
        let defaults =
            EditDefaults { num_inference_steps: 8, guidance_scale: 0.0, cfg_truncation: 1.0, max_sequence_length: 512 };
        let references = vec![(picture(), ReferenceRecord::new("e.png", b""))];
        let floored = |w: u32, h: u32| Ok((w / 16 * 16, h / 16 * 16));
        let model = EditModel { defaults: &defaults, size_multiple: 16, output_size: &floored, check: &|_| Ok(()) };
        let e = prepare_edit(params(r#"{"prompt":"x"}"#), references, small.pixels, &model).err().expect("refused");
        assert_eq!(e.param.as_deref(), Some("image"), "{}", e.message);
        assert!(e.message.contains("as the model prepares it"), "{}", e.message);
    }

    /// Without `size` an instruction edit takes its last reference's size as the model
    /// prepares it (here: scaled to a quarter), for the pixel limits and the reported size.
    #[test]
    fn an_instruction_edit_takes_the_model_prepared_size_of_its_last_reference() {
        let defaults =
            EditDefaults { num_inference_steps: 8, guidance_scale: 0.0, cfg_truncation: 1.0, max_sequence_length: 512 };
        let picture = |side: u32| RgbImage { width: side, height: side, pixels: vec![0; (side * side * 3) as usize] };
        let halved = |w: u32, h: u32| Ok((w / 2, h / 2));
        let model = EditModel { defaults: &defaults, size_multiple: 16, output_size: &halved, check: &|_| Ok(()) };
        let limits = PixelLimits { image: 64 * 64, batch: 64 * 64 };
        let references = || {
            vec![(picture(32), ReferenceRecord::new("a.png", b"")), (picture(128), ReferenceRecord::new("b.png", b""))]
        };
        let prepared = prepare_edit(params(r#"{"prompt":"x"}"#), references(), limits, &model).expect("64x64 fits");
        assert_eq!(prepared.meta.size, "64x64");
        let unusable = |_: u32, _: u32| Err(zimage::Error::InvalidRequest("reference of 1x1 scales to nothing".into()));
        let model = EditModel { output_size: &unusable, ..model };
        let e = prepare_edit(params(r#"{"prompt":"x"}"#), references(), limits, &model).err().expect("refused");
        assert_eq!(e.param.as_deref(), Some("image"), "{}", e.message);
        assert!(e.message.contains("scales to nothing"), "{}", e.message);
    }

    #[test]
    fn a_control_scale_out_of_range_names_its_field() {
        for scale in ["101", "-100.5", "1e30"] {
            let json = format!(r#"{{"prompt":"x","size":"64x64","control_scale":{scale}}}"#);
            let control = ControlInput {
                image: RgbImage { width: 64, height: 64, pixels: vec![0; 64 * 64 * 3] },
                name: "c.png".into(),
                controlnet: Some("union".into()),
            };
            let e = prepare(params(&json), None, Some(control), &lim(&turbo())).err().expect("refused");
            assert_eq!(e.param.as_deref(), Some("control_scale"), "{scale}: {}", e.message);
        }
    }

    #[test]
    fn multipart_text_fields_are_typed() {
        let fields = [("n", "2"), ("strength", "0.25"), ("stream", "true"), ("prompt", "42"), ("seed", "x")];
        let fields: Vec<(String, String)> = fields.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        let e = ImageParams::from_fields(&fields).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("seed"));
        // Said of the form field, without the line and column of a JSON body.
        assert_eq!(e.message, r#"the form field 'seed' has the wrong type: invalid type: string "x", expected u64"#);
        let p = ImageParams::from_fields(&fields[..4]).unwrap();
        assert_eq!((p.n, p.strength, p.stream, p.prompt.as_deref()), (Some(2), Some(0.25), Some(true), Some("42")));
    }
}
