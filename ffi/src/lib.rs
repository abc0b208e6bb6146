//! # zimage C ABI
//!
//! `libzimage.so` / `libzimage.a` and `include/zimage.h` (generated from this crate by
//! cbindgen). The layer is thin on purpose: every entry point validates its arguments, converts
//! them to SDK types, calls the SDK and converts the result back. Anything that decides how an
//! image is made belongs in the SDK.
//!
//! One module per concern, in layers (each uses only those above it; `sdk/tests/module_graph.rs`
//! fails on an import cycle):
//! - [`error`]: the `zimage_result` codes and the thread-local last-error message;
//! - [`panic`]: the boundary every entry point runs inside (panics become a code);
//! - [`args`]: NULL, UTF-8 and `struct_size` checks on what C hands in;
//! - `c_enum`: the macro that checks C enum numbers and converts them to SDK enums and back;
//! - [`strings`]: text going out to C, and `zimage_string_free()`;
//! - [`log`]: the per-pipeline log callback;
//! - `ort_log`: ONNX Runtime's log lines (`tracing` events) to the current call's log callback;
//! - [`tensorrt_params`]: the TensorRT sub-struct of the load parameters;
//! - [`load_params`]: the load parameter struct, device / memory mode / TF32 enums, and their
//!   conversion to `sdk::LoadOptions`;
//! - [`pipeline`]: the pipeline handle: load, cancel, free;
//! - [`prompt`]: the encode-once prompt embedding, a handle made against a pipeline;
//! - [`adapter`]: LoRA adapters, handles made against a pipeline, and setting them on it;
//! - [`enhancer`]: the prompt enhancer handle (standalone or attached to a pipeline) and its
//!   parameters;
//! - [`image`]: image views (`zimage_image`) and the library-owned list of generated images;
//! - [`generate_params`]: the generate parameter struct, input images, and the conversion to an
//!   `sdk::GenerateRequest`;
//! - [`generate`]: `zimage_generate()`, which brings a pipeline, its parameters and the handles
//!   they name together.
//!
//! Conventions, for readers of the header: outputs are the last arguments and are written only
//! on success; every `*_free` accepts NULL; strings are UTF-8 and NUL-terminated; enums coming
//! in from C are `uint32_t` and checked.

// The C names (`zimage_result`, `zimage_pipeline` ...) are the API; Rust naming would leak
// into the header.
#![allow(non_camel_case_types)]
// Every `extern "C"` function dereferences C pointers; the safety contract is the doc comment
// that goes into the header.
#![allow(clippy::missing_safety_doc)]

pub mod adapter;
mod args;
mod c_enum;
pub mod edit;
pub mod enhancer;
pub mod error;
pub mod generate;
pub mod generate_params;
pub mod image;
pub mod load_params;
pub mod log;
mod ort_log;
mod panic;
pub mod pipeline;
pub mod prompt;
pub mod strings;
pub mod tensorrt_params;

use std::ffi::{c_char, CStr};

/// The zimage version as "MAJOR.MINOR.PATCH", a static string (never freed).
#[no_mangle]
pub extern "C" fn zimage_version() -> *const c_char {
    // concat! adds the NUL that C needs; the string lives in the binary.
    const VERSION: &CStr = match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(v) => v,
        Err(_) => panic!("version contains NUL"),
    };
    // The FFI crate shares the workspace version with the SDK, so this is also sdk::VERSION.
    VERSION.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_matches_sdk() {
        let v = unsafe { CStr::from_ptr(zimage_version()) };
        assert_eq!(v.to_str().unwrap(), sdk::VERSION);
    }
}
