//! # zimage C ABI
//!
//! `libzimage.so` / `libzimage.a` and `include/zimage.h` (generated from this crate by
//! cbindgen). The layer is thin on purpose: every entry point validates its arguments, converts
//! them to SDK types, calls the SDK and converts the result back. Anything that decides how an
//! image is made belongs in the SDK.
//!
//! One module per concern:
//! - [`error`]: the `zimage_result` codes and the thread-local last-error message;
//! - [`panic`]: the boundary every entry point runs inside (panics become a code);
//! - [`args`]: NULL, UTF-8 and `struct_size` checks on what C hands in;
//! - [`log`]: the per-pipeline log callback;
//! - [`params`]: load and generate parameter structs and their conversion to SDK requests;
//! - [`pipeline`]: load, generate, encode prompts, cancel;
//! - [`image`]: the library-owned list of generated images;
//! - [`prompt`]: the encode-once prompt embedding handle;
//! - [`enhancer`]: the prompt enhancer handle and its parameters.
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

mod args;
pub mod enhancer;
pub mod error;
pub mod image;
pub mod log;
mod panic;
pub mod params;
pub mod pipeline;
pub mod prompt;

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
