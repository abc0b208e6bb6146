//! Everything about ONNX Runtime, and nothing about Z-Image:
//! - [`library`]: finding and loading the shared library (one environment per process);
//! - [`device`]: [`Device`], where a graph runs;
//! - [`cuda_graph`]: when the transformer's CUDA calls are captured and replayed;
//! - [`gpu`]: CUDA settings, TensorRT profiles and engine caches;
//! - [`int8_products`]: whether this CPU's uint8 x int8 products need the exact kernels;
//! - [`nchwc`]: the CPU provider's NCHWc block width (which prebuilt CPU layouts fit);
//! - `provider`: each graph's execution provider, registered on its session;
//! - [`session`]: building one session (options, CPU fallback, optimised-graph cache);
//! - [`session_count`]: how many sessions were created from each graph file (diagnostics);
//! - `graph`: a loaded graph shared between threads, resident or loaded per stage;
//! - [`run_context`]: one run's options, cancellation and time spent in ONNX Runtime.

pub mod cuda_graph;
pub mod device;
pub mod gpu;
pub(crate) mod graph;
pub mod int8_products;
pub mod library;
pub mod nchwc;
pub mod prepack_probe;
pub(crate) mod provider;
pub mod run_context;
pub mod session;
pub mod session_count;

pub use device::Device;
pub use library::{library_candidates, runtime, Runtime, ORT_VERSION};
