//! A loaded graph: one ONNX Runtime session shared between threads, the one runner every
//! stage (and the enhancer's decoder) calls it through, and when its session exists.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use ndarray::ArrayD;
use ort::session::{IoBinding, Session, SessionInputValue, SessionOutputs};

use super::cuda_graph::CaptureTable;
use super::device::Device;
use super::library::Runtime;
use super::provider::ProviderConfig;
use super::run_context::RunContext;
use super::session::{build_session, SessionSettings};
use crate::error::{Error, Result};
use crate::package::graph::GraphKind;

/// Named inputs of one graph call.
pub(crate) type Inputs<'a> = Vec<(Cow<'a, str>, SessionInputValue<'a>)>;

pub(crate) struct Graph {
    pub kind: GraphKind,
    // `Session::run` takes `&mut self`: concurrent runs take turns per graph call.
    session: Mutex<Session>,
    /// The session was built for CUDA graph capture.
    capturing: bool,
    /// Buffers bound to this session's calls, kept per shape (and replayed under one capture
    /// each when `capturing`).
    captures: CaptureTable,
}

impl Graph {
    pub fn new(kind: GraphKind, session: Session) -> Self {
        Graph { kind, session: Mutex::new(session), capturing: false, captures: CaptureTable::default() }
    }

    fn capturing(mut self, on: bool) -> Self {
        self.capturing = on;
        self
    }

    /// Whether calls with a capture id are captured and replayed as CUDA graphs.
    pub fn is_capturing(&self) -> bool {
        self.capturing
    }

    /// The session's bound buffers per shape (see `runtime::cuda_graph`).
    pub fn captures(&self) -> &CaptureTable {
        &self.captures
    }

    /// Runs the graph and copies out the named float outputs. `release_arena` gives ONNX
    /// Runtime's CPU arena back after the call (a graph's last call in a run).
    pub fn run(
        &self,
        inputs: Inputs<'_>,
        outputs: &[&str],
        context: &RunContext,
        release_arena: bool,
    ) -> Result<Vec<ArrayD<f32>>> {
        self.run_then(inputs, context, release_arena, |values| {
            outputs
                .iter()
                .map(|name| {
                    let value = values.get(*name).ok_or_else(|| self.failed(format!("no output {name}")))?;
                    value
                        .try_extract_array::<f32>()
                        .map(|view| view.to_owned())
                        .map_err(|e| self.failed(format!("output {name}: {e}")).caused_by(e))
                })
                .collect()
        })
    }

    /// Runs the graph and hands its outputs to `take` while the session is still held: the one
    /// place that checks cancellation, times the call and names the graph in its errors.
    pub fn run_then<T>(
        &self,
        inputs: Inputs<'_>,
        context: &RunContext,
        release_arena: bool,
        take: impl FnOnce(SessionOutputs<'_>) -> Result<T>,
    ) -> Result<T> {
        context.check()?;
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let options = context.run_options(release_arena);
        let result = context.time_ort(|| session.run_with_options(inputs, options));
        // A run stopped by the terminate flag reports a generic failure: name it for what it is.
        if context.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let outputs = result.map_err(|e| Error::ort(self.kind.name(), e))?;
        let taken = take(outputs)?;
        Ok(taken)
    }

    /// Runs the graph on bound inputs and outputs (device-resident buffers; see
    /// `pipeline::device_loop`), with the same cancellation, timing and error naming as
    /// [`Graph::run_then`]. The outputs stay where they are bound.
    /// `capture`: the capture id to record or replay the call under (see `runtime::cuda_graph`);
    /// `None` runs it plainly.
    pub fn run_binding(
        &self,
        binding: &IoBinding,
        context: &RunContext,
        release_arena: bool,
        capture: Option<i32>,
    ) -> Result<()> {
        context.check()?;
        let replay = match capture.filter(|_| self.capturing) {
            Some(id) => Some(context.capture_options(id)?),
            None => None,
        };
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let options = replay.as_deref().unwrap_or_else(|| context.run_options(release_arena));
        let result = context.time_ort(|| session.run_binding_with_options(binding, options).map(drop));
        if context.is_cancelled() {
            return Err(Error::Cancelled);
        }
        result.map_err(|e| Error::ort(self.kind.name(), e))
    }

    /// Hands the session to `f` (to create bindings and allocators on it) while holding it.
    pub fn with_session<T>(&self, f: impl FnOnce(&mut Session) -> T) -> T {
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut session)
    }

    /// An inference error of this graph.
    pub fn failed(&self, message: impl std::fmt::Display) -> Error {
        Error::inference(self.kind.name(), message)
    }
}

/// When the sessions of a pipeline exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryMode {
    /// Every graph is loaded once and stays loaded: fastest.
    #[default]
    Resident,
    /// Each graph is loaded when its stage starts and released when it ends (text encoder,
    /// then transformer, then VAE), so only one model is in memory at a time: what lets an
    /// fp16 package fit a 16 GB GPU. Costs a session creation per stage per generation.
    Sequential,
}

/// One graph of a package: a resident session, or what is needed to create one on demand.
pub(crate) struct GraphSlot {
    kind: GraphKind,
    path: PathBuf,
    provider: ProviderConfig,
    used_device: Device,
    fallback_reason: Option<String>,
    /// Why the transformer's calls are not captured as CUDA graphs (`None`: they are).
    capture_refusal: Option<String>,
    settings: SessionSettings,
    runtime: &'static Runtime,
    resident: Option<Arc<Graph>>,
    /// Set by [`GraphSlot::release`]: the slot gave up its session and weights and serves none.
    released: bool,
    /// Set for a slot made by [`GraphSlot::deferred`]: its session is created on first use.
    deferred: Option<Deferred>,
}

/// The state of a slot whose session is created on first use (a graph only some requests
/// need, such as the VAE encoder: a text-to-image pipeline never pays for it).
struct Deferred {
    /// Keep the session once made (resident mode); sequential mode makes one per stage.
    keep: bool,
    /// Held while the first session is made, so that concurrent first uses make one.
    building: Mutex<()>,
    built: OnceLock<Built>,
}

/// A deferred slot's session, with the provider that ended up running it.
struct Built {
    graph: Arc<Graph>,
    device: Device,
    fallback_reason: Option<String>,
}

impl GraphSlot {
    /// Creates the session once (so a broken graph or an unavailable provider fails at load
    /// time) and keeps it unless the mode is sequential.
    pub fn load(
        runtime: &'static Runtime,
        kind: GraphKind,
        path: PathBuf,
        provider: ProviderConfig,
        settings: &SessionSettings,
        mode: MemoryMode,
    ) -> Result<GraphSlot> {
        let started = std::time::Instant::now();
        let built = build_session(runtime, kind, &path, &provider, settings)?;
        tracing::debug!(graph = kind.name(), seconds = started.elapsed().as_secs_f64(), "session created");
        // Later sessions (sequential mode) go straight to the provider that worked.
        let provider = match (&built.fallback_reason, &built.capture_refusal) {
            (Some(_), _) => ProviderConfig::Cpu,
            (None, Some(_)) => provider.with_capture(false),
            (None, None) => provider,
        };
        let graph = Arc::new(Graph::new(kind, built.session).capturing(provider.captures()));
        Ok(GraphSlot {
            kind,
            path,
            used_device: built.device,
            fallback_reason: built.fallback_reason,
            capture_refusal: built.capture_refusal.or_else(|| {
                (!provider.captures()).then(|| "CUDA graphs not used: the session was not built for capture".into())
            }),
            provider,
            settings: settings.clone(),
            runtime,
            resident: (mode == MemoryMode::Resident).then_some(graph),
            released: false,
            deferred: None,
        })
    }

    /// A slot that creates its session on first use ([`GraphSlot::acquire`]) instead of now:
    /// nothing is read or built at load, so a broken graph file or an unavailable provider is
    /// reported (with the same typed error) by the first stage that needs the graph. Until
    /// then [`GraphSlot::device`] is the requested device.
    pub fn deferred(
        runtime: &'static Runtime,
        kind: GraphKind,
        path: PathBuf,
        provider: ProviderConfig,
        settings: &SessionSettings,
        mode: MemoryMode,
    ) -> GraphSlot {
        GraphSlot {
            kind,
            path,
            used_device: provider.device(),
            fallback_reason: None,
            capture_refusal: (!provider.captures())
                .then(|| "CUDA graphs not used: the session was not built for capture".into()),
            provider,
            settings: settings.clone(),
            runtime,
            resident: None,
            released: false,
            deferred: Some(Deferred {
                keep: mode == MemoryMode::Resident,
                building: Mutex::new(()),
                built: OnceLock::new(),
            }),
        }
    }

    fn built(&self) -> Option<&Built> {
        self.deferred.as_ref().and_then(|d| d.built.get())
    }

    pub fn kind(&self) -> GraphKind {
        self.kind
    }

    /// The provider that runs this graph.
    pub fn device(&self) -> Device {
        self.built().map_or(self.used_device, |b| b.device)
    }

    /// Why this graph's calls are not captured as CUDA graphs; `None` when they are.
    pub fn capture_refusal(&self) -> Option<&str> {
        self.capture_refusal.as_deref()
    }

    /// Records why capture was not asked for (the conditions of `runtime::cuda_graph`).
    pub(crate) fn set_capture_refusal(&mut self, reason: Option<String>) {
        if reason.is_some() {
            self.capture_refusal = reason;
        }
    }

    /// The provider configuration sessions of this graph are built with.
    pub(crate) fn provider(&self) -> &ProviderConfig {
        &self.provider
    }

    /// Why the graph runs on the CPU instead of the requested provider, when it fell back.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.built().map_or(self.fallback_reason.as_deref(), |b| b.fallback_reason.as_deref())
    }

    /// The graph file the sessions are made from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The session for one stage; in sequential mode a fresh one, released when dropped.
    pub fn acquire(&self) -> Result<Arc<Graph>> {
        if self.released {
            return Err(Error::runtime(format!(
                "{}: no session: a weight change (LoRA switch) failed and the previous weights could not be restored; \
                 set the adapters again",
                self.kind
            )));
        }
        if let Some(graph) = &self.resident {
            return Ok(Arc::clone(graph));
        }
        if let Some(deferred) = self.deferred.as_ref().filter(|d| d.keep) {
            return self.acquire_deferred(deferred);
        }
        let built = build_session(self.runtime, self.kind, &self.path, &self.provider, &self.settings)?;
        let capturing = self.provider.captures() && built.capture_refusal.is_none();
        Ok(Arc::new(Graph::new(self.kind, built.session).capturing(capturing)))
    }

    /// A deferred resident slot's session, made by the first call (later and concurrent
    /// calls get the same one; a failed first call leaves the slot to try again).
    fn acquire_deferred(&self, deferred: &Deferred) -> Result<Arc<Graph>> {
        if let Some(built) = deferred.built.get() {
            return Ok(Arc::clone(&built.graph));
        }
        let _building = deferred.building.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(built) = deferred.built.get() {
            return Ok(Arc::clone(&built.graph));
        }
        let started = std::time::Instant::now();
        let made = build_session(self.runtime, self.kind, &self.path, &self.provider, &self.settings)?;
        tracing::debug!(
            graph = self.kind.name(),
            seconds = started.elapsed().as_secs_f64(),
            "session created on first use"
        );
        let capturing = self.provider.captures() && made.capture_refusal.is_none();
        let graph = Arc::new(Graph::new(self.kind, made.session).capturing(capturing));
        let built = Built { graph: Arc::clone(&graph), device: made.device, fallback_reason: made.fallback_reason };
        // Only this thread sets it (under `building`), so it cannot be set already.
        let _ = deferred.built.set(built);
        Ok(graph)
    }

    /// Drops the slot's own session and replaced weights (a caller still holding the
    /// [`Graph`] keeps its session until it lets go), so that a replacement can be built
    /// without two sets in memory. The slot serves nothing afterwards.
    pub fn release(&mut self) {
        self.resident = None;
        self.deferred = None;
        self.settings.initializers = Default::default();
        self.released = true;
    }
}
