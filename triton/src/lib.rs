//! # zimage-triton
//!
//! zimage as an NVIDIA Triton Inference Server backend: `libtriton_zimage.so`, which Triton
//! loads from `<backend-directory>/zimage/`. Each model instance holds one [`zimage::Pipeline`]
//! on the instance's device (`KIND_CPU`, or `KIND_GPU` with the `device` parameter `cuda` or
//! `tensorrt`). Requests are run one by one: the SDK batches the COUNT images of one prompt,
//! not different prompts, so the model is configured with `max_batch_size: 0`.
//!
//! - [`api`]: the Triton C API subset, looked up in the server process at initialisation;
//! - [`interface`]: the model's input and output tensors;
//! - [`config`]: the model configuration's checks and `parameters`;
//! - [`request`]: input tensors → [`zimage::GenerateRequest`], images → the IMAGE output;
//! - [`repository`]: the model repository `zimage triton-repo` writes;
//! - `backend`: the exported `TRITONBACKEND_*` functions.

pub mod api;
mod backend;
pub mod config;
pub mod interface;
pub mod repository;
pub mod request;

pub use backend::REQUESTS_METRIC;
