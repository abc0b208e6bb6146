//! `zimage generate`: one request to the SDK, PNG files with the parameters in text chunks,
//! optionally the final latents, and a summary (plain or JSON).

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use zimage::{image_io, GenerateRequest, Generation, InitImage, Pipeline, Progress, Prompt, Timings, TokenizedPrompt};

use crate::enhance::{self, EnhanceFlags};
use crate::model_args::ModelArgs;
use crate::output::secs;

/// diffusers' default strengths: ZImageImg2ImgPipeline 0.6, ZImageInpaintPipeline 1.0.

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// What to draw.
    #[arg(long, value_name = "TEXT")]
    prompt: String,
    /// What to steer away from; used only with --guidance above 0 [default: ""].
    #[arg(long, value_name = "TEXT")]
    negative_prompt: Option<String>,
    /// Image width in pixels, a multiple of 16 [default: 1024, or the --init-image width].
    #[arg(long, value_name = "W")]
    width: Option<u32>,
    /// Image height in pixels, a multiple of 16 [default: 1024, or the --init-image height].
    #[arg(long, value_name = "H")]
    height: Option<u32>,
    /// Denoising steps.
    #[arg(long, value_name = "N", default_value_t = GenerateRequest::default().steps)]
    steps: u32,
    /// Classifier-free guidance scale; 0 turns guidance off (Z-Image-Turbo's setting).
    #[arg(long, value_name = "G", default_value_t = GenerateRequest::default().guidance_scale)]
    guidance: f32,
    /// Cap the guided prediction's norm at F times the conditional one's; 0 = off.
    #[arg(long, value_name = "F", default_value_t = GenerateRequest::default().cfg_normalization)]
    cfg_normalization: f32,
    /// Stop guidance once the normalised time exceeds F; 1 = never.
    #[arg(long, value_name = "F", default_value_t = GenerateRequest::default().cfg_truncation)]
    cfg_truncation: f32,
    /// Noise seed (same seed, same settings: same image as diffusers) [default: random, reported].
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Images to generate from one noise tensor; with K > 1 they go to FILE-0.png, FILE-1.png, ...
    #[arg(long, value_name = "K", default_value_t = GenerateRequest::default().count)]
    count: u32,
    /// Where the PNG goes.
    #[arg(long, short, value_name = "FILE.png", default_value = "zimage.png")]
    output: PathBuf,
    /// Also write the final latents of all images as one float32 .npy array [K, C, h, w].
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
    /// Inpainting mask for --init-image, at the output size: white = repaint, black = keep.
    #[arg(long, value_name = "FILE", requires = "init_image")]
    mask: Option<PathBuf>,
    /// Print a JSON summary on stdout (files, seed, providers, timings, truncation).
    #[arg(long)]
    json: bool,
    /// Rewrite the prompt with the local prompt enhancer first; the rewritten prompt is
    /// printed and stored in the PNG parameters.
    #[arg(long)]
    enhance: bool,
    #[command(flatten)]
    enhance_flags: EnhanceFlags,
}

pub fn run(args: GenerateArgs) -> zimage::Result<()> {
    // Input images and output folders are checked before the (slow) model load, so that a
    // typo fails at once.
    let request = build_request(&args)?;
    let files = output_files(&args.output, request.count);
    for path in files.iter().chain(args.save_latents.as_ref()) {
        check_parent_exists(path)?;
    }

    let progress = StageProgress::new(std::io::stderr().is_terminal());
    progress.stage("loading model");
    let pipeline = args.model.load(args.count, args.guidance > 0.0)?;

    progress.stage("encoding prompt");
    let mut on_step = |p: &Progress| {
        progress.step(p);
        true
    };
    let result = if args.enhance {
        progress.stage("enhancing prompt");
        let enhancer = args.enhance_flags.load_for(&pipeline, &enhance::load_options(&args.model))?;
        pipeline.generate_enhanced(&enhancer, &args.enhance_flags.options(), &request, Some(&mut on_step))
    } else {
        pipeline.generate(&request, Some(&mut on_step))
    };
    progress.finish();
    let generation = result?;
    if let Some(enhanced) = &generation.enhanced_prompt {
        eprintln!("enhanced prompt: {enhanced}");
    }

    warn_if_truncated("prompt", &generation.prompt_tokens);
    if let Some(tokens) = &generation.negative_prompt_tokens {
        warn_if_truncated("negative prompt", tokens);
    }
    for (index, (image, path)) in generation.images.iter().zip(&files).enumerate() {
        let text = png_text(&args, &request, &generation, &pipeline, index);
        image_io::write_png(path, image, &text)?;
    }
    if let (Some(path), Some(latents)) = (&args.save_latents, &generation.latents) {
        image_io::write_npy(path, latents)?;
    }

    if args.json {
        let summary = summary_json(&args, &request, &generation, &pipeline, &files);
        println!("{}", serde_json::to_string_pretty(&summary).expect("JSON values serialise"));
    } else {
        for path in &files {
            println!("wrote {}", path.display());
        }
        if let Some(path) = &args.save_latents {
            println!("wrote {} (latents)", path.display());
        }
        println!(
            "seed {}, {}x{}, {} steps, {:.2} s (+{:.2} s loading)",
            generation.seed,
            request.width,
            request.height,
            request.steps,
            secs(generation.timings.total),
            secs(pipeline.load_time())
        );
    }
    Ok(())
}

fn build_request(args: &GenerateArgs) -> zimage::Result<GenerateRequest> {
    let mut request = GenerateRequest::new(args.prompt.as_str());
    request.negative_prompt = args.negative_prompt.clone().map(Prompt::Text);
    request.steps = args.steps;
    request.guidance_scale = args.guidance;
    request.cfg_normalization = args.cfg_normalization;
    request.cfg_truncation = args.cfg_truncation;
    request.seed = args.seed;
    request.count = args.count;
    request.max_sequence_length = args.max_sequence_length;
    request.return_latents = args.save_latents.is_some();

    let init = args.init_image.as_deref().map(image_io::load_rgb).transpose()?;
    // Without --width/--height an init image keeps its own size, as in diffusers' img2img.
    request.width = args.width.or(init.as_ref().map(|i| i.width)).unwrap_or(request.width);
    request.height = args.height.or(init.as_ref().map(|i| i.height)).unwrap_or(request.height);
    if let Some(image) = init {
        let mask = args.mask.as_deref().map(image_io::load_gray).transpose()?;
        let default_strength =
            if mask.is_some() { InitImage::DEFAULT_INPAINT_STRENGTH } else { InitImage::DEFAULT_STRENGTH };
        request.init_image = Some(InitImage {
            image: image_io::resize_rgb(&image, request.width, request.height)?,
            mask,
            strength: args.strength.unwrap_or(default_strength),
        });
    }
    Ok(request)
}

/// `out.png` for one image; `out-0.png`, `out-1.png`, ... for several.
pub fn output_files(output: &Path, count: u32) -> Vec<PathBuf> {
    if count <= 1 {
        return vec![output.to_path_buf()];
    }
    (0..count)
        .map(|i| {
            let mut name = OsString::from(output.file_stem().unwrap_or_default());
            name.push(format!("-{i}"));
            if let Some(ext) = output.extension() {
                name.push(".");
                name.push(ext);
            }
            output.with_file_name(name)
        })
        .collect()
}

fn check_parent_exists(path: &Path) -> zimage::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) if !parent.is_dir() => Err(zimage::Error::Io {
            path: parent.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "output folder does not exist"),
        }),
        _ => Ok(()),
    }
}

fn warn_if_truncated(what: &str, tokens: &TokenizedPrompt) {
    if tokens.truncated() {
        eprintln!(
            "zimage: warning: the {what} has {} tokens with the chat template; only the first {} are used (--max-sequence-length)",
            tokens.full_length,
            tokens.ids.len()
        );
    }
}

/// The generation parameters stored in each PNG (iTXt chunks, so any prompt text survives).
fn png_text(
    args: &GenerateArgs,
    request: &GenerateRequest,
    generation: &Generation,
    pipeline: &Pipeline,
    index: usize,
) -> Vec<(&'static str, String)> {
    let mut text = vec![
        ("prompt", generation.enhanced_prompt.clone().unwrap_or_else(|| args.prompt.clone())),
        ("negative_prompt", args.negative_prompt.clone().unwrap_or_default()),
        ("seed", generation.seed.to_string()),
        ("steps", request.steps.to_string()),
        ("size", format!("{}x{}", request.width, request.height)),
        ("guidance", request.guidance_scale.to_string()),
        ("cfg_normalization", request.cfg_normalization.to_string()),
        ("cfg_truncation", request.cfg_truncation.to_string()),
        // An image is reproduced from the seed only together with the batch it came from.
        ("count", request.count.to_string()),
        ("batch_index", index.to_string()),
        ("model", pipeline.package_dir().display().to_string()),
        ("software", format!("zimage {}", zimage::VERSION)),
    ];
    if generation.enhanced_prompt.is_some() {
        text.push(("original_prompt", args.prompt.clone()));
    }
    if let Some(n) = args.max_sequence_length {
        text.push(("max_sequence_length", n.to_string()));
    }
    if let Some(init) = &request.init_image {
        text.push(("init_image", args.init_image.as_deref().unwrap_or(Path::new("")).display().to_string()));
        text.push(("strength", init.strength.to_string()));
        if let Some(mask) = &args.mask {
            text.push(("mask", mask.display().to_string()));
        }
    }
    text
}

fn summary_json(
    args: &GenerateArgs,
    request: &GenerateRequest,
    generation: &Generation,
    pipeline: &Pipeline,
    files: &[PathBuf],
) -> Value {
    let providers = pipeline.providers();
    json!({
        "files": files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "latents_file": args.save_latents.as_ref().map(|p| p.display().to_string()),
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
        "model": pipeline.package_dir().display().to_string(),
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
pub fn timings_json(t: &Timings, load: Duration) -> Value {
    json!({
        "load_s": secs(load),
        "tokenize_s": secs(t.tokenize),
        "text_encode_s": secs(t.text_encode),
        "denoise_steps_s": t.denoise_steps.iter().copied().map(secs).collect::<Vec<_>>(),
        "denoise_s": secs(t.denoise_steps.iter().sum()),
        "vae_decode_s": secs(t.vae_decode),
        "total_s": secs(t.total),
        "onnx_runtime_s": secs(t.onnx_runtime),
    })
}

/// The terminal display: a spinner with the stage name, then a bar over the denoising steps.
/// Hidden when stderr is not a terminal, so logs and pipes stay clean.
pub struct StageProgress {
    bar: ProgressBar,
}

impl StageProgress {
    pub fn new(visible: bool) -> Self {
        let bar = if visible { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
        bar.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"));
        bar.enable_steady_tick(Duration::from_millis(120));
        StageProgress { bar }
    }

    pub fn stage(&self, name: impl Into<std::borrow::Cow<'static, str>>) {
        self.bar.set_message(name);
    }

    pub fn step(&self, p: &Progress) {
        if self.bar.length() != Some(p.total_steps as u64) {
            self.bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps, {elapsed} (eta {eta})")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            self.bar.set_length(p.total_steps as u64);
            self.bar.set_message("denoising");
        }
        self.bar.set_position(p.step as u64);
        if p.step == p.total_steps {
            self.bar.set_message("decoding");
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
