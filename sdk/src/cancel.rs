//! Stopping a generation: from its own progress callback, or from any thread through a
//! [`CancelHandle`], which also interrupts the ONNX Runtime call in flight.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use ort::session::RunOptions;

use crate::error::{Error, Result};

/// Per-generation state: the run options that ONNX Runtime polls, and a flag.
pub(crate) struct RunControl {
    options: RunOptions,
    /// The same, but asking ONNX Runtime to give its CPU arena back after the run: for a
    /// graph's last call in a generation, so the transformer's activations are not still held
    /// while the VAE decodes.
    releasing_options: RunOptions,
    cancelled: AtomicBool,
}

impl RunControl {
    pub fn run_options(&self, release_arena: bool) -> &RunOptions {
        if release_arena {
            &self.releasing_options
        } else {
            &self.options
        }
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        let _ = self.options.terminate();
        let _ = self.releasing_options.terminate();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// The generations currently running on one pipeline.
#[derive(Default)]
pub(crate) struct Registry {
    active: Mutex<Vec<Weak<RunControl>>>,
}

impl Registry {
    /// Starts tracking a new generation; it stops being tracked when the returned Arc drops.
    pub fn begin(&self) -> Result<Arc<RunControl>> {
        let fail = |e: ort::Error| Error::Runtime(format!("run options: {e}"));
        let options = RunOptions::new().map_err(fail)?;
        let mut releasing_options = RunOptions::new().map_err(fail)?;
        releasing_options.set("memory.enable_memory_arena_shrinkage", "cpu:0").map_err(fail)?;
        let control = Arc::new(RunControl { options, releasing_options, cancelled: AtomicBool::new(false) });
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        active.retain(|w| w.strong_count() > 0);
        active.push(Arc::downgrade(&control));
        Ok(control)
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
