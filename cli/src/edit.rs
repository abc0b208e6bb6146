//! `zimage edit`: reference pictures + an instruction -> edited PNG files (ZImageOmniPipeline),
//! the parameters (with the references' names and sha256) in text chunks.

use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;
use zimage::{edit_parameters, image_io, EditRequest, Manifest, Progress, ReferenceRecord};

use crate::enhance::{self, EnhanceFlags};
use crate::generate::{enhance_options_group, quantization_json, timings_json, warn_if_truncated};
use crate::model_args::ModelArgs;
use crate::output::{
    out, output_files, output_format, refuse_previews_over_inputs, refuse_stdout, resolve_output, same_file, secs,
    Failure,
};
use crate::step_report::{ProgressMode, StageProgress, StepReport};
use crate::{interrupt, log};

#[derive(Args)]
#[command(group = enhance_options_group())]
pub struct EditArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A reference picture (PNG, JPEG, WebP); repeat for several, in order. The output takes
    /// the last one's size (cropped to a multiple of 16) unless --width and --height are given.
    /// Without any, ZImageOmniPipeline's text-to-image (1024x1024 unless --width / --height).
    #[arg(long = "image", value_name = "FILE")]
    images: Vec<PathBuf>,
    /// The edit instruction (may be empty).
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    prompt: String,
    /// What to steer away from under guidance [default: ""].
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    negative_prompt: Option<String>,
    /// Output width (with --height), a multiple of 16.
    #[arg(long, value_name = "W", requires = "height")]
    width: Option<u32>,
    /// Output height (with --width), a multiple of 16.
    #[arg(long, value_name = "H", requires = "width")]
    height: Option<u32>,
    /// Denoising steps [default: the package's, 50 for ZImageOmniPipeline].
    #[arg(long, value_name = "N")]
    steps: Option<usize>,
    /// Guidance scale; 0 turns guidance off [default: the package's, 5.0].
    #[arg(long, value_name = "G")]
    guidance: Option<f32>,
    /// Cap the guided prediction's norm at F times the conditional one's; 0 = off.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    cfg_normalization: f32,
    /// Stop guidance once the normalised time exceeds F [default: the package's, 1 = never].
    #[arg(long, value_name = "F")]
    cfg_truncation: Option<f32>,
    /// Noise seed [default: random, reported].
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Images to generate; with K > 1 they go to FILE-0.png, FILE-1.png, ...
    #[arg(long, value_name = "K", default_value_t = 1)]
    count: u32,
    /// Where the PNG goes (a folder: FOLDER/zimage-edit.png). Written to a temporary file
    /// beside it and renamed when complete.
    #[arg(long, short, value_name = "FILE.png", default_value = "zimage-edit.png")]
    output: PathBuf,
    /// Also write the final latents as one float32 .npy array [K, C, h, w] (a folder:
    /// FOLDER/latents.npy).
    #[arg(long, value_name = "FILE.npy")]
    save_latents: Option<PathBuf>,
    /// Tokens kept per text segment [default: the package's, 512].
    #[arg(long, value_name = "N")]
    max_sequence_length: Option<usize>,
    /// Write N previews while editing, as `zimage generate --previews` does (they stay when
    /// the run then fails or is cancelled).
    #[arg(long, value_name = "N", default_value_t = 0)]
    previews: u32,
    /// JPEG quality, 1..=100, for an output named .jpg or .jpeg [default: 95]. The output's
    /// extension picks the format: .jpg/.jpeg JPEG, .webp lossless WebP, anything else PNG
    /// (only PNG records the generation parameters).
    #[arg(long, value_name = "Q", value_parser = clap::value_parser!(u8).range(1..=100))]
    quality: Option<u8>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
    /// Progress display on stderr.
    #[arg(long, value_name = "WHEN", value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
    /// A LoRA (.safetensors: diffusers/PEFT, kohya, ComfyUI, LoKr) merged into the transformer at
    /// SCALE (default 1.0); repeat for several. Recorded in the PNG parameters with its sha256.
    #[arg(long = "lora", value_name = "FILE[:SCALE]", value_parser = zimage_load_flags::parse_lora)]
    loras: Vec<zimage::LoraFile>,
    /// Rewrite the instruction with the local prompt enhancer first.
    #[arg(long)]
    enhance: bool,
    #[command(flatten)]
    enhance_flags: EnhanceFlags,
}

pub fn run(args: EditArgs) -> Result<(), Failure> {
    // The package must edit at all before anything is decoded or loaded.
    let manifest = Manifest::read(&args.model.model)?;
    zimage::pipeline::edit::check_edit_package(&manifest, &args.model.model, args.images.len())?;
    // Adapters are read and checked before the model load too.
    let loras = args.loras.iter().map(zimage::LoraFile::load).collect::<zimage::Result<Vec<_>>>()?;
    let files_base = resolve_output(&args.output, "zimage-edit.png");
    let format = output_format(&files_base, "-o", args.quality)?;
    if let Some(latents) = &args.save_latents {
        refuse_stdout(latents, "--save-latents")?;
    }
    let files = output_files(&files_base, args.count);
    let inputs: Vec<&std::path::Path> = args.images.iter().map(|p| p.as_path()).collect();
    let steps = args.steps.or(manifest.edit.as_ref().map(|e| e.defaults.num_inference_steps)).unwrap_or(0);
    refuse_previews_over_inputs(&files_base, args.count, args.previews, steps, &inputs)?;
    let latents_file = args.save_latents.as_deref().map(|p| resolve_output(p, "latents.npy"));
    for path in files.iter().chain(latents_file.as_ref()) {
        image_io::check_writable(path)?;
    }
    // As `zimage generate` refuses it: the latents would be renamed over the PNG just written.
    if let Some(latents) = &latents_file {
        if let Some(png) = files.iter().find(|png| same_file(png, latents)) {
            return Err(Failure::Usage(format!(
                "-o and --save-latents name the same file ({}); give the latents their own name",
                png.display()
            )));
        }
    }
    let mut images = Vec::with_capacity(args.images.len());
    let mut records = Vec::with_capacity(args.images.len());
    for (index, path) in args.images.iter().enumerate() {
        let bytes = image_io::read_image_bytes(path)?;
        let image = zimage::pipeline::edit::decode_reference(&manifest, &args.model.model, &bytes, index + 1);
        images.push(image.map_err(|e| located(path, e))?);
        records.push(ReferenceRecord::new(&path.to_string_lossy(), &bytes));
    }
    let mut request = EditRequest::new(args.prompt.clone(), images);
    request.negative_prompt = args.negative_prompt.clone();
    request.width = args.width;
    request.height = args.height;
    request.steps = args.steps;
    request.guidance_scale = args.guidance;
    request.cfg_normalization = args.cfg_normalization;
    request.cfg_truncation = args.cfg_truncation;
    request.seed = args.seed;
    request.count = args.count;
    request.max_sequence_length = args.max_sequence_length;
    request.return_latents = latents_file.is_some();
    request.previews = args.previews;
    // The request is checked before the model is loaded (seconds to minutes with real weights).
    zimage::pipeline::edit::check_edit_request(&manifest, &args.model.model, &request)?;

    let progress = StageProgress::new(args.progress.visible());
    progress.stage("loading model");
    let guidance = args.guidance.unwrap_or(manifest.edit.as_ref().map_or(0.0, |e| e.defaults.guidance_scale)) > 0.0;
    if args.negative_prompt.is_some() && !guidance {
        log::stderr_line(
            "warning",
            "--negative-prompt is not used without guidance (--guidance 0); give --guidance above 0 to steer away from it",
        );
    }
    let pipeline = args.model.load_with_loras(args.count, guidance, loras, None)?;
    pipeline.check_edit(&request)?;
    let previews_beside = (args.previews > 0).then(|| (files_base.clone(), args.count, format));
    let mut report = StepReport::new(&progress, args.progress, previews_beside);
    let mut on_step = |p: &Progress| report.on_step(p);
    progress.stage("encoding references");
    let result = interrupt::run_cancellable(|| {
        if args.enhance {
            let enhancer = args.enhance_flags.load_for(&pipeline, &enhance::load_options(&args.model))?;
            pipeline.edit_enhanced(&enhancer, &args.enhance_flags.options(), &request, Some(&mut on_step))
        } else {
            pipeline.edit(&request, Some(&mut on_step))
        }
    });
    progress.finish();
    let preview_files = std::mem::take(&mut report.preview_files);
    let generation = result.map_err(|e| report.failure(e))?;
    if let Some(enhanced) = &generation.enhanced_prompt {
        log::stderr_line("info", &format!("enhanced instruction: {enhanced}"));
    }
    warn_if_truncated("instruction", &generation.prompt_tokens);
    if let Some(tokens) = &generation.negative_prompt_tokens {
        warn_if_truncated("negative prompt", tokens);
    }
    let defaults = &manifest.edit.as_ref().expect("checked above").defaults;
    let mut staged = Vec::with_capacity(files.len() + 1);
    for (index, (image, path)) in generation.images.iter().zip(&files).enumerate() {
        let text = edit_parameters(
            &request,
            &generation,
            index,
            pipeline.package_dir(),
            defaults,
            &records,
            &pipeline.loras(),
        );
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

    let (width, height) = generation.images.first().map_or((0, 0), |i| (i.width, i.height));
    if args.json {
        let summary = json!({
            "files": files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "previews": preview_files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "latents_file": latents_file.as_ref().map(|p| p.display().to_string()),
            "seed": generation.seed,
            "width": width,
            "height": height,
            "reference_images": records.iter().map(|r| json!({"file": r.file, "sha256": r.sha256})).collect::<Vec<_>>(),
            "enhanced_prompt": generation.enhanced_prompt,
            "loras": zimage::lora_records(&pipeline.loras()),
            "model": pipeline.package_dir().display().to_string(),
            "precision": pipeline.manifest().precision.name(),
            "quantization": quantization_json(pipeline.manifest()),
            "timings": timings_json(&generation.timings, pipeline.load_time()),
        });
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
            "seed {}, {width}x{height}, {} references, {:.2} s (+{:.2} s loading)\n",
            generation.seed,
            records.len(),
            secs(generation.timings.total),
            secs(pipeline.load_time())
        );
        out(&text)?;
    }
    Ok(())
}

/// A reference's refusal with its file: unreadable (an image error) or against the model's
/// reference rules (an invalid request: too small, too elongated, too large).
fn located(path: &Path, e: zimage::Error) -> zimage::Error {
    match e {
        zimage::Error::Image(m) => zimage::Error::Image(format!("{}: {m}", path.display())),
        zimage::Error::InvalidRequest(m) => zimage::Error::InvalidRequest(format!("{}: {m}", path.display())),
        other => other,
    }
}
