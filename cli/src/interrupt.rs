//! Ctrl-C: the first one cancels the running generation through the pipeline's cancel handle;
//! before there is one, or on a second press, the process ends at once.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use zimage::CancelHandle;

/// The pipeline whose runs the first Ctrl-C cancels (set once it is loaded).
static CANCEL: OnceLock<CancelHandle> = OnceLock::new();

pub fn set_cancel_handle(handle: CancelHandle) {
    let _ = CANCEL.set(handle);
}

/// First Ctrl-C: cancel the running generation, which then ends with the Cancelled error
/// (exit 130) after ONNX Runtime returns. Before the pipeline is loaded, or on a second
/// Ctrl-C, exit at once with the same code.
pub fn install_handler() {
    static PRESSES: AtomicU32 = AtomicU32::new(0);
    let installed = ctrlc::set_handler(|| match (CANCEL.get(), PRESSES.fetch_add(1, Ordering::SeqCst)) {
        (Some(handle), 0) => handle.cancel(),
        _ => exit_now(130),
    });
    // Without a handler Ctrl-C keeps its default effect (the process ends), which is still
    // correct, only less tidy.
    let _ = installed;
}

/// Ends the process from the Ctrl-C handler's thread while the main thread may be inside ONNX
/// Runtime (loading, or after a second Ctrl-C): `std::process::exit` would run ONNX Runtime's
/// C++ static destructors while that thread still uses them.
fn exit_now(code: i32) -> ! {
    #[cfg(unix)]
    // SAFETY: _exit ends the process at once; nothing after it runs.
    unsafe {
        libc::_exit(code)
    }
    #[cfg(not(unix))]
    std::process::exit(code)
}
