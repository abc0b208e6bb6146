//! The public entry point: a [`Pipeline`] loaded from a model package, and
//! [`Pipeline::generate`] for text-to-image.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::{Array4, Axis, Ix4};

use crate::cancel::{CancelHandle, Registry, RunControl};
use crate::denoising::{CaptionBatch, Denoiser, Guidance};
use crate::error::{Error, Result};
use crate::gpu::GpuOptions;
use crate::image_io::{self, GrayImage, RgbImage};
use crate::image_to_image::{self, Start};
use crate::manifest::{GraphEntry, Manifest};
use crate::noise::TorchGenerator;
use crate::prompt_enhancer::{EnhanceOptions, PromptEnhancer};
use crate::runtime::{self, Device, ProviderConfig, SessionSettings};
use crate::scheduler::Schedule;
use crate::session::{Graph, GraphSlot, MemoryMode};
use crate::text_encoding::{PromptEmbedding, TextEncoder, TokenizedPrompt};
use crate::vae::Vae;

/// How a pipeline is loaded.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The ONNX Runtime shared library; `None` searches (see [`runtime::library_candidates`]).
    pub runtime_library: Option<PathBuf>,
    /// Where every graph runs unless overridden below.
    pub device: Device,
    /// Where the transformer runs, when it should differ from `device` (e.g. TensorRT for the
    /// transformer, CUDA for the rest).
    pub transformer_device: Option<Device>,
    /// Intra-op threads per graph; `None` lets ONNX Runtime pick.
    pub threads: Option<usize>,
    /// Check the sha256 of every file, also the large ones (always done below 64 MB).
    pub verify_checksums: bool,
    /// Fall back to CPU when the requested provider cannot be set up, instead of failing.
    pub allow_cpu_fallback: bool,
    /// Keep every graph loaded, or load each for its stage only.
    pub memory_mode: MemoryMode,
    /// TensorRT profiles and caches, CUDA memory limit (ignored on CPU).
    pub gpu: GpuOptions,
    /// CPU: keep ONNX Runtime's optimised transformer and VAE graphs in this folder so later
    /// loads skip graph optimisation (the text encoder loads faster without). `None`: off.
    pub optimized_model_cache: Option<PathBuf>,
    /// CPU: decode with the package's `vae_decoder_cpu`, whose wide 3x3 convolutions run as
    /// Winograd F(4x4, 3x3): same weights, images within one 8-bit level of `vae_decoder`'s,
    /// decoding about 15-20 % faster, at the cost of more activation memory while decoding
    /// (mid-size model at 512x512: +0.2 to +0.5 GB peak RSS). Off: `vae_decoder`. Ignored where
    /// the decoder runs on a GPU; an InvalidRequest error when the package has no such graph.
    pub winograd_vae: bool,
}

impl LoadOptions {
    /// Whether the CUDA arena grows by what is asked for (the sequential mode's smaller peak)
    /// rather than in powers of two.
    pub(crate) fn exact_gpu_arena(&self) -> bool {
        self.memory_mode == MemoryMode::Sequential
    }

    /// The session settings every graph starts from; stages adjust their own.
    pub(crate) fn session_settings(&self) -> SessionSettings {
        SessionSettings {
            intra_threads: self.threads,
            allow_cpu_fallback: self.allow_cpu_fallback,
            shares_weights: false,
            release_activations: false,
            optimized_cache: None,
        }
    }
}

/// Caps that keep a request within what the graphs and memory can hold.
pub const MAX_STEPS: u32 = 1000;
pub const MAX_IMAGES_PER_REQUEST: u32 = 64;

/// A prompt given as text, or already encoded with [`Pipeline::encode_prompt`].
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
/// no guidance, a random seed.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    /// Used only with guidance (`guidance_scale > 0`); `None` means the empty prompt.
    pub negative_prompt: Option<Prompt>,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f32,
    /// 0 = off; otherwise the guided prediction's norm is capped at this factor times the
    /// conditional one's.
    pub cfg_normalization: f32,
    /// Guidance stops at steps whose normalised time exceeds this (1.0 = never stops).
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
}

/// The picture an image-to-image or inpainting request starts from.
#[derive(Debug, Clone)]
pub struct InitImage {
    /// Must already have the request's width and height (see `image_io::resize_rgb`).
    pub image: RgbImage,
    /// Inpainting mask, same size as `image`: white (>= 128 after binarising) = repaint.
    pub mask: Option<GrayImage>,
    /// How much of the picture is re-generated, 0..=1 (1 = all of it).
    pub strength: f64,
}

impl InitImage {
    /// diffusers' default strength for image-to-image.
    pub const DEFAULT_STRENGTH: f64 = 0.6;
    /// diffusers' default strength for inpainting.
    pub const DEFAULT_INPAINT_STRENGTH: f64 = 1.0;
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
        }
    }
}

impl GenerateRequest {
    pub fn new(prompt: impl Into<Prompt>) -> Self {
        GenerateRequest { prompt: prompt.into(), ..Default::default() }
    }
}

/// Where a generation is, passed to the progress callback.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    pub step: usize,
    pub total_steps: usize,
    pub elapsed: Duration,
}

/// Time spent in each stage of one generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    pub tokenize: Duration,
    pub text_encode: Duration,
    pub denoise_steps: Vec<Duration>,
    pub vae_decode: Duration,
    pub total: Duration,
    /// Time inside ONNX Runtime calls, summed over all stages.
    pub onnx_runtime: Duration,
}

/// The result of [`Pipeline::generate`].
#[derive(Debug, Clone)]
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
}

impl Generation {
    /// True when the prompt was longer than `max_sequence_length` and its end was dropped.
    pub fn prompt_truncated(&self) -> bool {
        self.prompt_tokens.truncated()
    }
}

/// Which provider runs each graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Providers {
    pub text_encoder: Device,
    pub transformer: Device,
    pub vae_decoder: Device,
    pub vae_encoder: Device,
}

/// A loaded model package. `Send + Sync`: one pipeline can serve several threads (each graph
/// call takes a per-graph lock, so concurrent generations interleave rather than run in
/// parallel inside one graph).
pub struct Pipeline {
    dir: PathBuf,
    manifest: Manifest,
    text: TextEncoder,
    vae: Vae,
    text_encoder: GraphSlot,
    transformer: GraphSlot,
    vae_decoder: GraphSlot,
    vae_encoder: GraphSlot,
    registry: Arc<Registry>,
    /// Set when a graph runs on TensorRT: requests must fit its declared profiles.
    tensorrt_profile: Option<GpuOptions>,
    load_time: Duration,
    runtime_library: PathBuf,
}

impl Pipeline {
    /// Loads the package in `dir`: checks the manifest and files, loads ONNX Runtime (once
    /// per process) and creates a session per graph.
    pub fn load(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Pipeline> {
        let start = Instant::now();
        let dir = dir.as_ref().to_path_buf();
        if let Some(n) = options.threads {
            if n == 0 || n > 1024 {
                return Err(Error::invalid(format!("threads must be 1..=1024 (got {n}); leave unset for the default")));
            }
        }
        let manifest = Manifest::load(&dir, options.verify_checksums)?;
        check_precision_runs_on(&manifest.precision, options)?;
        let rt = runtime::runtime(options.runtime_library.as_deref())?;
        let settings = options.session_settings();
        // With an enhancer decoder in the package, the text encoder shares its weights file.
        let text_settings =
            SessionSettings { shares_weights: manifest.graphs.text_decoder.is_some(), ..settings.clone() };
        let uses_tensorrt = [Some(options.device), options.transformer_device]
            .iter()
            .any(|d| matches!(d, Some(Device::TensorRt { .. })));
        if uses_tensorrt {
            options.gpu.check(&manifest)?;
        }
        let graph_with = |name: &'static str, entry: &GraphEntry, device: Device, settings: &SessionSettings| {
            let path = Manifest::resolve(&dir, &entry.path);
            let provider = ProviderConfig::new(device, name, &manifest, &options.gpu, options.exact_gpu_arena());
            let mut settings = settings.clone();
            if name != "text_encoder" {
                settings.optimized_cache = options
                    .optimized_model_cache
                    .as_ref()
                    .map(|base| runtime::optimized_cache_dir(base, name, &entry.sha256));
            }
            GraphSlot::load(rt, name, path, provider, &settings, options.memory_mode)
        };
        let graph = |name: &'static str, device: Device| graph_with(name, manifest.graphs.get(name), device, &settings);
        let text = TextEncoder::new(&Manifest::resolve(&dir, &manifest.tokenizer.path), manifest.text_encoder.clone())?;
        let text_encoder = graph_with("text_encoder", &manifest.graphs.text_encoder, options.device, &text_settings)?;
        let transformer = graph("transformer", options.transformer_device.unwrap_or(options.device))?;
        let vae_settings = SessionSettings { release_activations: true, ..settings.clone() };
        let decoder_entry = vae_decoder_entry(&manifest, options.device, options.winograd_vae)?;
        let vae_decoder = graph_with("vae_decoder", decoder_entry, options.device, &vae_settings)?;
        let vae_encoder = graph_with("vae_encoder", &manifest.graphs.vae_encoder, options.device, &vae_settings)?;
        let vae = Vae { info: manifest.vae.clone() };
        Ok(Pipeline {
            dir,
            manifest,
            text,
            vae,
            text_encoder,
            transformer,
            vae_decoder,
            vae_encoder,
            registry: Arc::new(Registry::default()),
            tensorrt_profile: uses_tensorrt.then(|| options.gpu.clone()),
            load_time: start.elapsed(),
            runtime_library: rt.library_path.clone(),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn package_dir(&self) -> &Path {
        &self.dir
    }

    /// How long [`Pipeline::load`] took (manifest checks and session creation).
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// The ONNX Runtime library this process loaded.
    pub fn runtime_library(&self) -> &Path {
        &self.runtime_library
    }

    pub fn providers(&self) -> Providers {
        Providers {
            text_encoder: self.text_encoder.device(),
            transformer: self.transformer.device(),
            vae_decoder: self.vae_decoder.device(),
            vae_encoder: self.vae_encoder.device(),
        }
    }

    /// The graph file images are decoded with: the package's `vae_decoder_cpu` with
    /// [`LoadOptions::winograd_vae`] on the CPU, otherwise its `vae_decoder`.
    pub fn vae_decoder_file(&self) -> &Path {
        self.vae_decoder.path()
    }

    /// A handle that cancels the generations running on this pipeline, from any thread.
    pub fn cancel_handle(&self) -> CancelHandle {
        CancelHandle { registry: Arc::clone(&self.registry) }
    }

    /// Token ids of `prompt` after the chat template and truncation to `max_sequence_length`
    /// (the package's default, 512, when `None`).
    pub fn tokenize(&self, prompt: &str, max_sequence_length: Option<usize>) -> Result<TokenizedPrompt> {
        let max = max_sequence_length.unwrap_or(self.text.default_max_sequence_length());
        if max == 0 {
            return Err(Error::invalid("max_sequence_length must be at least 1"));
        }
        self.text.tokenize(prompt, max)
    }

    /// Tokenizes for the transformer: the caption must fit the model's position table.
    fn caption_tokens(&self, prompt: &str, max_sequence_length: Option<usize>) -> Result<TokenizedPrompt> {
        let tokens = self.tokenize(prompt, max_sequence_length)?;
        let limit = self.manifest.transformer.max_caption_tokens;
        if tokens.ids.len() > limit {
            return Err(Error::invalid(format!(
                "the prompt has {} tokens after truncation; this model takes at most {limit}: shorten it or lower max_sequence_length",
                tokens.ids.len()
            )));
        }
        Ok(tokens)
    }

    /// Encodes a prompt once, for use in any number of [`GenerateRequest`]s.
    pub fn encode_prompt(&self, prompt: &str, max_sequence_length: Option<usize>) -> Result<PromptEmbedding> {
        let control = self.registry.begin()?;
        let tokens = self.caption_tokens(prompt, max_sequence_length)?;
        let mut ort_time = Duration::ZERO;
        self.text.encode(&*self.text_encoder.acquire()?, tokens, &control, &mut ort_time)
    }

    /// Generates `request.count` images. `progress` is called after every denoising step;
    /// returning `false` stops the run with [`Error::Cancelled`].
    pub fn generate(
        &self,
        request: &GenerateRequest,
        mut progress: Option<&mut dyn FnMut(&Progress) -> bool>,
    ) -> Result<Generation> {
        let start = Instant::now();
        let plan = self.plan(request)?;
        let control = self.registry.begin()?;
        let mut timings = Timings::default();
        let mut ort_time = Duration::ZERO;

        let (positive, negative) =
            self.encode_request_prompts(request, plan.guidance.enabled(), &control, &mut timings, &mut ort_time)?;

        let seed = request.seed.unwrap_or_else(random_seed);
        let schedule = Schedule::new(&self.manifest.scheduler, plan.steps, plan.image_seq_len);
        let start_state = match &request.init_image {
            Some(init) => image_to_image::prepare(
                &self.vae,
                &*self.vae_encoder.acquire()?,
                init,
                &plan.latent_shape,
                &schedule,
                seed,
                request.latents.as_ref(),
                &control,
                &mut ort_time,
            )?,
            None => Start {
                latents: match &request.latents {
                    Some(l) => l.clone(),
                    None => {
                        TorchGenerator::new(seed).randn(&plan.latent_shape).into_dimensionality::<Ix4>().expect("4-d")
                    }
                },
                first_step: 0,
                inpaint: None,
            },
        };
        let mut latents = start_state.latents;
        let count = plan.latent_shape[0];
        let positive_items: Vec<&PromptEmbedding> = std::iter::repeat_n(&positive, count).collect();
        let positive_and_negative = negative.as_ref().map(|n| {
            let mut items = positive_items.clone();
            items.extend(std::iter::repeat_n(n, count));
            CaptionBatch::new(&items)
        });
        let transformer = self.transformer.acquire()?;
        let denoiser = Denoiser {
            transformer: &transformer,
            schedule: &schedule,
            first_step: start_state.first_step,
            guidance: plan.guidance,
            positive: CaptionBatch::new(&positive_items),
            positive_and_negative,
            precision: &self.manifest.precision,
        };
        let mut on_step = |step: usize, total: usize| -> bool {
            match progress.as_deref_mut() {
                Some(cb) => cb(&Progress { step, total_steps: total, elapsed: start.elapsed() }),
                None => true,
            }
        };
        let inpaint = start_state.inpaint;
        let mut after_step = |step: usize, latents: &mut Array4<f32>| {
            if let Some(blend) = &inpaint {
                blend.apply(step, &schedule, latents);
            }
        };
        denoiser.run(
            &mut latents,
            &control,
            &mut ort_time,
            &mut timings.denoise_steps,
            &mut on_step,
            &mut after_step,
        )?;

        drop(denoiser);
        drop(transformer);
        let decode_start = Instant::now();
        let decoded = self.vae.decode(&*self.vae_decoder.acquire()?, &latents, &control, &mut ort_time)?;
        let images = decoded.iter().map(|d| image_io::to_rgb8(d.index_axis(Axis(0), 0))).collect();
        timings.vae_decode = decode_start.elapsed();
        timings.total = start.elapsed();
        timings.onnx_runtime = ort_time;
        Ok(Generation {
            images,
            latents: request.return_latents.then_some(latents),
            seed,
            prompt_tokens: positive.tokens.clone(),
            negative_prompt_tokens: negative.map(|n| n.tokens.clone()),
            enhanced_prompt: None,
            timings,
        })
    }

    fn encode_request_prompts(
        &self,
        request: &GenerateRequest,
        with_negative: bool,
        control: &RunControl,
        timings: &mut Timings,
        ort_time: &mut Duration,
    ) -> Result<(PromptEmbedding, Option<PromptEmbedding>)> {
        let mut graph: Option<std::sync::Arc<Graph>> = None;
        let mut encode = |prompt: &Prompt| -> Result<PromptEmbedding> {
            match prompt {
                Prompt::Embedded(e) => {
                    self.check_embedding(e)?;
                    Ok(e.clone())
                }
                Prompt::Text(text) => {
                    let t0 = Instant::now();
                    let tokens = self.caption_tokens(text, request.max_sequence_length)?;
                    timings.tokenize += t0.elapsed();
                    let t1 = Instant::now();
                    if graph.is_none() {
                        graph = Some(self.text_encoder.acquire()?);
                    }
                    let e = self.text.encode(graph.as_deref().expect("set above"), tokens, control, ort_time)?;
                    timings.text_encode += t1.elapsed();
                    Ok(e)
                }
            }
        };
        let positive = encode(&request.prompt)?;
        let negative = if with_negative {
            let empty = Prompt::Text(String::new());
            Some(encode(request.negative_prompt.as_ref().unwrap_or(&empty))?)
        } else {
            None
        };
        Ok((positive, negative))
    }

    fn check_embedding(&self, e: &PromptEmbedding) -> Result<()> {
        let (n, d) = e.features.dim();
        let t = &self.manifest.transformer;
        if d != t.cap_feat_dim {
            return Err(Error::invalid(format!("prompt embedding has width {d}, this model needs {}", t.cap_feat_dim)));
        }
        if n == 0 || n > t.max_caption_tokens {
            return Err(Error::invalid(format!(
                "prompt embedding has {n} tokens; allowed 1..={}",
                t.max_caption_tokens
            )));
        }
        if e.features.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid("prompt embedding holds non-finite values"));
        }
        Ok(())
    }

    /// One transformer forward on caller-built inputs: `latents [B,C,h,w]`, `timestep [B]`
    /// (already `(1000 - t)/1000`), caption features `[B,L,D]` and their mask `[B,L]`.
    /// Low-level: for checking a package against a reference, not needed to generate.
    pub fn transformer_forward(
        &self,
        latents: &Array4<f32>,
        timestep: &ndarray::Array1<f32>,
        cap_feats: &ndarray::Array3<f32>,
        cap_mask: &ndarray::Array2<bool>,
    ) -> Result<Array4<f32>> {
        use ort::value::TensorRef;
        let b = latents.shape()[0];
        let t = &self.manifest.transformer;
        if timestep.len() != b
            || cap_feats.shape()[0] != b
            || cap_mask.dim() != (b, cap_feats.shape()[1])
            || cap_feats.shape()[2] != t.cap_feat_dim
            || latents.shape()[1] != t.in_channels
        {
            return Err(Error::invalid("transformer_forward: inconsistent input shapes"));
        }
        let control = self.registry.begin()?;
        let err = |e: ort::Error| Error::inference("transformer", e);
        let inputs = vec![
            ("latents", TensorRef::from_array_view(latents).map_err(err)?.into()),
            ("timestep", TensorRef::from_array_view(timestep).map_err(err)?.into()),
            ("cap_feats", TensorRef::from_array_view(cap_feats).map_err(err)?.into()),
            ("cap_mask", TensorRef::from_array_view(cap_mask).map_err(err)?.into()),
        ];
        let mut ort_time = Duration::ZERO;
        let out = self.transformer.acquire()?.run(inputs, &["noise_pred"], &control, &mut ort_time)?.remove(0);
        out.into_dimensionality::<Ix4>().map_err(|e| Error::inference("transformer", e))
    }

    /// Rewrites the request's text prompt with `enhancer` first, then generates from the
    /// rewritten prompt; the result's `enhanced_prompt` holds it.
    pub fn generate_enhanced(
        &self,
        enhancer: &PromptEnhancer,
        options: &EnhanceOptions,
        request: &GenerateRequest,
        progress: Option<&mut dyn FnMut(&Progress) -> bool>,
    ) -> Result<Generation> {
        let Prompt::Text(text) = &request.prompt else {
            return Err(Error::invalid("only a text prompt can be enhanced"));
        };
        self.plan(request)?;
        let enhancement = enhancer.enhance(text, options, None)?;
        if enhancement.text.trim().is_empty() {
            return Err(Error::inference(
                "prompt enhancer",
                format!(
                    "no description within {} new tokens ({:?}); raise max_new_tokens or turn thinking off",
                    options.max_new_tokens, enhancement.finish
                ),
            ));
        }
        let rewritten = GenerateRequest { prompt: Prompt::Text(enhancement.text.clone()), ..request.clone() };
        let mut result = self.generate(&rewritten, progress)?;
        result.enhanced_prompt = Some(enhancement.text);
        Ok(result)
    }

    /// Checks a request against the package and derives its shapes.
    fn plan(&self, r: &GenerateRequest) -> Result<Plan> {
        let m = &self.manifest;
        let multiple = m.size_multiple();
        for (name, value, max) in [("width", r.width, m.max_image_width()), ("height", r.height, m.max_image_height())]
        {
            if value == 0 || !(value as usize).is_multiple_of(multiple) {
                return Err(Error::invalid(format!("{name} {value} must be a positive multiple of {multiple}")));
            }
            if value as usize > max {
                return Err(Error::invalid(format!("{name} {value} exceeds this model's limit of {max} pixels")));
            }
        }
        if r.steps == 0 || r.steps > MAX_STEPS {
            return Err(Error::invalid(format!("steps must be 1..={MAX_STEPS} (got {})", r.steps)));
        }
        if r.count == 0 || r.count > MAX_IMAGES_PER_REQUEST {
            return Err(Error::invalid(format!("count must be 1..={MAX_IMAGES_PER_REQUEST} (got {})", r.count)));
        }
        for (name, v) in [
            ("guidance_scale", r.guidance_scale),
            ("cfg_normalization", r.cfg_normalization),
            ("cfg_truncation", r.cfg_truncation),
        ] {
            if !v.is_finite() {
                return Err(Error::invalid(format!("{name} must be finite (got {v})")));
            }
        }
        if r.guidance_scale < 0.0 || r.cfg_normalization < 0.0 {
            return Err(Error::invalid("guidance_scale and cfg_normalization must not be negative"));
        }
        if let Some(gpu) = &self.tensorrt_profile {
            if !gpu.covers(r.width, r.height, r.count) {
                let range = gpu.resolutions;
                return Err(Error::invalid(format!(
                    "{}x{} x{} is outside the TensorRT profile declared at load ({}x{} to {}x{}, up to {} images)",
                    r.width, r.height, r.count, range.min.0, range.min.1, range.max.0, range.max.1, gpu.max_images
                )));
            }
        }
        let channels = m.vae.latent_channels;
        let h = 2 * (r.height as usize / multiple);
        let w = 2 * (r.width as usize / multiple);
        let latent_shape = vec![r.count as usize, channels, h, w];
        if let Some(l) = &r.latents {
            if l.shape() != latent_shape.as_slice() {
                return Err(Error::invalid(format!(
                    "latents have shape {:?}, this request needs {latent_shape:?}",
                    l.shape()
                )));
            }
            if l.iter().any(|v| !v.is_finite()) {
                return Err(Error::invalid("latents hold non-finite values"));
            }
        }
        if let Some(init) = &r.init_image {
            image_to_image::check(init, r.width, r.height)?;
            image_to_image::first_step(r.steps as usize, init.strength)?;
        }
        let p = m.transformer.patch_size;
        Ok(Plan {
            latent_shape,
            image_seq_len: (h / p) * (w / p),
            steps: r.steps as usize,
            guidance: Guidance {
                scale: r.guidance_scale,
                normalization: r.cfg_normalization,
                truncation: r.cfg_truncation,
            },
        })
    }
}

struct Plan {
    latent_shape: Vec<usize>,
    image_seq_len: usize,
    steps: usize,
    guidance: Guidance,
}

/// A seed from the OS-seeded hasher; the low 32 bits are all torch's generator uses.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish() & 0xffff_ffff
}

/// ONNX Runtime's CPU provider has no bfloat16 kernels: say so before it fails on the first
/// node with "Could not find an implementation".
/// The graph that decodes images: `vae_decoder_cpu` when `winograd_vae` asks for it on the CPU
/// (an error if the package has none), otherwise `vae_decoder`.
fn vae_decoder_entry(manifest: &Manifest, device: Device, winograd_vae: bool) -> Result<&GraphEntry> {
    match (device, winograd_vae, &manifest.graphs.vae_decoder_cpu) {
        (Device::Cpu, true, Some(cpu)) => Ok(cpu),
        (Device::Cpu, true, None) => Err(Error::invalid(
            "winograd_vae: this package has no vae_decoder_cpu graph (export-scripts/export.py writes one for VAEs \
             with convolutions of 256 channels or more)",
        )),
        _ => Ok(&manifest.graphs.vae_decoder),
    }
}

fn check_precision_runs_on(precision: &str, options: &LoadOptions) -> Result<()> {
    let on_cpu = [Some(options.device), options.transformer_device].contains(&Some(Device::Cpu));
    if precision == "bf16" && on_cpu {
        return Err(Error::invalid(
            "this package is bf16, which ONNX Runtime runs only on a GPU: load it with device cuda or tensorrt \
             (text encoder and transformer), or export an fp32 or fp16 package for the CPU",
        ));
    }
    Ok(())
}
