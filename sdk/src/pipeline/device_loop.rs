//! The denoising loop with its state resident on the transformer's device: latents, caption
//! features, timesteps and the per-step tables are uploaded once, each step is a transformer
//! call and a step-graph call (`model::step`) on bound buffers, and the latents come back once
//! at the end. Between steps nothing crosses between host and device; the host only counts
//! steps (progress, cancellation). On the CPU the same path runs, with "device" memory being
//! host memory: the arithmetic, and so the result, is the host loop's
//! (`pipeline::denoise`), bit for bit (the step graph keeps its float32 order of operations).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ndarray::{concatenate, Array1, Array4, Axis};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::value::PrimitiveTensorElementType;
use ort::value::{DynValue, Tensor};

use super::denoise::Denoiser;
use super::preview::{AroundStep, StepDone, StepObserver};
use super::request::HostTraffic;
use super::start::InpaintBlend;
use crate::error::{Error, Result};
use crate::model::step::{self, StepGraph, StepKind};
use crate::model::transformer::{self, CaptionBatch};
use crate::runtime::graph::Graph;
use crate::runtime::library::Runtime;
use crate::runtime::provider::ProviderConfig;
use crate::runtime::run_context::RunContext;

/// Steps between two reads of the device's non-finite flag (8 bytes, a synchronising copy):
/// Z-Image-Turbo's 8 steps read it once, after the last.
const NON_FINITE_CHECK_PERIOD: usize = 8;

/// The step graphs of one pipeline, loaded on first use on the transformer's device.
#[derive(Default)]
pub(crate) struct StepGraphs {
    loaded: Mutex<Vec<(StepKind, ProviderConfig, Arc<StepGraph>)>>,
}

impl StepGraphs {
    pub fn get(&self, runtime: &Runtime, kind: StepKind, transformer: &ProviderConfig) -> Result<Arc<StepGraph>> {
        let provider = step::provider_for(transformer);
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, graph)) = loaded.iter().find(|(k, p, _)| *k == kind && *p == provider) {
            return Ok(Arc::clone(graph));
        }
        let graph = Arc::new(StepGraph::load(runtime, kind, &provider)?);
        loaded.push((kind, provider, Arc::clone(&graph)));
        Ok(graph)
    }
}

/// Where the loop's buffers live: host memory for the CPU, the device's memory otherwise.
fn allocator(transformer: &Graph, provider: &ProviderConfig) -> Result<Allocator> {
    let err = |e: ort::Error| Error::runtime(format!("device loop: allocator: {e}")).caused_by(e);
    match provider {
        ProviderConfig::Cpu => Ok(Allocator::default()),
        ProviderConfig::Cuda { device_id, .. } | ProviderConfig::TensorRt { device_id, .. } => {
            let info = MemoryInfo::new(AllocationDevice::CUDA, *device_id, AllocatorType::Device, MemoryType::Default)
                .map_err(err)?;
            transformer.with_session(|session| Allocator::new(session, info)).map_err(err)
        }
    }
}

/// Allocates device buffers and copies host data into them, counting the bytes.
struct Device<'a> {
    allocator: &'a Allocator,
    copied: u64,
}

impl Device<'_> {
    fn empty<T: PrimitiveTensorElementType + std::fmt::Debug>(&self, shape: &[usize]) -> Result<Tensor<T>> {
        Tensor::<T>::new(self.allocator, shape.to_vec())
            .map_err(|e| Error::runtime(format!("device loop: allocating {shape:?}: {e}")).caused_by(e))
    }

    fn upload<T: PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static>(
        &mut self,
        shape: &[usize],
        data: Vec<T>,
    ) -> Result<Tensor<T>> {
        let bytes = (data.len() * std::mem::size_of::<T>()) as u64;
        let host = Tensor::from_array((shape.to_vec(), data.into_boxed_slice()))
            .map_err(|e| Error::runtime(format!("device loop: host tensor: {e}")).caused_by(e))?;
        let mut device = self.empty::<T>(shape)?;
        host.copy_into(&mut device).map_err(|e| Error::runtime(format!("device loop: upload: {e}")).caused_by(e))?;
        self.copied += bytes;
        Ok(device)
    }

    /// Copies `data` into an existing buffer of the same shape (its address stays).
    fn upload_into<T: PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static>(
        &mut self,
        target: &mut Tensor<T>,
        data: Vec<T>,
    ) -> Result<()> {
        let shape: Vec<usize> = target.shape().iter().map(|&d| d as usize).collect();
        let bytes = (data.len() * std::mem::size_of::<T>()) as u64;
        let host = Tensor::from_array((shape, data.into_boxed_slice()))
            .map_err(|e| Error::runtime(format!("device loop: host tensor: {e}")).caused_by(e))?;
        host.copy_into(target).map_err(|e| Error::runtime(format!("device loop: upload: {e}")).caused_by(e))?;
        self.copied += bytes;
        Ok(())
    }

    fn download<T: PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static>(
        &mut self,
        value: &Tensor<T>,
    ) -> Result<(Vec<usize>, Vec<T>)> {
        let shape: Vec<usize> = value.shape().iter().map(|&d| d as usize).collect();
        let mut host = Tensor::<T>::new(&Allocator::default(), shape.clone())
            .map_err(|e| Error::runtime(format!("device loop: host tensor: {e}")).caused_by(e))?;
        value.copy_into(&mut host).map_err(|e| Error::runtime(format!("device loop: download: {e}")).caused_by(e))?;
        let (_, data) = host.extract_tensor();
        self.copied += std::mem::size_of_val(data) as u64;
        Ok((shape, data.to_vec()))
    }
}

/// Buffers of one batch layout of the transformer call: `k` = 2 under guidance (conditional
/// and unconditional rows), 1 without. Kept by the transformer's session per shape and reused
/// by later generations of that shape (see `runtime::cuda_graph`: a replayed CUDA graph reads
/// and writes exactly these addresses).
struct LayoutBuffers {
    model_input: Tensor<f32>,
    timestep: Tensor<f32>,
    noise_pred: Tensor<f32>,
    /// Row indices `[0..B) * k`: how the step graph builds the next model input.
    rows: Tensor<i64>,
    cap_feats: Tensor<f32>,
    cap_mask: Tensor<bool>,
}

struct Layout {
    k: usize,
    buffers: LayoutBuffers,
    binding: ort::session::IoBinding,
    /// The shape key the buffers are kept under and the capture id, when checked out.
    kept: Option<(Vec<usize>, i32)>,
}

/// Per-step values, indexed by the absolute step `i` (length steps + 1: the last step reads
/// entry `i + 1` for the next timestep).
pub(crate) struct Tables {
    pub guided: Vec<bool>,
    pub dt: Vec<f32>,
    pub scale: Vec<f32>,
    pub normalization: Vec<f32>,
    pub model_timestep: Vec<f32>,
    pub sigma_next: Vec<f32>,
    pub known_is_image: Vec<bool>,
}

impl Tables {
    /// The same decisions and values as the host loop makes step by step.
    pub fn new(denoiser: &Denoiser<'_>) -> Tables {
        let schedule = denoiser.schedule;
        let n = schedule.len();
        let mut t = Tables {
            guided: vec![false; n + 1],
            dt: vec![0.0; n + 1],
            scale: vec![0.0; n + 1],
            normalization: vec![0.0; n + 1],
            model_timestep: vec![0.0; n + 1],
            sigma_next: vec![0.0; n + 1],
            known_is_image: vec![true; n + 1],
        };
        for i in 0..n {
            let t_norm = schedule.model_timestep(i);
            let scale = denoiser.guidance.scale_at(t_norm);
            let guided = denoiser.guidance.enabled() && scale > 0.0 && denoiser.positive_and_negative.is_some();
            t.guided[i] = guided;
            t.dt[i] = schedule.sigmas[i + 1] - schedule.sigmas[i];
            if guided {
                t.scale[i] = scale;
                t.normalization[i] = denoiser.guidance.normalization;
            }
            t.model_timestep[i] = t_norm;
            t.sigma_next[i] = schedule.sigmas[i + 1];
            t.known_is_image[i] = i + 1 >= n;
        }
        t
    }
}

/// Runs the steps of `denoiser` on `latents` in place, on the transformer's device.
#[allow(clippy::too_many_arguments)] // the host loop's arguments plus the step graph
pub(crate) fn run(
    denoiser: &Denoiser<'_>,
    step_graph: &StepGraph,
    provider: &ProviderConfig,
    inpaint: Option<&InpaintBlend>,
    latents: &mut Array4<f32>,
    context: &RunContext,
    step_times: &mut Vec<Duration>,
    observer: &mut StepObserver<'_>,
) -> Result<HostTraffic> {
    let schedule = denoiser.schedule;
    let n = schedule.len();
    let first = denoiser.first_step;
    let total = n - first;
    if total == 0 {
        return Ok(HostTraffic::default());
    }
    let tables = Tables::new(denoiser);
    let graph = denoiser.transformer;
    let allocator = allocator(graph, provider)?;
    let mut dev = Device { allocator: &allocator, copied: 0 };
    let shape = latents.shape().to_vec();
    let t_len = [n + 1];

    // Tables and counters.
    let tables_on_device = [
        dev.upload(&t_len, tables.dt.clone())?,
        dev.upload(&t_len, tables.scale.clone())?,
        dev.upload(&t_len, tables.normalization.clone())?,
        dev.upload(&t_len, tables.model_timestep.clone())?,
    ];
    let mut counters = [dev.upload(&[1], vec![first as i64])?, dev.empty::<i64>(&[1])?];
    let mut bad = [dev.upload(&[1], vec![0i64])?, dev.empty::<i64>(&[1])?];
    let mut lat = [dev.upload(&shape, latents.iter().copied().collect())?, dev.empty::<f32>(&shape)?];
    let inpaint_buffers = match inpaint {
        Some(blend) => {
            let (image, noise, mask) = blend.parts();
            Some([
                DynValue::from(dev.upload(image.shape(), image.iter().copied().collect())?),
                DynValue::from(dev.upload(noise.shape(), noise.iter().copied().collect())?),
                DynValue::from(dev.upload(mask.shape(), mask.iter().copied().collect())?),
                DynValue::from(dev.upload(&t_len, tables.sigma_next.clone())?),
                DynValue::from(dev.upload(&t_len, tables.known_is_image.clone())?),
            ])
        }
        None => None,
    };

    // One layout per batch shape the steps use, with the first step's inputs and the captions
    // in its buffers.
    let mut layouts: Vec<Layout> = Vec::new();
    let made = make_layouts(denoiser, &tables, latents, &mut dev, &mut layouts);
    let result = made.and_then(|()| {
        let buffers = StepBuffers {
            tables: &tables_on_device,
            lat: &mut lat,
            counters: &mut counters,
            bad: &mut bad,
            inpaint: inpaint_buffers.as_ref(),
        };
        steps(denoiser, step_graph, &tables, &mut layouts, &mut dev, buffers, context, step_times, observer)
    });
    // The kept buffers go back to the session also after a failure: their addresses are what
    // matters, not their contents.
    for layout in layouts {
        if let Some((key, _)) = layout.kept {
            drop(layout.binding);
            graph.captures().checkin(&key, Box::new(layout.buffers));
        }
    }
    let (setup_bytes, max_step_bytes, current) = result?;

    let before = dev.copied;
    let (_, bad_step) = dev.download(&bad[current])?;
    let (_, values) = dev.download(&lat[current])?;
    let final_bytes = dev.copied - before;
    if bad_step[0] > 0 {
        return Err(super::denoise::non_finite(bad_step[0] as usize - first, total, denoiser.precision));
    }
    *latents = Array4::from_shape_vec(latents.raw_dim(), values)
        .map_err(|e| Error::inference("denoising", format!("device loop: latents shape: {e}")))?;
    Ok(HostTraffic { setup_bytes, max_step_bytes, final_bytes })
}

/// Takes (or allocates) the buffers of each batch layout the steps use and fills them.
fn make_layouts(
    denoiser: &Denoiser<'_>,
    tables: &Tables,
    latents: &Array4<f32>,
    dev: &mut Device<'_>,
    layouts: &mut Vec<Layout>,
) -> Result<()> {
    let graph = denoiser.transformer;
    let (first, n) = (denoiser.first_step, denoiser.schedule.len());
    let shape = latents.shape().to_vec();
    let b = shape[0];
    let per_image = |k: usize| [vec![k * b], shape[1..].to_vec()].concat();
    for k in [1usize, 2] {
        if !(first..n).any(|i| tables.guided[i] == (k == 2)) {
            continue;
        }
        let captions: &CaptionBatch = if k == 2 {
            denoiser.positive_and_negative.as_ref().expect("guided steps have negative captions")
        } else {
            &denoiser.positive
        };
        let key: Vec<usize> = [&[k][..], &shape, &captions.feats.shape()[1..]].concat();
        let (kept, reused) = match graph.captures().checkout(&key) {
            Ok(checkout) => {
                let reused = checkout.buffers.map(|b| b.downcast::<LayoutBuffers>().expect("layout buffers"));
                (Some((key, checkout.id)), reused)
            }
            Err(reason) => {
                if graph.is_capturing() {
                    tracing::info!(reason = %reason, "denoising steps run without CUDA graph replay");
                }
                (None, None)
            }
        };
        let feats: Vec<f32> = captions.feats.iter().copied().collect();
        let mask: Vec<bool> = captions.mask.iter().copied().collect();
        let mut buffers = match reused {
            Some(mut buffers) => {
                dev.upload_into(&mut buffers.cap_feats, feats)?;
                dev.upload_into(&mut buffers.cap_mask, mask)?;
                *buffers
            }
            None => LayoutBuffers {
                model_input: dev.empty::<f32>(&per_image(k))?,
                timestep: dev.empty::<f32>(&[k * b])?,
                noise_pred: dev.empty::<f32>(&per_image(k))?,
                rows: dev.upload(&[k * b], (0..k * b).map(|r| (r % b) as i64).collect())?,
                cap_feats: dev.upload(captions.feats.shape(), feats)?,
                cap_mask: dev.upload(captions.mask.shape(), mask)?,
            },
        };
        if tables.guided[first] == (k == 2) {
            let repeated = concatenate(Axis(0), &vec![latents.view(); k]).expect("same shapes");
            dev.upload_into(&mut buffers.model_input, repeated.iter().copied().collect())?;
            dev.upload_into(&mut buffers.timestep, Array1::from_elem(k * b, tables.model_timestep[first]).to_vec())?;
        }
        let mut binding = graph.with_session(|s| s.create_binding()).map_err(|e| Error::ort("transformer", e))?;
        let LayoutBuffers { model_input, timestep, noise_pred, cap_feats, cap_mask, .. } = &mut buffers;
        transformer::bind(&mut binding, model_input, timestep, cap_feats, cap_mask, noise_pred)?;
        layouts.push(Layout { k, buffers, binding, kept });
    }
    Ok(())
}

/// The step graph's own buffers: tables, and the ping-pong pairs of latents, step counter and
/// non-finite flag.
struct StepBuffers<'a> {
    tables: &'a [Tensor<f32>; 4],
    lat: &'a mut [Tensor<f32>; 2],
    counters: &'a mut [Tensor<i64>; 2],
    bad: &'a mut [Tensor<i64>; 2],
    inpaint: Option<&'a [DynValue; 5]>,
}

/// The steps; returns the bytes uploaded before them, the most copied by one step, and which
/// of the ping-pong buffers holds the result.
#[allow(clippy::too_many_arguments)]
fn steps(
    denoiser: &Denoiser<'_>,
    step_graph: &StepGraph,
    tables: &Tables,
    layouts: &mut [Layout],
    dev: &mut Device<'_>,
    buffers: StepBuffers<'_>,
    context: &RunContext,
    step_times: &mut Vec<Duration>,
    observer: &mut StepObserver<'_>,
) -> Result<(u64, u64, usize)> {
    let graph = denoiser.transformer;
    let (first, n) = (denoiser.first_step, denoiser.schedule.len());
    let total = n - first;
    let StepBuffers { tables: tables_on_device, lat, counters, bad, inpaint: inpaint_buffers } = buffers;
    let setup_bytes = dev.copied;
    let kinds: Vec<usize> = layouts.iter().map(|l| l.k).collect();
    let layout_of = |i: usize| kinds.iter().position(|&k| (k == 2) == tables.guided[i]).expect("layout made");

    let mut max_step_bytes = 0;
    let mut current = 0;
    for (done, i) in (first..n).enumerate() {
        context.check()?;
        let start = Instant::now();
        let before = dev.copied;
        let last = i + 1 == n;
        let this = layout_of(i);
        let capture = layouts[this].kept.as_ref().map(|(_, id)| *id);
        graph.run_binding(&layouts[this].binding, context, last, capture)?;
        let next = if last { this } else { layout_of(i + 1) };
        let mut binding = step_graph.binding()?;
        {
            let err = |e: ort::Error| Error::ort("step", e);
            let (src, dst) = if current == 0 {
                lat.split_at_mut(1)
            } else {
                let (a, b) = lat.split_at_mut(1);
                (b, a)
            };
            let (c_src, c_dst) = if current == 0 {
                counters.split_at_mut(1)
            } else {
                let (a, b) = counters.split_at_mut(1);
                (b, a)
            };
            let (b_src, b_dst) = if current == 0 {
                bad.split_at_mut(1)
            } else {
                let (a, b) = bad.split_at_mut(1);
                (b, a)
            };
            binding.bind_input(step::NOISE_PRED, &layouts[this].buffers.noise_pred).map_err(err)?;
            binding.bind_input(step::LATENTS, &src[0]).map_err(err)?;
            binding.bind_input(step::STEP_INDEX, &c_src[0]).map_err(err)?;
            binding.bind_input(step::BAD_STEP, &b_src[0]).map_err(err)?;
            binding.bind_input(step::DT, &tables_on_device[0]).map_err(err)?;
            binding.bind_input(step::SCALE, &tables_on_device[1]).map_err(err)?;
            binding.bind_input(step::NORMALIZATION, &tables_on_device[2]).map_err(err)?;
            binding.bind_input(step::MODEL_TIMESTEP, &tables_on_device[3]).map_err(err)?;
            binding.bind_input(step::NEXT_ROWS, &layouts[next].buffers.rows).map_err(err)?;
            if let Some(extra) = inpaint_buffers {
                let names = [step::IMAGE_LATENTS, step::NOISE, step::MASK, step::SIGMA_NEXT, step::KNOWN_IS_IMAGE];
                for (name, value) in names.into_iter().zip(extra) {
                    binding.bind_input(name, value).map_err(err)?;
                }
            }
            binding.bind_output(step::LATENTS_OUT, &mut dst[0]).map_err(err)?;
            binding.bind_output(step::STEP_OUT, &mut c_dst[0]).map_err(err)?;
            binding.bind_output(step::BAD_STEP_OUT, &mut b_dst[0]).map_err(err)?;
            let layout = &mut layouts[next].buffers;
            binding.bind_output(step::MODEL_INPUT, &mut layout.model_input).map_err(err)?;
            binding.bind_output(step::TIMESTEP_OUT, &mut layout.timestep).map_err(err)?;
        }
        step_graph.run(&binding, context)?;
        step_times.push(start.elapsed());
        // The only host traffic between steps: the 8-byte non-finite flag every
        // NON_FINITE_CHECK_PERIOD steps and before a preview (a run that overflowed stops
        // within that many steps instead of running to the end, and a preview is never made
        // from non-finite latents), and for a preview the latents on both sides of the step.
        let wants_latents = observer.wants_latents(done + 1);
        if !last && (wants_latents || (done + 1) % NON_FINITE_CHECK_PERIOD == 0) {
            let (_, bad_step) = dev.download(&bad[1 - current])?;
            if bad_step[0] > 0 {
                return Err(super::denoise::non_finite(bad_step[0] as usize - first, total, denoiser.precision));
            }
        }
        let around = if wants_latents {
            let (shape, before_values) = dev.download(&lat[current])?;
            let (_, after_values) = dev.download(&lat[1 - current])?;
            let as_array = |values| {
                Array4::from_shape_vec((shape[0], shape[1], shape[2], shape[3]), values)
                    .map_err(|e| Error::inference("denoising", format!("device loop: latents shape: {e}")))
            };
            Some((as_array(before_values)?, as_array(after_values)?))
        } else {
            None
        };
        current = 1 - current;
        max_step_bytes = max_step_bytes.max(dev.copied - before);
        let around = around.as_ref().map(|(before, after)| AroundStep {
            before,
            after,
            sigma: denoiser.schedule.sigmas[i],
            sigma_next: denoiser.schedule.sigmas[i + 1],
        });
        if !observer.done(StepDone { step: done + 1, total, around })? {
            context.cancel();
            return Err(Error::Cancelled);
        }
    }

    Ok((setup_bytes, max_step_bytes, current))
}
