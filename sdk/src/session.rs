//! One ONNX Runtime session per graph, shared between threads, with run-time accounting and
//! cancellation.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use ndarray::ArrayD;
use ort::session::{RunOptions, Session, SessionInputValue};

use crate::cancel::RunControl;
use crate::error::{Error, Result};
use crate::runtime::Device;

pub(crate) struct Graph {
    pub name: &'static str,
    pub device: Device,
    // `Session::run` takes `&mut self`: concurrent generations take turns per graph call.
    session: Mutex<Session>,
}

impl Graph {
    pub fn new(name: &'static str, session: Session, device: Device) -> Self {
        Graph { name, device, session: Mutex::new(session) }
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
        control.check()?;
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let options: &RunOptions = control.run_options();
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
