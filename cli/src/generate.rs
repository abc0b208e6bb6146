//! `zimage generate`: one request to the SDK, PNG files with the parameters in text chunks,
//! optionally the final latents, and a summary (plain or JSON).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};
use zimage::{
    control_parameters, image_io, image_parameters, lora_records, ControlCondition, ControlNames, ControlPreprocess,
    GenerateRequest, Generation, InitImage, InputNames, Manifest, Pipeline, Progress, Prompt, Timings, TokenizedPrompt,
};

use crate::enhance::{self, EnhanceFlags};
use crate::model_args::ModelArgs;
use crate::output::{
    out, output_files, output_format, refuse_previews_over_inputs, refuse_stdout, resolve_output, same_file, secs,
    Failure,
};
use crate::step_report::{ProgressMode, StageProgress, StepReport};
use crate::{interrupt, log};

/// diffusers' default strengths: ZImageImg2ImgPipeline 0.6, ZImageInpaintPipeline 1.0.

#[derive(Args)]
#[command(group = enhance_options_group())]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// What to draw.
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    prompt: String,
    /// What to steer away from; used only with --guidance above 0 [default: ""].
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    negative_prompt: Option<String>,
    /// Image width in pixels, a multiple of 16 [default: 1024, or the --init-image width floored to 16].
    #[arg(long, value_name = "W")]
    width: Option<u32>,
    /// Image height in pixels, a multiple of 16 [default: 1024, or the --init-image height floored to 16].
    #[arg(long, value_name = "H")]
    height: Option<u32>,
    /// Denoising steps [default: the package's recommendation: 8 for Z-Image-Turbo].
    #[arg(long, value_name = "N")]
    steps: Option<u32>,
    /// Classifier-free guidance scale; 0 turns guidance off [default: the package's
    /// recommendation: 0 for Z-Image-Turbo].
    #[arg(long, value_name = "G")]
    guidance: Option<f32>,
    /// Cap the guided prediction's norm at F times the conditional one's; 0 = off [default: the
    /// package's, 0].
    #[arg(long, value_name = "F")]
    cfg_normalization: Option<f32>,
    /// Stop guidance once the normalised time exceeds F; 1 = never [default: the package's, 1].
    #[arg(long, value_name = "F")]
    cfg_truncation: Option<f32>,
    /// Noise seed (same seed, same settings: same image as diffusers) [default: random, reported].
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Images to generate from one noise tensor; with K > 1 they go to FILE-0.png, FILE-1.png, ...
    #[arg(long, value_name = "K", default_value_t = GenerateRequest::default().count)]
    count: u32,
    /// Where the PNG goes (a folder: FOLDER/zimage.png). Written to a temporary file beside it
    /// and renamed when complete.
    #[arg(long, short, value_name = "FILE.png", default_value = "zimage.png")]
    output: PathBuf,
    /// Also write the final latents of all images as one float32 .npy array [K, C, h, w]
    /// (a folder: FOLDER/latents.npy).
    #[arg(long, value_name = "FILE.npy")]
    save_latents: Option<PathBuf>,
    /// Prompt tokens kept (chat template included); longer prompts are cut, with a warning
    /// [default: the package's, 512].
    #[arg(long, value_name = "N")]
    max_sequence_length: Option<usize>,
    /// Start from this picture (PNG, JPEG, WebP) instead of pure noise: image-to-image.
    #[arg(long, value_name = "FILE")]
    init_image: Option<PathBuf>,
    /// How much of --init-image is regenerated, 0..1 [default: 0.6; 1.0 with --mask].
    #[arg(long, value_name = "S", requires = "init_image")]
    strength: Option<f64>,
    /// Inpainting mask for --init-image (resized to the output size if another): white = repaint, black = keep.
    /// With --controlnet: ControlNet inpainting (from noise, no --strength).
    #[arg(long, value_name = "FILE", requires = "init_image")]
    mask: Option<PathBuf>,
    /// A ControlNet added to the package (export_controlnet.py): its name, or the path of its
    /// controlnet_NAME.onnx in the package folder. Needs --control-image.
    #[arg(long, value_name = "NAME_OR_FILE", requires = "control_image")]
    controlnet: Option<String>,
    /// The control map (edges, depth, pose ...; PNG, JPEG, WebP), resized to the output size
    /// [sets the size when --width/--height are not given].
    #[arg(long, value_name = "FILE", requires = "controlnet")]
    control_image: Option<PathBuf>,
    /// ControlNet conditioning scale.
    #[arg(long, value_name = "S", default_value_t = ControlCondition::DEFAULT_SCALE, requires = "controlnet")]
    control_scale: f32,
    /// Make the control map from --control-image first: none (it is a map already), canny
    /// (edges, thresholds 100/200) or canny:LOW:HIGH.
    #[arg(long, value_name = "MODE", default_value = "none", value_parser = parse_preprocess, requires = "controlnet")]
    control_preprocess: ControlPreprocess,
    /// A LoRA (.safetensors: diffusers/PEFT, kohya, ComfyUI, LoKr) merged into the transformer at
    /// SCALE (default 1.0); repeat for several. Recorded in the PNG parameters with its sha256.
    #[arg(long = "lora", value_name = "FILE[:SCALE]", value_parser = zimage_load_flags::parse_lora)]
    loras: Vec<zimage::LoraFile>,
    /// Write N previews while generating: the model's estimate of the finished image at evenly
    /// spaced steps, as FILE.stepS.png beside the output (FILE.stepS-K.png with --count). Each
    /// costs one VAE decode. They stay when the run then fails or is cancelled: they are its
    /// progress.
    #[arg(long, value_name = "N", default_value_t = 0)]
    previews: u32,
    /// JPEG quality, 1..=100, for an output named .jpg or .jpeg [default: 95]. The output's
    /// extension picks the format: .jpg/.jpeg JPEG, .webp lossless WebP, anything else PNG
    /// (only PNG records the generation parameters).
    #[arg(long, value_name = "Q", value_parser = clap::value_parser!(u8).range(1..=100))]
    quality: Option<u8>,
    /// Print a JSON summary on stdout (files, seed, providers, timings, truncation).
    #[arg(long)]
    json: bool,
    /// Progress display on stderr: a bar on a terminal (auto), one line per denoising step
    /// (lines, for logs and scripts), or none.
    #[arg(long, value_name = "WHEN", value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
    /// Rewrite the prompt with the local prompt enhancer first; the rewritten prompt is
    /// printed and stored in the PNG parameters.
    #[arg(long)]
    enhance: bool,
    #[command(flatten)]
    enhance_flags: EnhanceFlags,
}

pub fn run(args: GenerateArgs) -> Result<(), Failure> {
    // Everything that can be checked is checked before the (slow) model load, and every size
    // before anything sized by it is allocated: the package's limits (manifest.json alone),
    // the request (from the init image's header when it sets the size), the destinations,
    // and only then the input pictures are decoded and resized.
    let manifest = Manifest::read(&args.model.model)?;
    let init_bytes = args.init_image.as_deref().map(image_io::read_image_bytes).transpose()?;
    let control_bytes = args.control_image.as_deref().map(image_io::read_image_bytes).transpose()?;
    let init_size = match (&init_bytes, &args.init_image, &control_bytes, &args.control_image) {
        (Some(bytes), Some(path), _, _) | (None, _, Some(bytes), Some(path)) => {
            Some(image_io::image_size(bytes).map_err(|e| located(path, e))?)
        }
        _ => None,
    };
    let mut request = build_request(&args, &manifest, init_size);
    zimage::pipeline::check_request(&request, &manifest)
        .map_err(|e| picture_size_error(e, &args, &request, &manifest))?;
    if args.negative_prompt.is_some() && request.guidance_scale == 0.0 {
        log::stderr_line(
            "warning",
            "--negative-prompt is not used without guidance (--guidance 0); give --guidance above 0 to steer away from it",
        );
    }
    let controlnet = match &args.controlnet {
        Some(value) => Some(
            zimage::package::controlnet::require_controlnet(&manifest.controlnets, &args.model.model, value)
                .map_err(Failure::Usage)?,
        ),
        None => None,
    };
    if controlnet.is_some() && args.init_image.is_some() && (args.mask.is_none() || args.strength.is_some()) {
        return Err(Failure::Usage(
            "with --controlnet, --init-image needs --mask (ControlNet inpainting, which starts from noise and takes no \
             --strength)"
                .into(),
        ));
    }

    // Adapters are read and checked before the model load too.
    let loras = args.loras.iter().map(zimage::LoraFile::load).collect::<zimage::Result<Vec<_>>>()?;

    let files_base = resolve_output(&args.output, "zimage.png");
    let format = output_format(&files_base, "-o", args.quality)?;
    if let Some(latents) = &args.save_latents {
        refuse_stdout(latents, "--save-latents")?;
    }
    let files = output_files(&files_base, request.count);
    let inputs: Vec<&Path> = [args.init_image.as_deref(), args.mask.as_deref(), args.control_image.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    refuse_previews_over_inputs(&files_base, request.count, args.previews, request.steps as usize, &inputs)?;
    let latents_file = args.save_latents.as_deref().map(|p| resolve_output(p, "latents.npy"));
    for path in files.iter().chain(latents_file.as_ref()) {
        image_io::check_writable(path)?;
    }
    if let Some(latents) = &latents_file {
        if let Some(png) = files.iter().find(|png| same_file(png, latents)) {
            return Err(Failure::Usage(format!(
                "-o and --save-latents name the same file ({}); give the latents their own name",
                png.display()
            )));
        }
    }
    if let (Some(bytes), Some(path)) = (&control_bytes, &args.control_image) {
        let image = image_io::decode_rgb(bytes).map_err(|e| located(path, e))?;
        let picture = match (&init_bytes, &args.init_image) {
            (Some(bytes), Some(path)) => Some(image_io::decode_rgb(bytes).map_err(|e| located(path, e))?),
            _ => None,
        };
        let inpaint = match &picture {
            Some(picture) => {
                let mask_path = args.mask.as_deref().expect("checked: --init-image with --controlnet needs --mask");
                Some((picture, image_io::load_mask(mask_path, request.width, request.height)?))
            }
            None => None,
        };
        let mut control =
            ControlCondition::resized(&image, args.control_preprocess, request.width, request.height, inpaint)?;
        control.conditioning_scale = args.control_scale;
        request.control = Some(control);
    } else if let (Some(bytes), Some(path)) = (&init_bytes, &args.init_image) {
        let image = image_io::decode_rgb(bytes).map_err(|e| located(path, e))?;
        let mask = args.mask.as_deref().map(|m| image_io::load_mask(m, request.width, request.height)).transpose()?;
        let default_strength =
            if mask.is_some() { InitImage::DEFAULT_INPAINT_STRENGTH } else { InitImage::DEFAULT_STRENGTH };
        request.init_image = Some(InitImage {
            image: image_io::resize_rgb(&image, request.width, request.height)?,
            mask,
            strength: args.strength.unwrap_or(default_strength),
        });
    }
    drop((control_bytes, init_bytes));

    let progress = StageProgress::new(args.progress.visible());
    progress.stage("loading model");
    // The ControlNet's combined graph is loaded instead of the plain transformer, not after it.
    let pipeline = args.model.load_with_loras(args.count, request.guidance_scale > 0.0, loras, controlnet)?;

    progress.stage("encoding prompt");
    let previews_beside = (args.previews > 0).then(|| (files_base.clone(), request.count, format));
    let mut report = StepReport::new(&progress, args.progress, previews_beside);
    let mut on_step = |p: &Progress| report.on_step(p);
    let result = interrupt::run_cancellable(|| {
        if args.enhance {
            progress.stage("enhancing prompt");
            let enhancer = args.enhance_flags.load_for(&pipeline, &enhance::load_options(&args.model))?;
            pipeline.generate_enhanced(&enhancer, &args.enhance_flags.options(), &request, Some(&mut on_step))
        } else {
            pipeline.generate(&request, Some(&mut on_step))
        }
    });
    progress.finish();
    let preview_files = std::mem::take(&mut report.preview_files);
    let generation = result.map_err(|e| report.failure(e))?;
    if let Some(enhanced) = &generation.enhanced_prompt {
        log::stderr_line("info", &format!("enhanced prompt: {enhanced}"));
    }

    warn_if_truncated("prompt", &generation.prompt_tokens);
    if let Some(tokens) = &generation.negative_prompt_tokens {
        warn_if_truncated("negative prompt", tokens);
    }
    // Every output to a temporary file first, then all renamed into place: a failure (a full
    // disk, Ctrl-C) leaves none of them, not a PNG without its latents.
    let mut staged = Vec::with_capacity(files.len() + 1);
    for (index, (image, path)) in generation.images.iter().zip(&files).enumerate() {
        let text = png_text(&args, &request, &generation, &pipeline, index);
        let mut file = interrupt::stage(path)?;
        file.write_image(image, format, &text)?;
        staged.push(file);
    }
    if let (Some(path), Some(latents)) = (&latents_file, &generation.latents) {
        let mut file = interrupt::stage(path)?;
        file.write_npy(latents)?;
        staged.push(file);
    }
    interrupt::commit_all(staged)?;

    if args.json {
        let mut summary = summary_json(&args, &request, &generation, &pipeline, &files, latents_file.as_deref());
        summary["previews"] = preview_files.iter().map(|p| p.display().to_string()).collect();
        out(&format!("{}\n", serde_json::to_string_pretty(&summary).expect("JSON values serialise")))?;
    } else {
        let mut text = String::new();
        for path in &preview_files {
            text += &format!("wrote {} (preview)\n", path.display());
        }
        for path in &files {
            text += &format!("wrote {}\n", path.display());
        }
        if let Some(path) = &latents_file {
            text += &format!("wrote {} (latents)\n", path.display());
        }
        text += &format!(
            "seed {}, {}x{}, {} steps, {:.2} s (+{:.2} s loading)\n",
            generation.seed,
            request.width,
            request.height,
            request.steps,
            secs(generation.timings.total),
            secs(pipeline.load_time())
        );
        out(&text)?;
    }
    Ok(())
}

/// The request without its input pictures: those are decoded only once it is known to be valid.
/// Without --width/--height an init image (else a control image) sets the size, floored to the
/// package's size multiple as diffusers' image processor floors it (the picture is then resized).
/// The package's recommended settings, overridden by what the user gave.
fn build_request(args: &GenerateArgs, manifest: &Manifest, init_size: Option<(u32, u32)>) -> GenerateRequest {
    let mut request = GenerateRequest::for_package(manifest, args.prompt.as_str());
    request.negative_prompt = args.negative_prompt.clone().map(Prompt::Text);
    request.steps = args.steps.unwrap_or(request.steps);
    request.guidance_scale = args.guidance.unwrap_or(request.guidance_scale);
    request.cfg_normalization = args.cfg_normalization.unwrap_or(request.cfg_normalization);
    request.cfg_truncation = args.cfg_truncation.unwrap_or(request.cfg_truncation);
    request.seed = args.seed;
    request.count = args.count;
    request.max_sequence_length = args.max_sequence_length;
    request.return_latents = args.save_latents.is_some();
    request.previews = args.previews;
    let picture_size = init_size.map(|(w, h)| zimage::pipeline::size_for_picture(manifest.size_multiple(), w, h));
    request.width = args.width.or(picture_size.map(|s| s.0)).unwrap_or(request.width);
    request.height = args.height.or(picture_size.map(|s| s.1)).unwrap_or(request.height);
    request
}

/// The prompt enhancer's options (`EnhanceFlags`) need --enhance: without it they would be
/// silently ignored (`--enhancer DIR --thinking` rewrote nothing). Options with a default
/// count only when given.
pub(crate) fn enhance_options_group() -> clap::ArgGroup {
    clap::ArgGroup::new("enhance_options")
        .args([
            "enhancer",
            "thinking",
            "max_new_tokens",
            "max_context_tokens",
            "temperature",
            "top_k",
            "top_p",
            "sampling_seed",
            "system_prompt",
        ])
        .multiple(true)
        .requires("enhance")
}

/// A size the request refuses that the init (or control) picture set, not --width/--height,
/// is that picture's fault: the error says so, and how to resize it instead ("width 1 must be
/// a positive multiple of 16" alone names a width the user never gave). Any other refusal is
/// returned as it is: the request is checked again at a size the package takes.
fn picture_size_error(
    error: zimage::Error,
    args: &GenerateArgs,
    request: &GenerateRequest,
    manifest: &Manifest,
) -> zimage::Error {
    let picture = args.init_image.as_deref().or(args.control_image.as_deref());
    let (Some(picture), zimage::Error::InvalidRequest(message)) = (picture, &error) else {
        return error;
    };
    if args.width.is_some() && args.height.is_some() {
        return error;
    }
    // Only the sides the picture set are replaced: a --width of 17 stays the user's error.
    let mut at_default = request.clone();
    let default = GenerateRequest::for_package(manifest, "");
    if args.width.is_none() {
        at_default.width = default.width;
    }
    if args.height.is_none() {
        at_default.height = default.height;
    }
    if zimage::pipeline::check_request(&at_default, manifest).is_err() {
        return error;
    }
    zimage::Error::InvalidRequest(format!(
        "{message} (the size of {}, its sides floored to multiples of {}; give --width and --height to resize it)",
        picture.display(),
        manifest.size_multiple()
    ))
}

/// An image error about `path`'s contents names the file.
fn located(path: &Path, e: zimage::Error) -> zimage::Error {
    match e {
        zimage::Error::Image(m) => zimage::Error::Image(format!("{}: {m}", path.display())),
        other => other,
    }
}

/// Warns that a prompt (`what`) was cut to the kept tokens (for edits: the instruction's
/// segment).
pub(crate) fn warn_if_truncated(what: &str, tokens: &TokenizedPrompt) {
    if tokens.truncated() {
        log::stderr_line(
            "warning",
            &format!(
                "the {what} has {} tokens with the chat template; only the first {} are used (--max-sequence-length)",
                tokens.full_length,
                tokens.ids.len()
            ),
        );
    }
}

fn parse_preprocess(value: &str) -> Result<ControlPreprocess, String> {
    value.parse().map_err(|e: zimage::Error| e.to_string())
}

/// The generation parameters stored in each PNG: the SDK's list (the server writes the same),
/// with the input pictures named by the paths given.
fn png_text(
    args: &GenerateArgs,
    request: &GenerateRequest,
    generation: &Generation,
    pipeline: &Pipeline,
    index: usize,
) -> Vec<(&'static str, String)> {
    let name = |path: Option<&Path>| path.map(|p| p.display().to_string()).unwrap_or_default();
    let inputs = InputNames { init_image: name(args.init_image.as_deref()), mask: name(args.mask.as_deref()) };
    let mut text = image_parameters(request, generation, index, pipeline.package_dir(), &pipeline.loras(), &inputs);
    let control = ControlNames {
        controlnet: pipeline.controlnet().unwrap_or_default(),
        control_image: name(args.control_image.as_deref()),
        preprocess: args.control_preprocess.name(),
        inpaint_image: name(args.init_image.as_deref()),
        mask: name(args.mask.as_deref()),
    };
    text.extend(control_parameters(request, &control));
    text
}

fn summary_json(
    args: &GenerateArgs,
    request: &GenerateRequest,
    generation: &Generation,
    pipeline: &Pipeline,
    files: &[PathBuf],
    latents_file: Option<&Path>,
) -> Value {
    let _ = args;
    let providers = pipeline.providers();
    json!({
        "files": files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "latents_file": latents_file.map(|p| p.display().to_string()),
        "seed": generation.seed,
        "enhanced_prompt": generation.enhanced_prompt,
        "width": request.width,
        "height": request.height,
        "steps": request.steps,
        "count": request.count,
        "guidance": request.guidance_scale,
        "cfg_normalization": request.cfg_normalization,
        "cfg_truncation": request.cfg_truncation,
        "strength": request.init_image.as_ref().map(|i| i.strength),
        "controlnet": pipeline.controlnet(),
        "control_scale": request.control.as_ref().map(|c| c.conditioning_scale),
        "model": pipeline.package_dir().display().to_string(),
        "precision": pipeline.manifest().precision.name(),
        "quantization": quantization_json(pipeline.manifest()),
        "vae_decoder": generation.vae_decoder,
        "vae_tiling": generation.vae_tiling.map(|t| json!({ "tile_size": t.tile_size, "overlap": t.overlap })),
        "loras": lora_records(&pipeline.loras()),
        "runtime_library": pipeline.runtime_library().display().to_string(),
        "providers": {
            "text_encoder": providers.text_encoder.to_string(),
            "transformer": providers.transformer.to_string(),
            "vae_decoder": providers.vae_decoder.to_string(),
            "vae_encoder": providers.vae_encoder.to_string(),
        },
        "prompt_tokens": tokens_json(&generation.prompt_tokens),
        "negative_prompt_tokens": generation.negative_prompt_tokens.as_ref().map(tokens_json),
        "timings": timings_json(&generation.timings, pipeline.load_time()),
    })
}

fn tokens_json(tokens: &TokenizedPrompt) -> Value {
    json!({ "used": tokens.ids.len(), "total": tokens.full_length, "truncated": tokens.truncated() })
}

/// Per-stage seconds of one generation, plus the pipeline's load time.
/// The package's quantization in `--json` summaries (generations and edits); null for float
/// packages.
pub(crate) fn quantization_json(manifest: &zimage::Manifest) -> Value {
    manifest.quantization.as_ref().map_or(Value::Null, |q| {
        json!({
            "weights": q.weights.name(), "block_size": q.block_size, "method": q.method,
            "activations": q.activations.map(|a| a.name()),
            "text_encoder_weights": q.text_encoder_weights().name(),
        })
    })
}

pub fn timings_json(t: &Timings, load: Duration) -> Value {
    json!({
        "load_s": secs(load),
        "tokenize_s": secs(t.tokenize),
        "text_encode_s": secs(t.text_encode),
        "denoise_steps_s": t.denoise_steps.iter().copied().map(secs).collect::<Vec<_>>(),
        "denoise_s": secs(t.denoise_steps.iter().sum()),
        "vae_decode_s": secs(t.vae_decode),
        "previews_s": secs(t.previews),
        "total_s": secs(t.total),
        "onnx_runtime_s": secs(t.onnx_runtime),
        // Bytes the denoising loop copied between host and device (null: the host loop ran).
        "host_traffic": t.host_traffic.map(|h| json!({
            "setup_bytes": h.setup_bytes,
            "max_step_bytes": h.max_step_bytes,
            "final_bytes": h.final_bytes,
        })),
    })
}
