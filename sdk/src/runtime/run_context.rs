//! One run (a generation, an encoding, an enhancement): the run options ONNX Runtime polls,
//! cancellation from the run's own callback or from any thread through a [`CancelHandle`]
//! (which also interrupts the ONNX Runtime call in flight), and the time spent inside ONNX
//! Runtime. Every stage of a run takes the one `RunContext`.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ort::session::RunOptions;

use crate::error::{Error, Result};

/// The part of a run other threads can reach: its run options and its cancelled flag.
struct RunControl {
    options: RunOptions,
    /// The same, but asking ONNX Runtime to give its CPU arena back after the run: for a
    /// graph's last call in a generation, so the transformer's activations are not still held
    /// while the VAE decodes.
    releasing_options: RunOptions,
    cancelled: AtomicBool,
}

impl RunControl {
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        let _ = self.options.terminate();
        let _ = self.releasing_options.terminate();
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
        let options = RunOptions::new().map_err(fail)?;
        let mut releasing_options = RunOptions::new().map_err(fail)?;
        releasing_options.set("memory.enable_memory_arena_shrinkage", "cpu:0").map_err(fail)?;
        let control = Arc::new(RunControl { options, releasing_options, cancelled: AtomicBool::new(false) });
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
