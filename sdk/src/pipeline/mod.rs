//! Text-to-image, image-to-image and inpainting: a [`Pipeline`] loaded from a model package,
//! and [`Pipeline::generate`], which reads as the stages it runs: plan, encode the prompts,
//! start, denoise, decode.
//!
//! - [`request`]: what a generation is asked for and gives back;
//! - `plan`: request checks and shapes;
//! - `captions`: prompts -> caption features;
//! - [`noise`], [`scheduler`]: torch-compatible seeded noise, the flow-matching schedule;
//! - `start`: where denoising starts (noise, an input picture, inpainting's blend);
//! - `denoise`: the loop with classifier-free guidance;
//! - `preview`: the denoised estimate after a step, decoded as a preview;
//! - `device_loop`: the same loop with its state on the transformer's device (the default);
//! - `loading`: which graph each stage loads, where and how;
//! - [`parameters`]: the generation parameters stored with an image;
//! - [`edit`]: image editing (Omni: reference pictures + instruction), with `references`.
//! - [`control`]: ControlNet conditioning (control latents, inpainting through the control channels).
//!
//! New conditioning (ControlNet, reference images) plugs in as a start strategy or as extra
//! transformer inputs assembled in `model::transformer`, decided by the plan.

pub(crate) mod captions;
pub mod control;
pub(crate) mod denoise;
pub(crate) mod device_loop;
pub mod edit;
pub(crate) mod latent_mask;
pub(crate) mod loading;
pub mod noise;
pub mod parameters;
pub(crate) mod plan;
pub(crate) mod preview;
pub(crate) mod references;
pub mod request;
pub mod scheduler;
pub(crate) mod start;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use ndarray::{Array4, Axis};

use crate::enhancer::{EnhanceOptions, PromptEnhancer};
use crate::error::{Error, Result};
use crate::image_io;
use crate::load_options::LoadOptions;
use crate::lora::{LoraAdapter, LoraSetting, Targets};
use crate::model::controlnet::ControlInputs;
use crate::model::step::StepKind;
use crate::model::text_encoder::{PromptEmbedding, TextEncoder, TokenizedPrompt};
use crate::model::transformer::{self, CaptionBatch};
use crate::model::vae::Vae;
use crate::model::vae_tiling::VaeTiling;
use crate::package::controlnet::ControlNetInfo;
use crate::package::graph::GraphKind;
use crate::package::Manifest;
use crate::runtime::device::Device;
use crate::runtime::gpu::TensorRtOptions;
use crate::runtime::graph::{Graph, GraphSlot};
use crate::runtime::library::{runtime, Runtime};
use crate::runtime::run_context::{CancelHandle, Registry, RunContext};
use captions::{CaptionEncoder, EncodedPrompts};
use denoise::Denoiser;
use loading::GraphLoader;
use plan::Plan;
use preview::{StepObserver, StepReporter};
use request::{GenerateRequest, Generation, HostTraffic, Progress, Prompt, Providers, Timings};
use scheduler::Schedule;
use start::Start;

/// The `tracing` target of the span concurrent loading jobs run in (a subscriber that routes
/// events per call can follow it onto the jobs' threads).
pub use loading::LOAD_JOB_TARGET;

/// A loaded model package. `Send + Sync`: one pipeline can serve several threads (each graph
/// call takes a per-graph lock, so concurrent generations interleave rather than run in
/// parallel inside one graph).
pub struct Pipeline {
    dir: PathBuf,
    manifest: Manifest,
    captions: CaptionEncoder,
    vae: Vae,
    /// The transformer and the LoRA set merged into it; replaced whole by `set_loras` (a
    /// generation that already holds the session keeps using it).
    transformer: RwLock<ActiveTransformer>,
    vae_decoder: GraphSlot,
    vae_encoder: GraphSlot,
    registry: Arc<Registry>,
    /// Set when a graph runs on TensorRT: requests must fit its declared profiles.
    tensorrt_profile: Option<TensorRtOptions>,
    load_time: Duration,
    runtime_library: PathBuf,
    runtime: &'static Runtime,
    /// How the pipeline was loaded (without its LoRAs): what a LoRA switch rebuilds the
    /// transformer with.
    options: LoadOptions,
    /// The editing graphs, when the package has them.
    edit: Option<loading::EditGraphs>,
    /// The device loop's step graphs, loaded on first use.
    step_graphs: device_loop::StepGraphs,
}

struct ActiveTransformer {
    slot: GraphSlot,
    /// The Omni (editing) transformer, rebuilt with `loras` alongside `slot`.
    omni: Option<loading::OmniTransformer>,
    loras: Vec<LoraSetting>,
    /// `loras` merged (None for an empty set): kept so that attaching a ControlNet reuses the
    /// tensors the Omni transformer already shares instead of merging a second copy.
    merged: Option<Arc<loading::MergedLoras>>,
    /// The attached ControlNet (name, manifest entry): `slot` is then its combined graph.
    controlnet: Option<(String, ControlNetInfo)>,
}

impl Pipeline {
    /// Loads the package in `dir`: checks the manifest and files, loads ONNX Runtime (once
    /// per process) and creates a session per graph.
    pub fn load(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Pipeline> {
        let start = Instant::now();
        let dir = dir.as_ref().to_path_buf();
        options.check()?;
        let manifest = Manifest::load(&dir, options.verify_checksums)?;
        check_interfaces(&dir, &manifest)?;
        let controlnet = match &options.controlnet {
            Some(name) => Some((name.clone(), control::entry(&dir, &manifest, options.verify_checksums, name)?)),
            None => None,
        };
        loading::check_precision_runs_on(&manifest, options)?;
        let vae_tiling = loading::vae_tiling(&manifest, options)?;
        let rt = runtime(options.runtime_library.as_deref())?;
        let uses_tensorrt = [Some(options.device), options.transformer_device]
            .iter()
            .any(|d| matches!(d, Some(Device::TensorRt { .. })));
        if uses_tensorrt {
            options.gpu.tensorrt.check(&manifest)?;
        }
        let graphs = GraphLoader { runtime: rt, dir: &dir, manifest: &manifest, options };
        let tokenizer = Manifest::resolve(&dir, &manifest.tokenizer.path);
        let decoder_kind = loading::vae_decoder_kind(&manifest, options)?;
        // The stages every generation uses, built concurrently (the transformer, the slowest,
        // on this thread); errors are reported in this order whichever finished first.
        let (text, text_encoder, vae_decoder, transformer) = loading::run_jobs(
            loading::load_in_parallel(options, uses_tensorrt),
            || {
                let started = Instant::now();
                let text = TextEncoder::new(&tokenizer, manifest.text_encoder.clone());
                tracing::debug!(seconds = started.elapsed().as_secs_f64(), "tokenizer loaded");
                text
            },
            || graphs.load_required(GraphKind::TextEncoder, options.device),
            || graphs.load_required(decoder_kind, options.device),
            // With a ControlNet, its combined graph is the transformer: the plain one is never loaded.
            // The LoRA set is merged here, once: an editing package's Omni transformer (below)
            // shares the merged tensors.
            || {
                let controlnet = controlnet.as_ref().map(|(_, info)| info);
                let loras = loading::merge_loras(&graphs, &options.loras)?;
                let slot = loading::load_transformer(
                    &graphs,
                    loading::transformer_device(options),
                    loras.as_deref(),
                    controlnet,
                )?;
                Ok((slot, loras))
            },
        );
        // Errors in stage order (text encoder, transformer, VAE decoder), whichever failed first.
        let (text, text_encoder, (transformer, loras), vae_decoder) =
            (text?, text_encoder?, transformer?, vae_decoder?);
        // Only image-to-image, inpainting, ControlNet and editing encode pictures: the VAE
        // encoder's session is made by the first of those.
        let vae_encoder = graphs.defer_required(GraphKind::VaeEncoder, options.device)?;
        let edit = loading::load_edit_graphs(&graphs, options.device);
        let omni = loading::load_omni_transformer(&graphs, loading::transformer_device(options), loras.as_deref())?;
        Ok(Pipeline {
            edit,
            captions: CaptionEncoder::new(text, text_encoder, &manifest.transformer),
            vae: Vae { info: manifest.vae.clone(), tiling: vae_tiling },
            transformer: RwLock::new(ActiveTransformer {
                slot: transformer,
                omni,
                loras: options.loras.clone(),
                merged: loras,
                controlnet,
            }),
            vae_decoder,
            vae_encoder,
            registry: Arc::new(Registry::default()),
            tensorrt_profile: uses_tensorrt.then(|| options.gpu.tensorrt.clone()),
            load_time: start.elapsed(),
            runtime_library: rt.library_path.clone(),
            runtime: rt,
            options: LoadOptions { loras: Vec::new(), controlnet: None, ..options.clone() },
            step_graphs: Default::default(),
            dir,
            manifest,
        })
    }

    /// The LoRA adapters merged into the transformer now, with their scales.
    pub fn loras(&self) -> Vec<LoraSetting> {
        self.active_transformer().loras.clone()
    }

    /// The ControlNet add-ons this package carries, by name (`zimage generate --controlnet NAME`).
    pub fn controlnets(&self) -> Vec<String> {
        self.manifest.controlnets.keys().cloned().collect()
    }

    /// The ControlNet attached now, if any.
    pub fn controlnet(&self) -> Option<String> {
        self.active_transformer().controlnet.as_ref().map(|(name, _)| name.clone())
    }

    /// Attaches the package's ControlNet `name` (or detaches it with `None`): the transformer's
    /// session is replaced by the combined transformer + ControlNet graph, which reads the
    /// shared weights from the transformer's own file, so the weights are in memory once. The
    /// entry is checked first (made for this transformer file and width, its files intact, its
    /// interface): a ControlNet that does not fit is refused with a `Package` error and the
    /// pipeline keeps what it had. Requests with a [`control::ControlCondition`] need one
    /// attached; requests without run it at scale 0 (the plain transformer's prediction).
    pub fn set_controlnet(&self, name: Option<&str>) -> Result<()> {
        let wanted = match name {
            Some(name) => Some((name.to_string(), self.controlnet_entry(name)?)),
            None => None,
        };
        let mut active = self.transformer.write().unwrap_or_else(|p| p.into_inner());
        let graphs =
            GraphLoader { runtime: self.runtime, dir: &self.dir, manifest: &self.manifest, options: &self.options };
        let device = loading::transformer_device(&self.options);
        // The active set's merged tensors, as the Omni transformer holds them.
        let merged = active.merged.clone();
        let load = |which: &Option<(String, ControlNetInfo)>| {
            loading::load_transformer(&graphs, device, merged.as_deref(), which.as_ref().map(|(_, info)| info))
        };
        active.slot.release();
        match load(&wanted) {
            Ok(slot) => {
                active.slot = slot;
                active.controlnet = wanted;
                Ok(())
            }
            Err(e) => {
                if let Ok(slot) = load(&active.controlnet) {
                    active.slot = slot;
                }
                Err(e)
            }
        }
    }

    /// The manifest entry of ControlNet `name`, checked against this package and its files.
    fn controlnet_entry(&self, name: &str) -> Result<ControlNetInfo> {
        control::entry(&self.dir, &self.manifest, self.options.verify_checksums, name)
    }

    /// The control latents of `request`: its condition's, or neutral ones when a ControlNet is
    /// attached and the request has none; `None` without a ControlNet.
    fn control_inputs(
        &self,
        request: &GenerateRequest,
        plan: &Plan,
        context: &RunContext,
    ) -> Result<Option<ControlInputs>> {
        let attached = self.active_transformer().controlnet.clone();
        match (&request.control, attached) {
            (None, None) => Ok(None),
            (Some(_), None) => Err(Error::invalid(
                "the request has a ControlNet condition but no ControlNet is attached (Pipeline::set_controlnet)",
            )),
            (None, Some((_, info))) => Ok(Some(control::neutral(&info, plan.latent_shape[2], plan.latent_shape[3]))),
            (Some(condition), Some((name, info))) => {
                control::check_fits(condition, &name, &info, self.manifest.vae.latent_channels)?;
                let encoder = self.vae_encoder.acquire()?;
                control::prepare(&self.vae, &encoder, &info, condition, context).map(Some)
            }
        }
    }

    /// Checks that `adapter` fits this pipeline's transformer (every module it changes exists,
    /// with matching shapes) without applying it: a `Lora` error naming the first key that does
    /// not fit. [`Pipeline::set_loras`] checks the same.
    pub fn check_lora(&self, adapter: &Arc<LoraAdapter>) -> Result<()> {
        let set = [LoraSetting::new(Arc::clone(adapter), 1.0)];
        Targets::read(&self.dir, &self.manifest, &set)?.check(&set)
    }

    /// Replaces the LoRA set (empty: the package's own weights). Only the transformer's
    /// session is rebuilt (with an editing package's Omni transformer, which reads the same
    /// weights, so that edits apply the set too); the text encoder and the VAE are untouched. Every adapter is checked
    /// against the model first, so a set that does not fit is refused with
    /// [`ErrorKind::Lora`](crate::error::ErrorKind::Lora) and the pipeline keeps its current
    /// one. The current merged weights are freed before the new ones are computed (memory: the
    /// package's weights plus one merged copy of the tensors the set touches), except those of
    /// a generation still running, which finishes with the set it started with; generations
    /// that start during the switch wait for it. On a GPU with TensorRT the engine is the
    /// set's own (built on first use, then cached; see `TensorRtOptions::cache_dir_for_weights`).
    pub fn set_loras(&self, loras: &[LoraSetting]) -> Result<()> {
        if !loras.is_empty() {
            Targets::read(&self.dir, &self.manifest, loras)?.check(loras)?;
        }
        let mut active = self.transformer.write().unwrap_or_else(|p| p.into_inner());
        let graphs =
            GraphLoader { runtime: self.runtime, dir: &self.dir, manifest: &self.manifest, options: &self.options };
        let device = loading::transformer_device(&self.options);
        let controlnet = active.controlnet.as_ref().map(|(_, info)| info.clone());
        active.slot.release();
        if let Some(omni) = active.omni.as_mut() {
            omni.slot.release();
        }
        // (the old merged tensors go before the new ones are made)
        active.merged = None;
        // The transformer and an editing package's Omni transformer take the set together,
        // merged once (both sessions read the same merged tensors).
        type Loaded = (GraphSlot, Option<loading::OmniTransformer>, Option<Arc<loading::MergedLoras>>);
        let load = |loras: &[LoraSetting]| -> Result<Loaded> {
            let merged = loading::merge_loras(&graphs, loras)?;
            let slot = loading::load_transformer(&graphs, device, merged.as_deref(), controlnet.as_ref())?;
            let omni = loading::load_omni_transformer(&graphs, device, merged.as_deref())?;
            Ok((slot, omni, merged))
        };
        match load(loras) {
            Ok((slot, omni, merged)) => {
                (active.slot, active.omni, active.merged) = (slot, omni, merged);
                active.loras = loras.to_vec();
                Ok(())
            }
            Err(e) => {
                if let Ok((slot, omni, merged)) = load(&active.loras) {
                    (active.slot, active.omni, active.merged) = (slot, omni, merged);
                }
                Err(e)
            }
        }
    }

    fn active_transformer(&self) -> RwLockReadGuard<'_, ActiveTransformer> {
        self.transformer.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// A request for `prompt` with this package's recommended steps and guidance
    /// ([`GenerateRequest::for_package`]).
    pub fn request(&self, prompt: impl Into<Prompt>) -> GenerateRequest {
        GenerateRequest::for_package(&self.manifest, prompt)
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
            text_encoder: self.captions.graph.device(),
            transformer: self.active_transformer().slot.device(),
            vae_decoder: self.vae_decoder.device(),
            vae_encoder: self.vae_encoder.device(),
        }
    }

    /// Why the transformer's denoising calls are not recorded and replayed as CUDA graphs, or
    /// `None` when they are (a resident CUDA transformer whose every node runs on CUDA; see
    /// [`crate::runtime::cuda_graph`]). A generation whose shape cannot replay a capture (more
    /// shapes than are kept, or the same shape running concurrently) runs uncaptured.
    pub fn cuda_graph_fallback(&self) -> Option<String> {
        self.active_transformer().slot.capture_refusal().map(str::to_string)
    }

    /// The graphs that run on the CPU because their requested provider could not be set up
    /// (with [`LoadOptions::allow_cpu_fallback`]), each with the provider's error.
    pub fn provider_fallbacks(&self) -> Vec<(GraphKind, String)> {
        let active = self.active_transformer();
        [&self.captions.graph, &active.slot, &self.vae_decoder, &self.vae_encoder]
            .into_iter()
            .filter_map(|slot| slot.fallback_reason().map(|reason| (slot.kind(), reason.to_string())))
            .collect()
    }

    /// Bytes of the weights and graphs this pipeline loads: [`Manifest::weight_bytes`] with the
    /// VAE decoder it decodes with (the int8 decoder's are smaller: mid-size model 134 against
    /// 205 MiB, its low-resolution part being float).
    pub fn weight_bytes(&self) -> u64 {
        self.manifest.weight_bytes_decoding_with(self.vae_decoder.kind())
    }

    /// `Generation::vae_decoder`: "int8" when the int8 decoder decodes, else None.
    fn lossy_vae_decoder(&self) -> Option<String> {
        (self.vae_decoder.kind() == GraphKind::VaeDecoderInt8).then(|| "int8".to_string())
    }

    /// The graph file images are decoded with: the package's `vae_decoder_cpu` with
    /// [`LoadOptions::winograd_vae`] on the CPU, its `vae_decoder_int8` with
    /// [`LoadOptions::int8_vae`] on the CPU, otherwise its `vae_decoder`.
    pub fn vae_decoder_file(&self) -> &Path {
        self.vae_decoder.path()
    }

    /// A handle that cancels the generations running on this pipeline, from any thread.
    pub fn cancel_handle(&self) -> CancelHandle {
        CancelHandle { registry: Arc::clone(&self.registry) }
    }

    /// Loads the prompt enhancer of this pipeline's package (one that carries a decoder), sharing
    /// the text encoder's weights file and its tokenizer (read once: 0.2-0.3 s and about 50 MiB
    /// less); the pipeline's cancel handle also stops it.
    pub fn attach_enhancer(&self, options: &LoadOptions) -> Result<PromptEnhancer> {
        let tokenizer = Arc::clone(self.captions.text.tokenizer());
        PromptEnhancer::load_with_registry(&self.dir, options, Arc::clone(&self.registry), Some(tokenizer))
    }

    /// Token ids of `prompt` after the chat template and truncation to `max_sequence_length`
    /// (the package's default, 512, when `None`).
    pub fn tokenize(&self, prompt: &str, max_sequence_length: Option<usize>) -> Result<TokenizedPrompt> {
        self.captions.tokenize(prompt, max_sequence_length)
    }

    /// Encodes a prompt once, for use in any number of [`GenerateRequest`]s.
    pub fn encode_prompt(&self, prompt: &str, max_sequence_length: Option<usize>) -> Result<PromptEmbedding> {
        let context = self.registry.begin()?;
        self.captions.encode(prompt, max_sequence_length, &context)
    }

    /// Checks `request` against this pipeline (the package's limits, input pictures and, on
    /// TensorRT, the profiles declared at load) without running anything: the checks
    /// [`Pipeline::generate`] starts with, for a caller that wants to refuse a request before
    /// queueing it.
    pub fn check_request(&self, request: &GenerateRequest) -> Result<()> {
        Plan::new(request, &self.manifest, self.tensorrt_profile.as_ref()).map(|_| ())
    }

    /// [`Pipeline::check_request`], and the prompts as [`Pipeline::generate`] checks them
    /// before encoding: text tokenized and its caption within the transformer's position table,
    /// embeddings of the right width and length. It tokenizes (a 1 MiB prompt takes a fraction
    /// of a second): for front ends that refuse a request before queueing it. The prompt of a
    /// request that will be enhanced first is not the one encoded: check it with
    /// `PromptEnhancer::check` instead.
    pub fn check_request_prompts(&self, request: &GenerateRequest) -> Result<()> {
        let plan = Plan::new(request, &self.manifest, self.tensorrt_profile.as_ref())?;
        self.captions.check_request(request, plan.guidance.enabled())
    }

    /// Generates `request.count` images. `progress` is called after every denoising step;
    /// returning `false` stops the run with [`Error::Cancelled`].
    pub fn generate(
        &self,
        request: &GenerateRequest,
        progress: Option<&mut dyn FnMut(&Progress) -> bool>,
    ) -> Result<Generation> {
        let started = Instant::now();
        let plan = Plan::new(request, &self.manifest, self.tensorrt_profile.as_ref())?;
        // Registered before the pictures are resized (a large one takes seconds), so that a
        // cancel meanwhile is seen right after.
        let context = self.registry.begin()?;
        let request = &*request.pictures_at_size()?;
        context.check()?;
        let prompts = self.captions.encode_request(request, plan.guidance.enabled(), &context)?;
        let seed = request.seed.unwrap_or_else(random_seed);
        let schedule = &plan.schedule;
        let control = self.control_inputs(request, &plan, &context)?;
        let start = self.start(request, &plan, schedule, seed, &context)?;
        let mut denoise_steps = Vec::with_capacity(plan.steps);
        let total_steps = schedule.len() - start.first_step;
        let mut reporter = self.step_reporter(progress, started, &context);
        let previews = reporter.preview_steps(request.previews, total_steps);
        let mut observer = StepObserver { previews, on_step: &mut |done| reporter.step_done(done) };
        let (latents, host_traffic) = self.denoise(
            start,
            &prompts,
            &plan,
            schedule,
            control.as_ref(),
            &context,
            &mut denoise_steps,
            &mut observer,
        )?;
        let preview_time = reporter.preview_time;
        drop(reporter);
        let decode_start = Instant::now();
        let images = self.decode(&latents, &plan, &context)?;
        let vae_tiling = self.tiling_used(&latents);
        let timings = Timings {
            tokenize: prompts.tokenize_time,
            text_encode: prompts.encode_time,
            denoise_steps,
            vae_decode: decode_start.elapsed(),
            previews: preview_time,
            total: started.elapsed(),
            onnx_runtime: context.ort_time(),
            host_traffic,
        };
        Ok(Generation {
            images,
            latents: request.return_latents.then_some(latents),
            seed,
            prompt_tokens: prompts.positive.tokens.clone(),
            negative_prompt_tokens: prompts.negative.map(|n| n.tokens.clone()),
            enhanced_prompt: None,
            timings,
            quantization: self.manifest.quantization.as_ref().map(|q| q.summary()),
            vae_tiling,
            vae_decoder: self.lossy_vae_decoder(),
        })
    }

    /// The starting latents: seeded noise, or the request's input picture.
    fn start(
        &self,
        request: &GenerateRequest,
        plan: &Plan,
        schedule: &Schedule,
        seed: u64,
        context: &RunContext,
    ) -> Result<Start> {
        match &request.init_image {
            Some(init) => {
                let encoder = self.vae_encoder.acquire()?;
                let source = start::FromImage { vae: &self.vae, encoder: &encoder, init };
                start::from_image(source, &plan.latent_shape, schedule, seed, request.latents.as_ref(), context)
            }
            None => Ok(start::from_noise(&plan.latent_shape, seed, request.latents.as_ref())),
        }
    }

    #[allow(clippy::too_many_arguments)] // one call site; the pieces are the generation's own
    fn denoise(
        &self,
        start: Start,
        prompts: &EncodedPrompts,
        plan: &Plan,
        schedule: &Schedule,
        control: Option<&ControlInputs>,
        context: &RunContext,
        step_times: &mut Vec<Duration>,
        observer: &mut StepObserver<'_>,
    ) -> Result<(Array4<f32>, Option<HostTraffic>)> {
        let count = plan.latent_shape[0];
        let positive: Vec<&PromptEmbedding> = std::iter::repeat_n(&prompts.positive, count).collect();
        let positive_and_negative = prompts.negative.as_ref().map(|negative| {
            let mut items = positive.clone();
            items.extend(std::iter::repeat_n(negative, count));
            CaptionBatch::new(&items)
        });
        let transformer = self.active_transformer().slot.acquire()?;
        let denoiser = Denoiser {
            transformer: &transformer,
            schedule,
            first_step: start.first_step,
            guidance: plan.guidance,
            positive: CaptionBatch::new(&positive),
            positive_and_negative,
            precision: self.manifest.precision,
            control,
        };
        let inpaint = start.inpaint;
        let mut latents = start.latents;
        // The step graph binds the plain transformer's inputs only: a ControlNet's control
        // latents and scale go through the host loop.
        if !self.options.host_denoise_loop && control.is_none() {
            let provider = self.active_transformer().slot.provider().clone();
            let kind = if inpaint.is_some() { StepKind::Inpaint } else { StepKind::Plain };
            let step_graph = self.step_graphs.get(self.runtime, kind, &provider)?;
            let traffic = device_loop::run(
                &denoiser,
                &step_graph,
                &provider,
                inpaint.as_ref(),
                &mut latents,
                context,
                step_times,
                observer,
            )?;
            return Ok((latents, Some(traffic)));
        }
        let mut after_step = |step: usize, latents: &mut Array4<f32>| {
            if let Some(blend) = &inpaint {
                blend.apply(step, schedule, latents);
            }
        };
        denoiser.run(&mut latents, context, step_times, observer, &mut after_step)?;
        Ok((latents, None))
    }

    /// What runs after each denoising step: `progress`, with the previews the loop hands over
    /// decoded by this pipeline's VAE decoder (held from the first preview to the end of the
    /// run, so sequential mode builds its session once per generation).
    fn step_reporter<'a, 'p>(
        &'a self,
        progress: Option<&'p mut (dyn FnMut(&Progress) -> bool + 'p)>,
        started: Instant,
        context: &'a RunContext,
    ) -> StepReporter<'a, 'p> {
        let mut decoder: Option<Arc<Graph>> = None;
        let decode = move |latents: &Array4<f32>| {
            let graph = match &decoder {
                Some(graph) => Arc::clone(graph),
                None => Arc::clone(decoder.insert(self.vae_decoder.acquire()?)),
            };
            self.decode_preview(&graph, latents, context)
        };
        StepReporter { progress, started, decode: Box::new(decode), preview_time: Duration::ZERO }
    }

    /// The tiling the decode of these latents used, if it was tiled.
    fn tiling_used(&self, latents: &Array4<f32>) -> Option<VaeTiling> {
        self.options.vae_tiling.filter(|_| self.vae.tiles(latents.shape()[2], latents.shape()[3]))
    }

    /// Previews: latents to 8-bit pictures, without the result's saturation check (an early
    /// estimate may well be far off).
    fn decode_preview(
        &self,
        decoder: &Graph,
        latents: &Array4<f32>,
        context: &RunContext,
    ) -> Result<Vec<image_io::RgbImage>> {
        let decoded = self.vae.decode(decoder, latents, context)?;
        decoded.iter().map(|d| image_io::to_rgb8(d.index_axis(Axis(0), 0))).collect()
    }

    /// Latents to 8-bit pictures, one image at a time. The decoder's output is checked like
    /// the latents are after each step: non-finite values, or a picture whose every value is
    /// clipped (every channel of every pixel 0 or 255: what latents far outside the VAE's
    /// range decode to, e.g. an extreme guidance scale), are inference errors rather than a
    /// black or white PNG.
    fn decode(&self, latents: &Array4<f32>, plan: &Plan, context: &RunContext) -> Result<Vec<image_io::RgbImage>> {
        let decoded = self.vae.decode(&*self.vae_decoder.acquire()?, latents, context)?;
        let count = decoded.len();
        for (index, image) in decoded.iter().enumerate() {
            if image_io::all_clipped(image.index_axis(Axis(0), 0)) {
                let which = if count > 1 { format!("image {} of {count}", index + 1) } else { "the image".into() };
                let guidance = if plan.guidance.enabled() {
                    format!(" at guidance_scale {}: lower it", plan.guidance.scale)
                } else {
                    String::new()
                };
                return Err(Error::inference(
                    "vae_decoder",
                    format!(
                        "{which} is saturated: every pixel value is clipped to 0 or 255, the latents are far \
                         outside the range the VAE decodes{guidance}"
                    ),
                ));
            }
        }
        decoded.iter().map(|d| image_io::to_rgb8(d.index_axis(Axis(0), 0))).collect()
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
        let context = self.registry.begin()?;
        let graph = self.active_transformer().slot.acquire()?;
        transformer::forward(&graph, latents, timestep, cap_feats, cap_mask, &context, false)
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
        Plan::new(request, &self.manifest, self.tensorrt_profile.as_ref())?;
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
        // The rewritten prompt must fit the model's captions too: a refusal names it, not the
        // user's prompt, which fitted.
        self.captions
            .caption_tokens(&enhancement.text, request.max_sequence_length, "enhanced prompt")
            .map_err(|e| enhanced_too_long(e, options))?;
        let mut rewritten = request.clone();
        rewritten.prompt = Prompt::Text(enhancement.text.clone());
        let mut result = self.generate(&rewritten, progress)?;
        result.enhanced_prompt = Some(enhancement.text);
        Ok(result)
    }
}

/// A refusal of an enhanced prompt or instruction, with the enhancer's part in it: it wrote
/// up to `max_new_tokens`.
pub(crate) fn enhanced_too_long(error: Error, options: &EnhanceOptions) -> Error {
    match error {
        Error::InvalidRequest(message) => Error::InvalidRequest(format!(
            "{message} (the prompt enhancer wrote it, with up to {} new tokens: lower its max_new_tokens)",
            options.max_new_tokens
        )),
        other => other,
    }
}

/// Checks `request` against a package's manifest ([`Manifest::read`] gives it without loading
/// the package): sizes, steps, count, guidance settings, latents, and the input picture when
/// the request has one. A front end calls it before reading, decoding or resizing anything
/// whose size the request sets (an init image is resized to the request's size), so that an
/// invalid request is refused before it allocates; [`Pipeline::generate`] checks again.
pub fn check_request(request: &GenerateRequest, manifest: &Manifest) -> Result<()> {
    Plan::new(request, manifest, None).map(|_| ())
}

/// The output size an input picture of `width` x `height` implies when a request names none
/// (image-to-image, inpainting, a ControlNet's picture): each side floored to a multiple of
/// `multiple` ([`Manifest::size_multiple`]), as diffusers' image processor derives it
/// (`get_default_height_width`); the front ends then resize the picture to it. A side shorter
/// than one multiple is kept, so that the request's check refuses it with its real size.
pub fn size_for_picture(multiple: usize, width: u32, height: u32) -> (u32, u32) {
    let multiple = u32::try_from(multiple.max(1)).unwrap_or(u32::MAX);
    let floor = |side: u32| if side >= multiple { side - side % multiple } else { side };
    (floor(width), floor(height))
}

/// The package's graphs must declare the interfaces the networks drive: those of the image
/// pipeline, and the enhancer decoder's when the package carries one.
fn check_interfaces(dir: &Path, manifest: &Manifest) -> Result<()> {
    let decoder = match (&manifest.enhancer, &manifest.graphs.text_decoder) {
        (Some(info), Some(graph)) => crate::enhancer::kv_decoder::check_interface(info, graph),
        _ => Ok(()),
    };
    crate::model::check_interfaces(manifest)
        .and(decoder)
        .map_err(|message| Error::package(dir.join("manifest.json"), message))
}

/// A seed from the OS-seeded hasher; the low 32 bits are all torch's generator uses.
fn random_seed() -> u64 {
    crate::random::os_seeded_u64() & 0xffff_ffff
}
