//! One run (a generation, an encoding, an enhancement): the run options ONNX Runtime polls,
//! cancellation from the run's own callback or from any thread through a [`CancelHandle`]
//! (which also interrupts the ONNX Runtime call in flight), and the time spent inside ONNX
//! Runtime. Every stage of a run takes the one `RunContext`.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ort::session::RunOptions;

use super::cuda_graph::SKIP_CAPTURE;
use crate::error::{Error, Result};

/// ONNX Runtime's run option naming the CUDA graph a call is captured or replayed as.
const CAPTURE_ID: &str = "gpu_graph_id";

/// The part of a run other threads can reach: its run options and its cancelled flag.
struct RunControl {
    options: RunOptions,
    /// The same, but asking ONNX Runtime to give its CPU arena back after the run: for a
    /// graph's last call in a generation, so the transformer's activations are not still held
    /// while the VAE decodes.
    releasing_options: RunOptions,
    /// Options of calls recorded or replayed as CUDA graphs, one per capture id.
    capture_options: Mutex<Vec<(i32, Arc<RunOptions>)>>,
    cancelled: AtomicBool,
}

impl RunControl {
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        let _ = self.options.terminate();
        let _ = self.releasing_options.terminate();
        for (_, options) in self.capture_options.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = options.terminate();
        }
    }
}

/// The state of one run, passed to every stage. Not shared between threads: only its
/// cancellation is, through the registry.
pub(crate) struct RunContext {
    control: Arc<RunControl>,
    ort_time: Cell<Duration>,
}

impl RunContext {
    pub fn run_options(&self, release_arena: bool) -> &RunOptions {
        if release_arena {
            &self.control.releasing_options
        } else {
            &self.control.options
        }
    }

    /// The options of a call recorded or replayed as the CUDA graph `id` (see
    /// `runtime::cuda_graph`); the run's other calls are never captured.
    pub fn capture_options(&self, id: i32) -> Result<Arc<RunOptions>> {
        let mut all = self.control.capture_options.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, options)) = all.iter().find(|(i, _)| *i == id) {
            return Ok(Arc::clone(options));
        }
        let fail = |e: ort::Error| Error::runtime(format!("run options: {e}")).caused_by(e);
        let mut options = RunOptions::new().map_err(fail)?;
        options.set(CAPTURE_ID, id.to_string()).map_err(fail)?;
        if self.is_cancelled() {
            let _ = options.terminate();
        }
        let options = Arc::new(options);
        all.push((id, Arc::clone(&options)));
        Ok(options)
    }

    /// Stops this run: the ONNX Runtime call in flight ends and later stages refuse to start.
    pub fn cancel(&self) {
        self.control.cancel();
    }

    pub fn is_cancelled(&self) -> bool {
        self.control.cancelled.load(Ordering::SeqCst)
    }

    /// `Err(Cancelled)` once the run was cancelled.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Runs one ONNX Runtime call, adding its duration to the run's ONNX Runtime time.
    pub fn time_ort<T>(&self, call: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let result = call();
        self.ort_time.set(self.ort_time.get() + start.elapsed());
        result
    }

    /// Time spent inside ONNX Runtime calls so far.
    pub fn ort_time(&self) -> Duration {
        self.ort_time.get()
    }
}

/// The runs currently going on for one pipeline (or enhancer).
#[derive(Default)]
pub(crate) struct Registry {
    active: Mutex<Vec<Weak<RunControl>>>,
}

impl Registry {
    /// Starts tracking a new run; it stops being tracked when the returned context drops.
    pub fn begin(&self) -> Result<RunContext> {
        let fail = |e: ort::Error| Error::runtime(format!("run options: {e}")).caused_by(e);
        let mut options = RunOptions::new().map_err(fail)?;
        let mut releasing_options = RunOptions::new().map_err(fail)?;
        releasing_options.set("memory.enable_memory_arena_shrinkage", "cpu:0").map_err(fail)?;
        // Plain calls are never captured nor replayed, also on a session built for capture.
        let skip = SKIP_CAPTURE.to_string();
        options.set(CAPTURE_ID, &skip).map_err(fail)?;
        releasing_options.set(CAPTURE_ID, &skip).map_err(fail)?;
        let control = Arc::new(RunControl {
            options,
            releasing_options,
            capture_options: Mutex::new(Vec::new()),
            cancelled: AtomicBool::new(false),
        });
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        active.retain(|w| w.strong_count() > 0);
        active.push(Arc::downgrade(&control));
        Ok(RunContext { control, ort_time: Cell::new(Duration::ZERO) })
    }

    fn cancel_all(&self) {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        for control in active.iter().filter_map(Weak::upgrade) {
            control.cancel();
        }
    }
}

/// Cancels every generation running on a pipeline at the moment `cancel` is called; they
/// return [`Error::Cancelled`] and the pipeline stays usable. Cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct CancelHandle {
    pub(crate) registry: Arc<Registry>,
}

impl CancelHandle {
    pub fn cancel(&self) {
        self.registry.cancel_all();
    }
}
