//! One ONNX Runtime session per graph, shared between threads, with run-time accounting and
//! cancellation.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ndarray::ArrayD;
use ort::session::{RunOptions, Session, SessionInputValue};

use crate::cancel::RunControl;
use crate::error::{Error, Result};
use crate::runtime::{build_session, Device, ProviderConfig, Runtime, SessionSettings};

pub(crate) struct Graph {
    pub name: &'static str,
    // `Session::run` takes `&mut self`: concurrent generations take turns per graph call.
    session: Mutex<Session>,
}

impl Graph {
    pub fn new(name: &'static str, session: Session) -> Self {
        Graph { name, session: Mutex::new(session) }
    }

    /// Runs the graph and copies out the named float outputs. The time spent inside ONNX
    /// Runtime is added to `ort_time`.
    pub fn run(
        &self,
        inputs: Vec<(&'static str, SessionInputValue<'_>)>,
        outputs: &[&str],
        control: &RunControl,
        ort_time: &mut Duration,
    ) -> Result<Vec<ArrayD<f32>>> {
        self.run_with(inputs, outputs, control, ort_time, false)
    }

    /// [`Graph::run`], optionally releasing the CPU arena afterwards (a graph's last call).
    pub fn run_with(
        &self,
        inputs: Vec<(&'static str, SessionInputValue<'_>)>,
        outputs: &[&str],
        control: &RunControl,
        ort_time: &mut Duration,
        release_arena: bool,
    ) -> Result<Vec<ArrayD<f32>>> {
        control.check()?;
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let options: &RunOptions = control.run_options(release_arena);
        let start = Instant::now();
        let inputs: Vec<(std::borrow::Cow<'_, str>, SessionInputValue<'_>)> =
            inputs.into_iter().map(|(n, v)| (std::borrow::Cow::Borrowed(n), v)).collect();
        let result = session.run_with_options(inputs, options);
        let result = match result {
            Ok(values) => outputs
                .iter()
                .map(|name| {
                    values[*name]
                        .try_extract_array::<f32>()
                        .map(|view| view.to_owned())
                        .map_err(|e| Error::inference(self.name, format!("output {name}: {e}")))
                })
                .collect::<Result<Vec<_>>>(),
            Err(e) => Err(Error::inference(self.name, e)),
        };
        *ort_time += start.elapsed();
        // A run stopped by the terminate flag reports a generic failure: name it for what it is.
        if control.is_cancelled() {
            return Err(Error::Cancelled);
        }
        result
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

/// One graph of the package: a resident session, or what is needed to create one on demand.
pub(crate) struct GraphSlot {
    name: &'static str,
    path: PathBuf,
    provider: ProviderConfig,
    used_device: Device,
    settings: SessionSettings,
    runtime: &'static Runtime,
    resident: Option<Arc<Graph>>,
}

impl GraphSlot {
    /// Creates the session once (so a broken graph or an unavailable provider fails at load
    /// time) and keeps it unless the mode is sequential.
    pub fn load(
        runtime: &'static Runtime,
        name: &'static str,
        path: PathBuf,
        provider: ProviderConfig,
        settings: &SessionSettings,
        mode: MemoryMode,
    ) -> Result<GraphSlot> {
        let (session, used_device) = build_session(runtime, name, &path, &provider, settings)?;
        let graph = Arc::new(Graph::new(name, session));
        Ok(GraphSlot {
            name,
            path,
            provider,
            used_device,
            settings: settings.clone(),
            runtime,
            resident: (mode == MemoryMode::Resident).then_some(graph),
        })
    }

    /// The provider that runs this graph.
    pub fn device(&self) -> Device {
        self.used_device
    }

    /// The graph file the sessions are made from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The session for one stage; in sequential mode a fresh one, released when dropped.
    pub fn acquire(&self) -> Result<Arc<Graph>> {
        if let Some(graph) = &self.resident {
            return Ok(Arc::clone(graph));
        }
        let (session, _) = build_session(self.runtime, self.name, &self.path, &self.provider, &self.settings)?;
        Ok(Arc::new(Graph::new(self.name, session)))
    }
}
