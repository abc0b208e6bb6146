//! The log callback of one pipeline. It is set in the load parameters, never globally, so two
//! pipelines in one process (two plugins in one engine) each get their own messages. ONNX
//! Runtime's own lines reach the same callback through `ort_log`.

use std::ffi::{c_char, c_void};

use crate::strings::c_string;

/// How important a log message is. Passed to the log callback as a `uint32_t`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum zimage_log_level {
    /// An operation failed; the same text is in `zimage_last_error_message()`. Also ONNX
    /// Runtime's own errors (messages starting with "onnxruntime: ").
    Error = 1,
    /// Something worked, but not as asked (e.g. a graph fell back to CPU, a prompt was
    /// truncated). Also ONNX Runtime's own warnings ("onnxruntime: ...").
    Warn = 2,
    /// Milestones: a package loaded, a generation finished.
    Info = 3,
    /// Details: the parameters of each request; ONNX Runtime's informational lines when the
    /// `ORT_LOG` environment variable asks for them (ffi/README.md, "Log messages").
    Debug = 4,
}

/// Receives the log messages of one pipeline. `level` is a `zimage_log_level`; `message` is
/// UTF-8, NUL-terminated and valid only during the call (copy it to keep it).
///
/// It is called on the thread that made the zimage call being logged; when one pipeline is
/// used from several threads, it can be called from several threads at once.
pub type zimage_log_callback = Option<unsafe extern "C" fn(level: u32, message: *const c_char, user_data: *mut c_void)>;

/// A C log callback and its user data.
#[derive(Clone, Copy)]
pub(crate) struct Logger {
    callback: unsafe extern "C" fn(u32, *const c_char, *mut c_void),
    user_data: *mut c_void,
}

// The header makes the caller responsible for a callback (and user data) that can be called
// from whichever threads use the pipeline; zimage only passes the pointer back.
unsafe impl Send for Logger {}
unsafe impl Sync for Logger {}

impl Logger {
    pub fn new(callback: zimage_log_callback, user_data: *mut c_void) -> Option<Logger> {
        callback.map(|callback| Logger { callback, user_data })
    }

    pub fn log(&self, level: zimage_log_level, message: &str) {
        let message = c_string(message);
        unsafe { (self.callback)(level as u32, message.as_ptr(), self.user_data) };
    }
}

/// Logs through an optional logger, formatting only when there is one.
pub(crate) fn log(logger: Option<&Logger>, level: zimage_log_level, message: impl FnOnce() -> String) {
    if let Some(logger) = logger {
        logger.log(level, &message());
    }
}
