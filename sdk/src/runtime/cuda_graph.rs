//! CUDA graph capture of the transformer's denoising calls: when it is allowed, and the
//! buffers a capture is replayed with.
//!
//! ONNX Runtime's CUDA provider (`enable_cuda_graph`) records one call's kernel launches and
//! replays them on later calls, which removes the per-kernel launch cost (thousands of kernels
//! per step). A replay reads and writes the very addresses and shapes of the call it recorded,
//! so a capture is only correct when:
//! - every node of the graph runs on CUDA (ONNX Runtime refuses the session otherwise: the
//!   session is then rebuilt without capture and the refusal kept as the reason);
//! - the inputs and outputs are bound (IoBinding) to buffers that outlive the capture and are
//!   never reallocated: [`CaptureTable`] keeps one set per shape, reused by every generation of
//!   that shape, and hands it to one generation at a time;
//! - the shapes are the recorded ones: one capture (an annotation id) per shape key (batch
//!   layout, latent size, caption length); a call of any other shape, and every call outside the
//!   device loop, runs with id -1, which ONNX Runtime neither captures nor replays;
//! - the weights are the recorded ones: a LoRA switch builds a new session (with an empty
//!   table), and a session is never changed in place;
//! - the session lives across generations: not in the sequential memory mode, which builds the
//!   transformer's session per generation.

use std::any::Any;
use std::sync::Mutex;

use super::device::Device;
use crate::package::graph::GraphKind;

/// Whether the transformer's CUDA session replays its denoising calls as CUDA graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CudaGraphs {
    /// Capture where the conditions hold (see [`CaptureTable`]), plain calls elsewhere.
    #[default]
    Auto,
    Off,
}

/// Run-option value that makes ONNX Runtime neither capture nor replay a call.
pub(crate) const SKIP_CAPTURE: i32 = -1;
/// Most shapes captured per session: each capture keeps the memory of the call it recorded.
pub(crate) const MAX_CAPTURES: usize = 4;

/// Why the session of a graph of `kind` on `device` must not be built for capture, or `None`
/// when it may be (ONNX Runtime still decides at session creation whether every node runs on
/// CUDA).
pub(crate) fn session_refusal(
    setting: CudaGraphs,
    kind: GraphKind,
    device: Device,
    sequential_memory: bool,
) -> Option<String> {
    let reason = if setting == CudaGraphs::Off {
        "turned off (GpuOptions::cuda_graphs)"
    } else if kind != GraphKind::Transformer {
        "only the transformer's denoising calls repeat with fixed shapes"
    } else if !matches!(device, Device::Cuda { .. }) {
        match device {
            Device::Cpu => "the transformer runs on the CPU",
            _ => "the transformer runs on TensorRT, whose engines are not captured by zimage",
        }
    } else if sequential_memory {
        "the sequential memory mode builds the transformer's session per generation: a capture would never be replayed"
    } else {
        return None;
    };
    Some(format!("CUDA graphs not used: {reason}"))
}

/// Buffers kept for one shape key, and the annotation id its capture is replayed under.
struct Entry {
    key: Vec<usize>,
    id: i32,
    /// `None` while a generation uses them.
    buffers: Option<Box<dyn Any + Send>>,
}

/// The captures of one session: per shape key, an annotation id and the buffers its calls
/// are bound to.
#[derive(Default)]
pub(crate) struct CaptureTable {
    entries: Mutex<Vec<Entry>>,
}

/// What [`CaptureTable::checkout`] gives a generation.
pub(crate) struct Checkout {
    /// The annotation id to run with.
    pub id: i32,
    /// The buffers of an earlier generation of the same shape; `None` for a new shape (the
    /// caller allocates them and hands them back with [`CaptureTable::checkin`]).
    pub buffers: Option<Box<dyn Any + Send>>,
}

impl CaptureTable {
    /// Takes the buffers of `key` for one generation, or says why this generation cannot
    /// replay a capture (it then runs uncaptured on buffers of its own).
    pub fn checkout(&self, key: &[usize]) -> Result<Checkout, String> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = entries.iter_mut().find(|e| e.key == key) {
            return match entry.buffers.take() {
                Some(buffers) => Ok(Checkout { id: entry.id, buffers: Some(buffers) }),
                None => Err("CUDA graph not used: another generation of the same shape is replaying it".into()),
            };
        }
        if entries.len() >= MAX_CAPTURES {
            return Err(format!("CUDA graph not used: this session already holds {MAX_CAPTURES} captured shapes"));
        }
        // Annotation ids start at 1: 0 is ONNX Runtime's default id.
        let id = entries.len() as i32 + 1;
        entries.push(Entry { key: key.to_vec(), id, buffers: None });
        Ok(Checkout { id, buffers: None })
    }

    /// Returns the buffers of `key` after a generation (also a failed one: the buffers'
    /// contents do not matter, their addresses do).
    pub fn checkin(&self, key: &[usize], buffers: Box<dyn Any + Send>) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = entries.iter_mut().find(|e| e.key == key) {
            entry.buffers = Some(buffers);
        }
    }

    /// Shapes captured (or being captured) so far.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_captures_only_a_resident_cuda_transformer() {
        let cuda = Device::Cuda { device_id: 0 };
        let resident = false;
        assert_eq!(session_refusal(CudaGraphs::Auto, GraphKind::Transformer, cuda, resident), None);
        let refused = |setting, kind, device, mode| session_refusal(setting, kind, device, mode).expect("refused");
        assert!(refused(CudaGraphs::Off, GraphKind::Transformer, cuda, resident).contains("turned off"));
        assert!(refused(CudaGraphs::Auto, GraphKind::VaeDecoder, cuda, resident).contains("only the transformer"));
        assert!(refused(CudaGraphs::Auto, GraphKind::Transformer, Device::Cpu, resident).contains("CPU"));
        let trt = Device::TensorRt { device_id: 0 };
        assert!(refused(CudaGraphs::Auto, GraphKind::Transformer, trt, resident).contains("TensorRT"));
        assert!(refused(CudaGraphs::Auto, GraphKind::Transformer, cuda, true).contains("sequential"));
    }

    #[test]
    fn one_generation_at_a_time_per_shape_and_a_bounded_number_of_shapes() {
        let table = CaptureTable::default();
        let first = table.checkout(&[2, 16, 64, 64, 40]).unwrap();
        assert_eq!((first.id, first.buffers.is_none()), (1, true));
        // While the first generation holds them, the same shape runs uncaptured.
        let busy = table.checkout(&[2, 16, 64, 64, 40]).err().unwrap();
        assert!(busy.contains("another generation"), "{busy}");
        table.checkin(&[2, 16, 64, 64, 40], Box::new(7u32));
        // The next generation of that shape gets the same buffers and id back.
        let again = table.checkout(&[2, 16, 64, 64, 40]).unwrap();
        assert_eq!(again.id, 1);
        assert_eq!(*again.buffers.unwrap().downcast::<u32>().unwrap(), 7);
        // A different caption length is a different capture.
        assert_eq!(table.checkout(&[2, 16, 64, 64, 41]).unwrap().id, 2);
        assert_eq!(table.checkout(&[1, 16, 64, 64, 41]).unwrap().id, 3);
        assert_eq!(table.checkout(&[1, 16, 32, 32, 41]).unwrap().id, 4);
        let full = table.checkout(&[1, 16, 32, 32, 9]).err().unwrap();
        assert!(full.contains("already holds 4"), "{full}");
        assert_eq!(table.len(), MAX_CAPTURES);
        // Checking in an unknown key is ignored.
        table.checkin(&[9], Box::new(()));
        assert_eq!(table.len(), MAX_CAPTURES);
    }
}
