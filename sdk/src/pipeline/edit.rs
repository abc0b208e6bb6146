//! Image editing (diffusers' ZImageOmniPipeline): one or more reference pictures and an
//! instruction. Each reference enters the transformer's single stream twice: as clean VAE
//! latents (modulated at t = 1) and as SigLIP2 vision tokens; the instruction is encoded as
//! N + 2 text segments that wrap each reference in `<|vision_start|>…<|vision_end|>`
//! (`package::edit::PromptSegments`). The output takes the last reference's (cropped) size
//! unless the request sets both width and height.
//!
//! Stages: check, prepare references (`references`), encode them (VAE, SigLIP2), encode the
//! segments, noise, denoise with guidance (`model::omni` per step), decode.

use std::time::{Duration, Instant};

use ndarray::{concatenate, s, Array2, Array4, Axis, Zip};

use super::denoise::{guide, Guidance};
use super::loading::EditGraphs;
use super::noise::TorchGenerator;
use super::preview::{AroundStep, StepDone, StepObserver};
pub use super::references::MAX_REFERENCE_PIXELS;
use super::references::{self, PreparedReference};
use super::request::{Generation, Progress, Timings};
use super::scheduler::Schedule;
use super::Pipeline;
use crate::error::{Error, Result};
use crate::image_io::RgbImage;
use crate::limits::{check_guidance, check_prompt_bytes, check_request_pixels, MAX_IMAGES_PER_REQUEST, MAX_STEPS};
use crate::model::omni::{self, References};
use crate::model::text_encoder::{PromptEmbedding, TokenizedPrompt};
use crate::model::{siglip_processor, vision};
use crate::package::edit::EditInfo;
use crate::runtime::graph::Graph;
use crate::runtime::run_context::RunContext;

/// An edit request. Build with [`EditRequest::new`] and assign fields; `None` fields take
/// the package's defaults (`manifest.edit.defaults`: 50 steps, guidance 5.0 for
/// ZImageOmniPipeline).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EditRequest {
    /// The instruction (may be empty).
    pub prompt: String,
    pub negative_prompt: Option<String>,
    /// Reference pictures, in order (the last one sets the output size). None:
    /// ZImageOmniPipeline's text-to-image (the Omni transformer, its own prompt template).
    pub images: Vec<RgbImage>,
    /// Output size: both or neither (then the last reference's size, cropped to the VAE's
    /// multiple; 1024 x 1024 without references, as diffusers).
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub steps: Option<usize>,
    pub guidance_scale: Option<f32>,
    /// Caps |pred| at this times |pos| under guidance; 0 turns it off.
    pub cfg_normalization: f32,
    pub cfg_truncation: Option<f32>,
    pub seed: Option<u64>,
    pub count: u32,
    pub max_sequence_length: Option<usize>,
    pub return_latents: bool,
    /// Previews passed to the progress callback, as `GenerateRequest::previews`.
    pub previews: u32,
}

impl EditRequest {
    pub fn new(prompt: impl Into<String>, images: Vec<RgbImage>) -> Self {
        EditRequest {
            prompt: prompt.into(),
            negative_prompt: None,
            images,
            width: None,
            height: None,
            steps: None,
            guidance_scale: None,
            cfg_normalization: 0.0,
            cfg_truncation: None,
            seed: None,
            count: 1,
            max_sequence_length: None,
            return_latents: false,
            previews: 0,
        }
    }
}

/// The output side of an edit without references when none is given: `ZImageOmniPipeline`'s
/// default height and width.
const NO_REFERENCE_SIZE: u32 = 1024;

/// A checked edit request with its defaults filled in.
struct EditPlan {
    steps: usize,
    guidance: Guidance,
    size: Option<(u32, u32)>,
    max_sequence_length: usize,
}

fn plan(r: &EditRequest, info: &EditInfo, max_side: (usize, usize), multiple: usize) -> Result<EditPlan> {
    let rules = &info.reference;
    if r.images.len() > rules.max_images {
        return Err(Error::invalid(format!(
            "{} reference images: this model takes at most {}",
            r.images.len(),
            rules.max_images
        )));
    }
    for (i, image) in r.images.iter().enumerate() {
        references::check(image, i + 1, rules)?;
    }
    let size = match (r.width, r.height) {
        (Some(w), Some(h)) => Some((w, h)),
        // Without references (Omni-mode text-to-image) diffusers' default size.
        (None, None) if r.images.is_empty() => Some((NO_REFERENCE_SIZE, NO_REFERENCE_SIZE)),
        (None, None) => None,
        _ => return Err(Error::invalid("give both width and height, or neither (the last reference's size)")),
    };
    if let Some((w, h)) = size {
        let default = if r.width.is_none() { " (the default size without reference images)" } else { "" };
        for (name, value, max) in [("width", w, max_side.0), ("height", h, max_side.1)] {
            if value == 0 || !(value as usize).is_multiple_of(multiple) || value as usize > max {
                return Err(Error::invalid(format!(
                    "{name} {value}{default} must be a positive multiple of {multiple}, at most {max}"
                )));
            }
        }
    }
    let steps = r.steps.unwrap_or(info.defaults.num_inference_steps);
    if steps == 0 || steps > MAX_STEPS as usize {
        return Err(Error::invalid(format!("steps must be 1..={MAX_STEPS} (got {steps})")));
    }
    if r.count == 0 || r.count > MAX_IMAGES_PER_REQUEST {
        return Err(Error::invalid(format!("count must be 1..={MAX_IMAGES_PER_REQUEST} (got {})", r.count)));
    }
    if let Some((w, h)) = size {
        check_request_pixels(r.count, w, h).map_err(Error::invalid)?;
    }
    let scale = r.guidance_scale.unwrap_or(info.defaults.guidance_scale);
    let truncation = r.cfg_truncation.unwrap_or(info.defaults.cfg_truncation);
    check_guidance(scale, r.cfg_normalization, truncation).map_err(Error::invalid)?;
    let max_sequence_length = r.max_sequence_length.unwrap_or(info.defaults.max_sequence_length);
    if max_sequence_length == 0 {
        return Err(Error::invalid("max_sequence_length must be at least 1"));
    }
    Ok(EditPlan {
        steps,
        guidance: Guidance { scale, normalization: r.cfg_normalization, truncation },
        size,
        max_sequence_length,
    })
}

impl Pipeline {
    /// Edits: generates `request.count` images from the reference pictures and the
    /// instruction, as ZImageOmniPipeline does. A package without the editing graphs is an
    /// invalid request. `progress` as for [`Pipeline::generate`].
    pub fn edit(
        &self,
        request: &EditRequest,
        progress: Option<&mut dyn FnMut(&Progress) -> bool>,
    ) -> Result<Generation> {
        let started = Instant::now();
        let (info, graphs) = match (&self.manifest.edit, &self.edit) {
            (Some(info), Some(graphs)) => (info, graphs),
            _ => return Err(not_editing(&self.dir)),
        };
        let max_side = (self.manifest.max_image_width(), self.manifest.max_image_height());
        let plan = plan(request, info, max_side, self.manifest.size_multiple())?;
        if self.active_transformer().omni.as_ref().is_some_and(|omni| !omni.has_loras) {
            // An edit silently without the set would not be what was asked for.
            return Err(Error::invalid(
                "this package's Omni transformer keeps its own copy of the weights (exported before editing \
                 packages shared them), so the LoRA adapters cannot reach edits: re-export it with export.py, or \
                 remove the adapters (set_loras(&[])) to edit",
            ));
        }
        // The instruction is tokenized and checked before the references are encoded.
        let t0 = Instant::now();
        let (positive_tokens, negative_tokens) = self.instruction_tokens(request, info, &plan)?;
        let tokenize_time = t0.elapsed();
        let context = self.registry.begin()?;

        // References: VAE latents and vision tokens.
        let prepared: Vec<PreparedReference> = request
            .images
            .iter()
            .enumerate()
            .map(|(i, image)| references::prepare(image, i + 1, &info.reference, plan.size))
            .collect::<Result<_>>()?;
        for (i, reference) in prepared.iter().enumerate() {
            let (h, w) = (reference.for_vae.shape()[2], reference.for_vae.shape()[3]);
            if w > max_side.0 || h > max_side.1 {
                return Err(Error::invalid(format!(
                    "reference image {} is {w}x{h} after cropping; this model takes at most {}x{}",
                    i + 1,
                    max_side.0,
                    max_side.1
                )));
            }
        }
        // (plan gives a size whenever there is no reference)
        let (width, height) = match (plan.size, prepared.last()) {
            (Some(size), _) => size,
            (None, Some(last)) => (last.for_vae.shape()[3] as u32, last.for_vae.shape()[2] as u32),
            (None, None) => return Err(Error::invalid("an edit without reference images needs width and height")),
        };
        let multiple = self.manifest.size_multiple();
        if !(width as usize).is_multiple_of(multiple) || !(height as usize).is_multiple_of(multiple) {
            return Err(Error::invalid(format!("the output {width}x{height} is not a multiple of {multiple}")));
        }
        if width as usize > max_side.0 || height as usize > max_side.1 {
            return Err(Error::invalid(format!(
                "the output {width}x{height} exceeds this model's limit of {}x{}",
                max_side.0, max_side.1
            )));
        }
        check_request_pixels(request.count, width, height).map_err(Error::invalid)?;
        let p = self.manifest.transformer.patch_size;
        let f = self.manifest.vae.scale_factor;
        let image_seq_len = (height as usize / f / p) * (width as usize / f / p);
        let schedule = Schedule::for_request(&self.manifest.scheduler, plan.steps, image_seq_len)?;
        let refs = self.encode_references(&prepared, info, graphs, &context)?;

        // Instruction segments.
        let t0 = Instant::now();
        let positive = self.encode_segments(positive_tokens, &context)?;
        let negative = negative_tokens.map(|tokens| self.encode_segments(tokens, &context)).transpose()?;
        let text_time = tokenize_time + t0.elapsed();

        // Noise, schedule, loop.
        let seed = request.seed.unwrap_or_else(super::random_seed);
        let c = self.manifest.transformer.in_channels;
        let shape = [request.count as usize, c, height as usize / f, width as usize / f];
        let mut latents =
            TorchGenerator::new(seed).randn(&shape).into_dimensionality::<ndarray::Ix4>().expect("rank 4 shape");
        let transformer = match self.active_transformer().omni.as_ref() {
            Some(omni) => omni.slot.acquire()?,
            None => return Err(not_editing(&self.dir)),
        };
        let loop_ = EditLoop {
            transformer: &transformer,
            refs: &refs,
            positive: positive.iter().map(|e| &*e.features).collect(),
            negative: negative.as_ref().map(|n| n.iter().map(|e| &*e.features).collect()),
            guidance: plan.guidance,
            patch: self.manifest.transformer.patch_size,
        };
        let mut step_times = Vec::with_capacity(plan.steps);
        let mut reporter = self.step_reporter(progress, started, &context);
        let previews = reporter.preview_steps(request.previews, schedule.len());
        let mut observer = StepObserver { previews, on_step: &mut |done| reporter.step_done(done) };
        loop_.run(&mut latents, &schedule, &context, &mut step_times, &mut observer)?;
        let preview_time = reporter.preview_time;
        drop(reporter);
        drop(transformer);

        let decode_start = Instant::now();
        let plan_for_decode =
            super::plan::Plan { latent_shape: shape.to_vec(), steps: plan.steps, guidance: plan.guidance, schedule };
        let images = self.decode(&latents, &plan_for_decode, &context)?;
        let vae_tiling = self.tiling_used(&latents);
        let prompt_segment = images_segment_tokens(&positive, images_count(request));
        let negative_segment = negative.as_ref().map(|n| images_segment_tokens(n, images_count(request)));
        Ok(Generation {
            images,
            latents: request.return_latents.then_some(latents),
            seed,
            prompt_tokens: prompt_segment,
            negative_prompt_tokens: negative_segment,
            enhanced_prompt: None,
            quantization: self.manifest.quantization.as_ref().map(|q| q.summary()),
            vae_tiling,
            vae_decoder: self.lossy_vae_decoder(),
            timings: Timings {
                tokenize: Duration::ZERO,
                text_encode: text_time,
                denoise_steps: step_times,
                vae_decode: decode_start.elapsed(),
                previews: preview_time,
                total: started.elapsed(),
                onnx_runtime: context.ort_time(),
                // Edits run the host loop (their stream packing is not in the step graph).
                host_traffic: None,
            },
        })
    }

    /// Rewrites the instruction with `enhancer` first, then edits with it; the result's
    /// `enhanced_prompt` holds it. The request is checked before the enhancer runs.
    pub fn edit_enhanced(
        &self,
        enhancer: &crate::enhancer::PromptEnhancer,
        options: &crate::enhancer::EnhanceOptions,
        request: &EditRequest,
        progress: Option<&mut dyn FnMut(&Progress) -> bool>,
    ) -> Result<Generation> {
        self.check_edit(request)?;
        let enhancement = enhancer.enhance(&request.prompt, options, None)?;
        if enhancement.text.trim().is_empty() {
            return Err(Error::inference(
                "prompt enhancer",
                format!("no rewritten instruction within {} new tokens", options.max_new_tokens),
            ));
        }
        // The rewritten instruction must fit the caption positions too: a refusal names it.
        if let Some(info) = &self.manifest.edit {
            let max_side = (self.manifest.max_image_width(), self.manifest.max_image_height());
            let plan = plan(request, info, max_side, self.manifest.size_multiple())?;
            let images = request.images.len();
            self.segment_tokens(&enhancement.text, "enhanced instruction", images, info, plan.max_sequence_length)
                .map_err(|e| super::enhanced_too_long(e, options))?;
        }
        let mut rewritten = request.clone();
        rewritten.prompt = enhancement.text.clone();
        let mut result = self.edit(&rewritten, progress)?;
        result.enhanced_prompt = Some(enhancement.text);
        Ok(result)
    }

    /// Checks an edit request against this pipeline (editing support, references, sizes,
    /// settings) without running anything.
    pub fn check_edit(&self, request: &EditRequest) -> Result<()> {
        if self.edit.is_none() {
            return Err(not_editing(&self.dir));
        }
        check_edit_request(&self.manifest, &self.dir, request)
    }

    /// [`Pipeline::check_edit`], and the instruction as [`Pipeline::edit`] checks it: tokenized,
    /// its segments within the transformer's caption positions. It tokenizes: for front ends
    /// that refuse a request before queueing it (an instruction that will be enhanced first is
    /// not the one encoded: check it with `PromptEnhancer::check` instead).
    pub fn check_edit_prompts(&self, request: &EditRequest) -> Result<()> {
        let (Some(info), Some(_)) = (&self.manifest.edit, &self.edit) else {
            return Err(not_editing(&self.dir));
        };
        let max_side = (self.manifest.max_image_width(), self.manifest.max_image_height());
        let plan = plan(request, info, max_side, self.manifest.size_multiple())?;
        self.instruction_tokens(request, info, &plan).map(|_| ())
    }

    /// SigLIP2 vision tokens `[rows, columns, hidden]` of one picture (processor + vision
    /// graph), as the editing pipeline computes them. Low-level: for checking a package
    /// against a reference.
    pub fn vision_tokens(&self, image: &RgbImage) -> Result<ndarray::Array3<f32>> {
        let (Some(info), Some(graphs)) = (&self.manifest.edit, &self.edit) else {
            return Err(Error::invalid("this package has no vision encoder (no editing support)"));
        };
        let context = self.registry.begin()?;
        let inputs = siglip_processor::siglip_inputs(image, &info.image_processor)?;
        vision::encode(&*graphs.vision.acquire()?, &inputs.patch_grid(), info.siglip.hidden_size, &context)
    }

    /// VAE latents `(mean - shift) * scaling` and SigLIP2 vision tokens of each reference.
    fn encode_references(
        &self,
        prepared: &[PreparedReference],
        info: &EditInfo,
        graphs: &EditGraphs,
        context: &RunContext,
    ) -> Result<References> {
        let mut refs = References { latents: Vec::new(), vision: Vec::new(), vision_dim: info.siglip.hidden_size };
        if prepared.is_empty() {
            // (Omni-mode text-to-image: neither encoder's session is needed)
            return Ok(refs);
        }
        let encoder = self.vae_encoder.acquire()?;
        let vision_graph = graphs.vision.acquire()?;
        let (scaling, shift) = (self.manifest.vae.scaling_factor as f32, self.manifest.vae.shift_factor as f32);
        for reference in prepared {
            let (mean, _) = self.vae.encode(&encoder, &reference.for_vae, context)?;
            refs.latents.push(mean.index_axis_move(Axis(0), 0).mapv(|v| (v - shift) * scaling));
            let inputs = siglip_processor::siglip_inputs(&reference.for_vision, &info.image_processor)?;
            let tokens = vision::encode(&vision_graph, &inputs.patch_grid(), info.siglip.hidden_size, context)?;
            refs.vision.push(tokens);
        }
        Ok(refs)
    }

    /// The instruction's segments tokenized, and under guidance the negative prompt's (the empty
    /// prompt when there is none): what [`Pipeline::edit`] encodes.
    fn instruction_tokens(
        &self,
        request: &EditRequest,
        info: &EditInfo,
        plan: &EditPlan,
    ) -> Result<(Vec<TokenizedPrompt>, Option<Vec<TokenizedPrompt>>)> {
        let images = request.images.len();
        let positive = self.segment_tokens(&request.prompt, "prompt", images, info, plan.max_sequence_length)?;
        let negative = if plan.guidance.enabled() {
            let text = request.negative_prompt.as_deref().unwrap_or("");
            Some(self.segment_tokens(text, "negative prompt", images, info, plan.max_sequence_length)?)
        } else {
            None
        };
        Ok((positive, negative))
    }

    /// Encodes each tokenized segment on its own.
    fn encode_segments(&self, tokens: Vec<TokenizedPrompt>, context: &RunContext) -> Result<Vec<PromptEmbedding>> {
        let graph = self.captions.graph.acquire()?;
        tokens.into_iter().map(|t| self.captions.text.encode(&graph, t, context)).collect()
    }

    /// The instruction's (or negative prompt's) N + 2 segments, each tokenized as is, within the
    /// transformer's caption positions. `which` names it in a refusal.
    fn segment_tokens(
        &self,
        prompt: &str,
        which: &str,
        images: usize,
        info: &EditInfo,
        max_sequence_length: usize,
    ) -> Result<Vec<TokenizedPrompt>> {
        check_prompt_bytes(&format!("the {which}"), prompt).map_err(Error::invalid)?;
        let segments = info.prompt_segments.for_prompt(prompt, images);
        let tokens: Vec<TokenizedPrompt> = segments
            .iter()
            .map(|text| self.captions.text.tokenize_text(text, max_sequence_length))
            .collect::<Result<_>>()?;
        // Every position the stream uses (see model::omni) must be a row of the RoPE table.
        let rows = self.manifest.transformer.axes_lens.first().copied().unwrap_or(0);
        let lengths: Vec<usize> = tokens.iter().map(|t| t.ids.len()).collect();
        let highest = omni::highest_caption_position(&lengths);
        if highest >= rows {
            return Err(Error::invalid(format!(
                "the {which} and its {images} reference(s) need caption position {highest}; this model's \
                 table has {rows}: shorten the {which} or use fewer references"
            )));
        }
        Ok(tokens)
    }
}

/// Checks, from the manifest alone ([`Manifest::read`](crate::Manifest::read)), that a package
/// edits and takes `images` references: what a front end checks before decoding pictures or
/// loading the model. [`Pipeline::edit`] checks everything again.
pub fn check_edit_package(manifest: &crate::package::Manifest, dir: &std::path::Path, images: usize) -> Result<()> {
    let Some(info) = manifest.edit.as_ref().filter(|_| manifest.supports("edit")) else {
        return Err(not_editing(dir));
    };
    if images > info.reference.max_images {
        return Err(Error::invalid(format!(
            "{images} reference images: this model takes at most {}",
            info.reference.max_images
        )));
    }
    Ok(())
}

/// Checks an edit request from the manifest alone ([`Manifest::read`](crate::Manifest::read)):
/// editing support, references, sizes and settings, what [`Pipeline::check_edit`] checks,
/// for a front end that refuses a request before loading the model.
pub fn check_edit_request(
    manifest: &crate::package::Manifest,
    dir: &std::path::Path,
    request: &EditRequest,
) -> Result<()> {
    let Some(info) = manifest.edit.as_ref().filter(|_| manifest.supports("edit")) else {
        return Err(not_editing(dir));
    };
    let max_side = (manifest.max_image_width(), manifest.max_image_height());
    plan(request, info, max_side, manifest.size_multiple()).map(|_| ())
}

/// The output size of an edit that gives no width and height and whose last reference,
/// number `index` (1-based, for messages), is `width` x `height` pixels: that reference as
/// the model gets it (scaled down to the package's reference area when larger, then cropped
/// to the reference multiple), as [`Pipeline::edit`] computes it. For a front end that checks
/// or reports the size before editing.
pub fn edit_output_size(
    manifest: &crate::package::Manifest,
    dir: &std::path::Path,
    (width, height): (u32, u32),
    index: usize,
) -> Result<(u32, u32)> {
    let Some(info) = manifest.edit.as_ref().filter(|_| manifest.supports("edit")) else {
        return Err(not_editing(dir));
    };
    references::prepared_size(width, height, index, &info.reference)
}

/// Decodes reference picture `index` (1-based, for messages) from a PNG, JPEG or WebP file's
/// bytes, refusing from the file's header, before decoding, a size the package's reference
/// rules refuse ([`Pipeline::edit`] would, after a decode of up to 16384 x 16384 pixels).
pub fn decode_reference(
    manifest: &crate::package::Manifest,
    dir: &std::path::Path,
    bytes: &[u8],
    index: usize,
) -> Result<RgbImage> {
    let Some(info) = manifest.edit.as_ref().filter(|_| manifest.supports("edit")) else {
        return Err(not_editing(dir));
    };
    // Unreadable files are named by their place too: a server's client sent several.
    let named = |e: Error| match e {
        Error::Image(m) => Error::Image(format!("reference image {index}: {m}")),
        other => other,
    };
    let (width, height) = crate::image_io::image_size(bytes).map_err(named)?;
    references::check_size(width, height, index, &info.reference)?;
    crate::image_io::decode_rgb(bytes).map_err(named)
}

fn not_editing(dir: &std::path::Path) -> Error {
    Error::invalid(format!(
        "the package {} does not support editing (it has no siglip / transformer_omni graphs)",
        dir.display()
    ))
}

fn images_count(request: &EditRequest) -> usize {
    request.images.len()
}

/// The tokens of the segment that holds the instruction (index N of N + 2).
fn images_segment_tokens(segments: &[PromptEmbedding], images: usize) -> TokenizedPrompt {
    segments[images].tokens.clone()
}

/// The denoising loop of an edit.
struct EditLoop<'a> {
    transformer: &'a Graph,
    refs: &'a References,
    positive: Vec<&'a Array2<f32>>,
    negative: Option<Vec<&'a Array2<f32>>>,
    guidance: Guidance,
    patch: usize,
}

impl EditLoop<'_> {
    fn run(
        &self,
        latents: &mut Array4<f32>,
        schedule: &Schedule,
        context: &RunContext,
        step_times: &mut Vec<Duration>,
        observer: &mut StepObserver<'_>,
    ) -> Result<()> {
        let count = latents.shape()[0];
        let total = schedule.len();
        for i in 0..total {
            context.check()?;
            let start = Instant::now();
            let t_norm = schedule.model_timestep(i);
            let last = i + 1 == total;
            let scale = self.guidance.scale_at(t_norm);
            let prediction = match &self.negative {
                Some(negative) if self.guidance.enabled() && scale > 0.0 => {
                    let input = concatenate![Axis(0), latents.view(), latents.view()];
                    let mut captions = vec![self.positive.clone(); count];
                    captions.extend(std::iter::repeat_n(negative.clone(), count));
                    let out = self.predict(&captions, &input, t_norm, context, last)?;
                    guide(
                        out.slice(s![..count, .., .., ..]),
                        out.slice(s![count.., .., .., ..]),
                        scale,
                        self.guidance.normalization,
                    )
                }
                _ => self.predict(&vec![self.positive.clone(); count], latents, t_norm, context, last)?,
            };
            let before = observer.wants_latents(i + 1).then(|| latents.clone());
            let dt = schedule.sigmas[i + 1] - schedule.sigmas[i];
            Zip::from(&mut *latents).and(&prediction).for_each(|x, &p| *x += dt * -p);
            if latents.iter().any(|v| !v.is_finite()) {
                return Err(Error::inference("denoising", format!("latents became non-finite at step {}", i + 1)));
            }
            step_times.push(start.elapsed());
            let around = before.as_ref().map(|before| AroundStep {
                before,
                after: latents,
                sigma: schedule.sigmas[i],
                sigma_next: schedule.sigmas[i + 1],
            });
            if !observer.done(StepDone { step: i + 1, total, around })? {
                context.cancel();
                return Err(Error::Cancelled);
            }
        }
        Ok(())
    }

    fn predict(
        &self,
        captions: &[Vec<&Array2<f32>>],
        latents: &Array4<f32>,
        t_norm: f32,
        context: &RunContext,
        last: bool,
    ) -> Result<Array4<f32>> {
        omni::predict(self.transformer, captions, self.refs, latents, t_norm, self.patch, context, last)
    }
}
