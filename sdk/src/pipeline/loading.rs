//! Creating a pipeline's sessions: which graph entry each stage uses, on which provider, with
//! which session settings.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ort::value::{DynValue, Tensor};

use crate::error::{Error, Result};
use crate::load_options::LoadOptions;
use crate::lora::{self, LoraSetting, MergedData, SharedWeight, Targets};
use crate::model::vae_tiling::TileGeometry;
use crate::package::controlnet::ControlNetInfo;
use crate::package::files::resolve;
use crate::package::graph::{GraphEntry, GraphKind};
use crate::package::Manifest;
use crate::runtime::cuda_graph::session_refusal;
use crate::runtime::device::Device;
use crate::runtime::graph::{GraphSlot, MemoryMode};
use crate::runtime::int8_products;
use crate::runtime::library::Runtime;
use crate::runtime::nchwc;
use crate::runtime::prepack_probe;
use crate::runtime::provider::ProviderConfig;
use crate::runtime::session::{optimized_cache_dir, DeclaredIo, ExternalInitializers, SessionSettings};

/// Loads the graphs of one package with one set of options.
pub(crate) struct GraphLoader<'a> {
    pub runtime: &'static Runtime,
    pub dir: &'a Path,
    pub manifest: &'a Manifest,
    pub options: &'a LoadOptions,
}

impl GraphLoader<'_> {
    /// Creates the session of `entry`, a graph of kind `kind`, on `device`.
    pub fn load(&self, kind: GraphKind, entry: &GraphEntry, device: Device) -> Result<GraphSlot> {
        self.load_with(kind, entry, device, ExternalInitializers::default())
    }

    /// [`load`](Self::load) with some of the graph's initializers replaced (LoRA-merged
    /// weights). Such a session skips the CPU's optimised-model cache (the cached model would
    /// hold the merged weights of one set), and TensorRT keys its engines by the set.
    pub fn load_with(
        &self,
        kind: GraphKind,
        entry: &GraphEntry,
        device: Device,
        initializers: ExternalInitializers,
    ) -> Result<GraphSlot> {
        let (provider, settings, capture_refusal) = self.session_setup(kind, entry, device, initializers);
        let mut slot = GraphSlot::load(
            self.runtime,
            kind,
            resolve(self.dir, &entry.path),
            provider,
            &settings,
            self.options.memory_mode,
        )?;
        slot.set_capture_refusal(capture_refusal);
        Ok(slot)
    }

    /// The package's graph of `kind` (which every package has) in a slot that creates its
    /// session on first use: for graphs only some requests need (the VAE encoder: image-to-image,
    /// inpainting, ControlNet, editing), so that loading does not pay for them.
    pub fn defer_required(&self, kind: GraphKind, device: Device) -> Result<GraphSlot> {
        Ok(self.defer_with(kind, self.required_entry(kind)?, device, ExternalInitializers::default()))
    }

    /// [`load_with`](Self::load_with), the session created on first use (see
    /// [`defer_required`](Self::defer_required)).
    pub fn defer_with(
        &self,
        kind: GraphKind,
        entry: &GraphEntry,
        device: Device,
        initializers: ExternalInitializers,
    ) -> GraphSlot {
        let (provider, settings, capture_refusal) = self.session_setup(kind, entry, device, initializers);
        let mut slot = GraphSlot::deferred(
            self.runtime,
            kind,
            resolve(self.dir, &entry.path),
            provider,
            &settings,
            self.options.memory_mode,
        );
        slot.set_capture_refusal(capture_refusal);
        slot
    }

    /// The provider, session settings and CUDA-graph refusal a session of `entry` is built with.
    fn session_setup(
        &self,
        kind: GraphKind,
        entry: &GraphEntry,
        device: Device,
        initializers: ExternalInitializers,
    ) -> (ProviderConfig, SessionSettings, Option<String>) {
        let options = self.options;
        let capture_refusal =
            session_refusal(options.gpu.cuda_graphs, kind, device, options.memory_mode == MemoryMode::Sequential);
        let provider = ProviderConfig::new(
            device,
            kind,
            entry,
            self.manifest,
            &options.gpu,
            options.exact_gpu_arena(),
            initializers.key(),
        )
        .with_capture(capture_refusal.is_none());
        let mut settings = self.settings(kind);
        settings.declared_io = Some(DeclaredIo::of(entry));
        let replaced = !initializers.is_empty();
        settings.initializers = initializers;
        settings.optimized_cache = match kind {
            _ if replaced => None,
            // The text encoder loads faster without (see `LoadOptions::optimized_model_cache`).
            GraphKind::TextEncoder | GraphKind::TextDecoder | GraphKind::VisionEncoder => None,
            GraphKind::Transformer
            | GraphKind::TransformerOmni
            | GraphKind::VaeDecoder
            | GraphKind::VaeDecoderCpu
            | GraphKind::VaeDecoderInt8
            | GraphKind::VaeEncoder => {
                options.optimized_model_cache.as_ref().map(|base| optimized_cache_dir(base, kind, &entry.sha256))
            }
        };
        // A prebuilt layout holds the graph file's own weights (a session with replaced
        // initializers loads the file), and runs on the CPU provider only.
        if !replaced && provider == ProviderConfig::Cpu {
            settings.prebuilt_cpu_graph = self.nchwc_layout(entry).or_else(|| self.prepacked_layout(entry, &settings));
        }
        (provider, settings, capture_refusal)
    }

    /// The graph's NCHWc layout, where it fits this runtime's block width.
    fn nchwc_layout(&self, entry: &GraphEntry) -> Option<std::path::PathBuf> {
        let layout = entry.cpu_layout.as_ref()?;
        (nchwc::block_width(self.runtime) == Some(layout.nchwc_block)).then(|| resolve(self.dir, &layout.file.path))
    }

    /// The graph's prepacked layout, where its packed copies are what this runtime's kernels
    /// read: same architecture and an exact probe (a session that does not pack gains nothing).
    fn prepacked_layout(&self, entry: &GraphEntry, settings: &SessionSettings) -> Option<std::path::PathBuf> {
        let prepacked = entry.cpu_prepacked.as_ref()?;
        let usable = !settings.skip_prepacking
            && !settings.shares_weights
            && prepacked.arch.as_deref() == Some(std::env::consts::ARCH)
            && prepack_probe::packed_weights_readable(
                self.runtime,
                &resolve(self.dir, &prepacked.probe.file.path),
                &prepacked.probe.file.sha256,
            );
        usable.then(|| resolve(self.dir, &prepacked.file.path))
    }

    fn required_entry(&self, kind: GraphKind) -> Result<&GraphEntry> {
        self.manifest
            .graphs
            .get(kind)
            .ok_or_else(|| Error::package(self.dir, format!("the package has no {kind} graph")))
    }

    /// Loads the package's graph of `kind`, which every package has.
    pub fn load_required(&self, kind: GraphKind, device: Device) -> Result<GraphSlot> {
        let entry = self.required_entry(kind)?;
        self.load(kind, entry, device)
    }

    fn settings(&self, kind: GraphKind) -> SessionSettings {
        let base = self.options.session_settings();
        match kind {
            // A float text encoder runs once per generation: its weights are not worth packing
            // at load, and with an enhancer decoder in the package it shares the mapped
            // weights file with it. A quantized one prepacks (MatMulNBits needs it), except in
            // an enhanced package made before the quantized LM head
            // (`QuantizationInfo::text_graphs_prepack`).
            GraphKind::TextEncoder => {
                let has_decoder = self.manifest.graphs.text_decoder.is_some();
                match &self.manifest.quantization {
                    None => SessionSettings { shares_weights: has_decoder, skip_prepacking: true, ..base },
                    Some(q) => SessionSettings { shares_weights: !q.text_graphs_prepack(has_decoder), ..base },
                }
            }
            GraphKind::VaeDecoder | GraphKind::VaeDecoderCpu | GraphKind::VaeDecoderInt8 | GraphKind::VaeEncoder => {
                SessionSettings { release_activations: true, ..base }
            }
            // int8 activations (`quantization.activations`, in both transformer graphs of an
            // editing package): exact int8 kernels where the fast ones can saturate (or where the
            // environment asks for them).
            GraphKind::Transformer | GraphKind::TransformerOmni => SessionSettings {
                exact_int8_products: self.manifest.int8_activations() && int8_products::exact_products_wanted(),
                ..base
            },
            GraphKind::TextDecoder | GraphKind::VisionEncoder => base,
        }
    }
}

/// The graph that decodes images: `vae_decoder_cpu` when `winograd_vae` asks for it on the CPU,
/// `vae_decoder_int8` when `int8_vae` does (an error if the package has none, or if both are
/// asked for), otherwise `vae_decoder`.
pub(crate) fn vae_decoder_kind(manifest: &Manifest, options: &LoadOptions) -> Result<GraphKind> {
    let (kind, missing) = match (options.winograd_vae, options.int8_vae) {
        (true, true) => {
            return Err(Error::invalid(
                "winograd_vae and int8_vae: choose one VAE decoder (the int8 one has no Winograd convolutions)",
            ))
        }
        (true, false) => (
            GraphKind::VaeDecoderCpu,
            "winograd_vae: this package has no vae_decoder_cpu graph (export-scripts/export.py writes one for VAEs \
             with convolutions of 256 channels or more)",
        ),
        (false, true) => (
            GraphKind::VaeDecoderInt8,
            "int8_vae: this package has no vae_decoder_int8 graph (export-scripts/quantize_package.py --int8-vae \
             or python -m zimage_export.vae_int8 writes one)",
        ),
        (false, false) => return Ok(GraphKind::VaeDecoder),
    };
    match (options.device, manifest.graphs.get(kind)) {
        (Device::Cpu, Some(_)) => Ok(kind),
        (Device::Cpu, None) => Err(Error::invalid(missing)),
        _ => Ok(GraphKind::VaeDecoder),
    }
}

/// `LoadOptions::vae_tiling` checked against the package's VAE and the device it decodes on.
pub(crate) fn vae_tiling(manifest: &Manifest, options: &LoadOptions) -> Result<Option<TileGeometry>> {
    let Some(tiling) = options.vae_tiling else { return Ok(None) };
    if matches!(options.device, Device::TensorRt { .. }) {
        return Err(Error::invalid(
            "vae_tiling: a TensorRT engine serves the image sizes of its profile, not the tiles' (edge tiles are \
             smaller): decode on cuda (--device cuda --transformer-device tensorrt) or leave tiling off",
        ));
    }
    tiling.geometry(manifest.vae.scale_factor).map(Some)
}

/// The device the transformer runs on: `transformer_device`, else `device`.
pub(crate) fn transformer_device(options: &LoadOptions) -> Device {
    options.transformer_device.unwrap_or(options.device)
}

/// ONNX Runtime's CPU provider lacks kernels some precisions need, and its GPU providers lack
/// the uint8 x int8 products of a transformer with int8 activations: say so before it
/// fails on the first node with "Could not find an implementation", or runs every product on
/// the CPU between copies.
pub(crate) fn check_precision_runs_on(manifest: &Manifest, options: &LoadOptions) -> Result<()> {
    let device = transformer_device(options);
    if manifest.int8_activations() && device != Device::Cpu {
        return Err(Error::invalid(format!(
            "this package's transformer computes with int8 activations (quantization.activations), a CPU format: \
             load it on the CPU, not {}, or use a weight-only quantized or float package on the GPU",
            device.provider_name()
        )));
    }
    let on_cpu = [Some(options.device), options.transformer_device].contains(&Some(Device::Cpu));
    if on_cpu && !manifest.precision.runs_on_cpu() {
        return Err(Error::invalid(format!(
            "this package is {}, which ONNX Runtime runs only on a GPU: load it with device cuda or tensorrt \
             (text encoder and transformer), or export an fp32 or fp16 package for the CPU",
            manifest.precision
        )));
    }
    Ok(())
}

/// The transformer with a LoRA set merged into its weights (the package's own weights for an
/// empty set, or one whose scales are all 0); with `controlnet`, that ControlNet's combined
/// transformer + ControlNet graph instead, the LoRA merged into the transformer weights it
/// shares (the ControlNet's own weights are never changed, as in diffusers, whose LoRA loader
/// targets the transformer).
pub(crate) fn load_transformer(
    graphs: &GraphLoader<'_>,
    device: Device,
    loras: Option<&MergedLoras>,
    controlnet: Option<&ControlNetInfo>,
) -> Result<GraphSlot> {
    let entry = controlnet.map_or(&graphs.manifest.graphs.transformer, |info| &info.graph);
    let reader = if controlnet.is_some() { WeightReader::ReadsTransformer } else { WeightReader::Transformer };
    let initializers = lora_initializers(graphs, device, loras, entry, reader)?;
    graphs.load_with(GraphKind::Transformer, entry, device, initializers)
}

/// The Omni (editing) transformer, when the package has one (its session made by the first
/// edit: a pipeline that only generates never holds the second graph), and whether `loras` are
/// merged into it: they are when it reads the transformer's weights from the transformer's files
/// (`edit.transformer_weights`, export.py's last step); a package whose Omni graph keeps its
/// own copy of the weights gets its graph as exported, and edits refuse the set.
pub(crate) fn load_omni_transformer(
    graphs: &GraphLoader<'_>,
    device: Device,
    loras: Option<&MergedLoras>,
) -> Result<Option<OmniTransformer>> {
    let Some(entry) = &graphs.manifest.graphs.transformer_omni else { return Ok(None) };
    let shares_weights = graphs.manifest.edit.as_ref().is_some_and(|e| e.transformer_weights.is_some());
    let merged = loras.filter(|_| shares_weights);
    let initializers = lora_initializers(graphs, device, merged, entry, WeightReader::Omni)?;
    let slot = graphs.defer_with(GraphKind::TransformerOmni, entry, device, initializers);
    Ok(Some(OmniTransformer { slot, has_loras: shares_weights || loras.is_none() }))
}

/// The Omni transformer's session and whether the pipeline's LoRA set is merged into it.
pub(crate) struct OmniTransformer {
    pub slot: GraphSlot,
    pub has_loras: bool,
}

/// A LoRA set merged once into the transformer's weights, as ONNX Runtime tensors that every
/// graph reading those weights shares (the transformer, a ControlNet's combined graph, the Omni
/// transformer): one merged copy in memory, however many sessions use it.
/// The pipeline keeps it while the set is active, so that attaching a ControlNet reuses it
/// rather than merging a second copy the Omni transformer would not share.
pub(crate) struct MergedLoras {
    weights: Vec<MergedTensor>,
    key: String,
    bytes: usize,
}

/// One merged weight as an ONNX Runtime tensor.
struct MergedTensor {
    /// Its initializer in the transformer graph, or for an Omni-only weight in the Omni graph.
    initializer: String,
    dims: Vec<usize>,
    /// Whether it is external data of that graph.
    external: bool,
    /// Only the Omni transformer has it (`MergedWeight::omni_only`).
    omni_only: bool,
    /// Where the package's weight is (`MergedWeight::place`).
    place: Option<(PathBuf, u64, u64)>,
    value: Arc<DynValue>,
}

/// Which graph takes merged LoRA weights ([`lora_initializers`]).
#[derive(Clone, Copy)]
enum WeightReader {
    /// The transformer itself: its merged weights by their own names.
    Transformer,
    /// A graph that reads the transformer's weights from its files (a ControlNet's combined
    /// graph): the merged weights re-addressed to its initializers.
    ReadsTransformer,
    /// The Omni transformer: the transformer's weights re-addressed, and its own merged ones.
    Omni,
}

/// `loras` merged into the transformer's weights; `None` for an empty set.
pub(crate) fn merge_loras(graphs: &GraphLoader<'_>, loras: &[LoraSetting]) -> Result<Option<Arc<MergedLoras>>> {
    if loras.is_empty() {
        return Ok(None);
    }
    let targets = Targets::read(graphs.dir, graphs.manifest, loras)?;
    let merged = targets.merge(loras)?;
    let mut weights = Vec::with_capacity(merged.len());
    let mut bytes = 0;
    for weight in merged {
        bytes += weight.data.bytes();
        let failed = |e: ort::Error| Error::runtime(format!("LoRA weight {}: {e}", weight.initializer)).caused_by(e);
        let dims = weight.dims.clone();
        // Moved into the tensor, not copied.
        let value = match weight.data {
            MergedData::Float32(v) => Tensor::from_array((dims, v)).map(|t| t.into_dyn()),
            MergedData::Float16(v) => Tensor::from_array((dims, v)).map(|t| t.into_dyn()),
            MergedData::BFloat16(v) => Tensor::from_array((dims, v)).map(|t| t.into_dyn()),
        }
        .map_err(failed)?;
        weights.push(MergedTensor {
            initializer: weight.initializer,
            dims: weight.dims,
            external: weight.external,
            omni_only: weight.omni_only,
            place: weight.place,
            value: Arc::new(value),
        });
    }
    Ok(Some(Arc::new(MergedLoras { weights, key: lora::set_key(loras), bytes })))
}

/// The merged weights as initializers of `entry`, the graph `reader` says it is: the
/// transformer itself, or a graph that reads the transformer's weights from its files (a
/// ControlNet's combined graph, the Omni transformer), re-addressed to its initializers; the
/// Omni transformer also takes the merged weights only it has.
fn lora_initializers(
    graphs: &GraphLoader<'_>,
    device: Device,
    loras: Option<&MergedLoras>,
    entry: &GraphEntry,
    reader: WeightReader,
) -> Result<ExternalInitializers> {
    let Some(merged) = loras else { return Ok(ExternalInitializers::default()) };
    let (omni_only, shared): (Vec<&MergedTensor>, Vec<&MergedTensor>) =
        merged.weights.iter().partition(|w| w.omni_only);
    let own = |w: &MergedTensor| (w.initializer.clone(), Arc::clone(&w.value), w.external);
    let mut tensors = Vec::with_capacity(merged.weights.len());
    match reader {
        WeightReader::Transformer => tensors.extend(shared.iter().map(|w| own(w))),
        WeightReader::ReadsTransformer | WeightReader::Omni => {
            let weights: Vec<SharedWeight> = shared
                .iter()
                .map(|w| SharedWeight { initializer: &w.initializer, dims: &w.dims, place: w.place.as_ref() })
                .collect();
            let readers = lora::readers_in(&weights, &resolve(graphs.dir, &entry.path))?;
            for (w, names) in shared.iter().zip(readers) {
                tensors.extend(names.into_iter().map(|(name, external)| (name, Arc::clone(&w.value), external)));
            }
        }
    }
    if let WeightReader::Omni = reader {
        tensors.extend(omni_only.iter().map(|w| own(w)));
    }
    // A weight kept inside the .onnx protobuf can only be overridden when the session's
    // weights are set up (AddInitializer), after TensorRT has built its engine from the
    // graph's own values: refuse rather than run the package's weights silently.
    if let (Device::TensorRt { .. }, Some((embedded, _, _))) =
        (device, tensors.iter().find(|(_, _, external)| !external))
    {
        return Err(Error::lora(
            resolve(graphs.dir, &entry.path),
            format!(
                "initializer {embedded} is stored inside the graph file, which TensorRT cannot take LoRA weights \
                 for; run the transformer on cuda, or re-export with its weights in external data"
            ),
        ));
    }
    if tensors.is_empty() {
        return Ok(ExternalInitializers::default());
    }
    Ok(ExternalInitializers::new(tensors, merged.key.clone(), merged.bytes))
}

/// The editing graphs of a pipeline whose package has them (`pipeline::edit` runs them).
pub(crate) struct EditGraphs {
    pub vision: GraphSlot,
}

/// `siglip` (on `device`, its session made by the first edit) when the package has the editing
/// graphs (the Omni transformer is [`load_omni_transformer`]'s: it changes with the LoRA set).
pub(crate) fn load_edit_graphs(graphs: &GraphLoader<'_>, device: Device) -> Option<EditGraphs> {
    let g = &graphs.manifest.graphs;
    match (&g.siglip, &g.transformer_omni) {
        (Some(vision), Some(_)) => Some(EditGraphs {
            vision: graphs.defer_with(GraphKind::VisionEncoder, vision, device, ExternalInitializers::default()),
        }),
        _ => None,
    }
}

/// The target of the span each concurrent loading job runs in (see [`run_jobs`]).
pub const LOAD_JOB_TARGET: &str = "zimage::load_job";

/// Runs the four loading jobs: with `parallel`, on as many threads as the machine has cores
/// (at most four; the calling thread is one of them), each thread taking the next job as it
/// finishes one, in the order d, c, b, a (the callers pass the slowest last); otherwise one
/// after the other in order a, b, c, d. Sessions are independent, and building one is mostly
/// single-threaded work (graph optimisation, weight prepacking), so with four cores a load
/// takes about as long as its slowest session. With fewer cores, more threads than cores only
/// make the jobs compete for them (and for the kernel's page-fault work of their fresh memory):
/// on two cores, four threads loaded the mid-size int8 package in 0.84-0.94 s, two threads
/// pulling jobs in this order in less (docs/loading.md).
/// A job that panics panics here too, with its own payload.
pub(crate) fn run_jobs<A: Send, B: Send, C: Send, D: Send>(
    parallel: bool,
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
    c: impl FnOnce() -> C + Send,
    d: impl FnOnce() -> D + Send,
) -> (A, B, C, D) {
    if !parallel {
        return (a(), b(), c(), d());
    }
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get().clamp(1, 4));
    // One span, made on the calling thread and entered by each job's thread, so that a
    // `tracing` subscriber that routes events by the call they belong to (libzimage sends
    // ONNX Runtime's log lines to the log callback of the C call that caused them) sees the
    // jobs' events as the load call's. Disabled (free) when no subscriber asks for it.
    let span = tracing::info_span!(target: LOAD_JOB_TARGET, "load_job");
    let jobs = JobQueue {
        next: std::sync::atomic::AtomicUsize::new(0),
        a: Job::new(a),
        b: Job::new(b),
        c: Job::new(c),
        d: Job::new(d),
    };
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads)
            .map(|_| {
                let (span, jobs) = (span.clone(), &jobs);
                scope.spawn(move || span.in_scope(|| jobs.work()))
            })
            .collect();
        span.in_scope(|| jobs.work());
        for helper in helpers {
            joined(helper.join());
        }
    });
    (jobs.a.result(), jobs.b.result(), jobs.c.result(), jobs.d.result())
}

/// The four jobs of [`run_jobs`], taken in the order d, c, b, a by whichever thread is free.
struct JobQueue<FA, FB, FC, FD, A, B, C, D> {
    next: std::sync::atomic::AtomicUsize,
    a: Job<FA, A>,
    b: Job<FB, B>,
    c: Job<FC, C>,
    d: Job<FD, D>,
}

impl<FA, FB, FC, FD, A, B, C, D> JobQueue<FA, FB, FC, FD, A, B, C, D>
where
    FA: FnOnce() -> A,
    FB: FnOnce() -> B,
    FC: FnOnce() -> C,
    FD: FnOnce() -> D,
{
    fn work(&self) {
        loop {
            match self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) {
                0 => self.d.run(),
                1 => self.c.run(),
                2 => self.b.run(),
                3 => self.a.run(),
                _ => return,
            }
        }
    }
}

/// A job and, once run, its result (or its panic, resumed by `result`).
struct Job<F, T> {
    state: std::sync::Mutex<JobState<F, T>>,
}

enum JobState<F, T> {
    Waiting(F),
    Running,
    Done(std::thread::Result<T>),
}

impl<F: FnOnce() -> T, T> Job<F, T> {
    fn new(job: F) -> Self {
        Job { state: std::sync::Mutex::new(JobState::Waiting(job)) }
    }

    fn run(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let JobState::Waiting(job) = std::mem::replace(&mut *state, JobState::Running) {
            drop(state);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            *self.state.lock().unwrap_or_else(|p| p.into_inner()) = JobState::Done(result);
        }
    }

    fn result(self) -> T {
        match self.state.into_inner().unwrap_or_else(|p| p.into_inner()) {
            JobState::Done(result) => joined(result),
            JobState::Waiting(_) | JobState::Running => unreachable!("every job runs before run_jobs returns"),
        }
    }
}

/// A job's result, or its panic resumed on this thread.
fn joined<T>(result: std::thread::Result<T>) -> T {
    result.unwrap_or_else(|payload| std::panic::resume_unwind(payload))
}

/// Whether a pipeline's sessions are built concurrently: not in sequential mode (it promises
/// one model in memory at a time, also while loading) and not when TensorRT builds engines
/// (each build takes GPU workspace and all of the GPU's time).
pub(crate) fn load_in_parallel(options: &LoadOptions, uses_tensorrt: bool) -> bool {
    options.memory_mode == MemoryMode::Resident && !uses_tensorrt
}

#[cfg(test)]
mod tests {
    use super::run_jobs;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[test]
    fn every_job_runs_once_and_its_result_comes_back_in_its_place() {
        for parallel in [false, true] {
            let runs = AtomicUsize::new(0);
            let order = Mutex::new(Vec::new());
            let job = |name: &'static str, value: u32| {
                let (runs, order) = (&runs, &order);
                move || {
                    runs.fetch_add(1, Ordering::SeqCst);
                    order.lock().unwrap().push(name);
                    value
                }
            };
            let (a, b, c, d) = run_jobs(parallel, job("a", 1), job("b", 2), job("c", 3), job("d", 4));
            assert_eq!((a, b, c, d), (1, 2, 3, 4));
            assert_eq!(runs.load(Ordering::SeqCst), 4);
            if !parallel {
                assert_eq!(*order.lock().unwrap(), ["a", "b", "c", "d"]);
            }
        }
    }

    #[test]
    fn results_of_different_types_and_a_panic_keeps_its_payload() {
        let (text, number, list, unit) = run_jobs(true, || "text".to_string(), || 7u64, || vec![1u8, 2], || ());
        assert_eq!((text.as_str(), number, list, unit), ("text", 7, vec![1, 2], ()));
        let ran_others = AtomicUsize::new(0);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_jobs(
                true,
                || ran_others.fetch_add(1, Ordering::SeqCst),
                || -> u32 { panic!("job b failed") },
                || ran_others.fetch_add(1, Ordering::SeqCst),
                || ran_others.fetch_add(1, Ordering::SeqCst),
            )
        }));
        let payload = caught.expect_err("the panic reaches the caller");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"job b failed"));
        // The other jobs still ran to the end (their sessions are dropped, not left half-made).
        assert_eq!(ran_others.load(Ordering::SeqCst), 3);
    }
}
