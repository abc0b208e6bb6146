//! Result codes and the thread-local last-error message.
//!
//! Callers branch on the code; the message is for people. Numbers are part of the ABI: they are
//! never reused or renumbered, and new codes are appended.

use std::cell::RefCell;
use std::ffi::{c_char, CString};

use sdk::ErrorKind;

/// What a zimage call returned. Every function that can fail returns one of these; the detail
/// is in `zimage_last_error_message()`.
///
/// New codes may be added in later versions: treat an unknown code as a failure.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum zimage_result {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullArgument = 1,
    /// An argument is malformed: a string that is not UTF-8, an unknown enum value, a wrong
    /// `struct_size`, an image size or stride that does not add up, an index out of range.
    InvalidArgument = 2,
    /// The model package is missing, unreadable, of an unknown format or inconsistent.
    Package = 3,
    /// ONNX Runtime could not be found or loaded, or is the wrong version.
    Runtime = 4,
    /// An execution provider (CUDA, TensorRT) could not be set up.
    Provider = 5,
    /// The request is well-formed but not allowed (size, steps, guidance, counts ...).
    InvalidRequest = 6,
    /// An input image or mask is unusable.
    Image = 7,
    /// The run was stopped by the progress callback or by `zimage_cancel()`.
    Cancelled = 8,
    /// ONNX Runtime failed while running a graph, or produced non-finite values.
    Inference = 9,
    /// Reading or writing a file failed.
    Io = 10,
    /// A bug in zimage: a caught panic, or an SDK error this version of the C ABI cannot
    /// classify. The message says what; please report it.
    Internal = 11,
    /// A LoRA file is unreadable, malformed, or not for this model (the message names the first
    /// key that does not fit).
    Lora = 12,
}

impl zimage_result {
    fn description(self) -> &'static std::ffi::CStr {
        match self {
            zimage_result::Ok => c"ok",
            zimage_result::NullArgument => c"null argument",
            zimage_result::InvalidArgument => c"invalid argument",
            zimage_result::Package => c"model package error",
            zimage_result::Runtime => c"ONNX Runtime error",
            zimage_result::Provider => c"execution provider error",
            zimage_result::InvalidRequest => c"invalid request",
            zimage_result::Image => c"image error",
            zimage_result::Cancelled => c"cancelled",
            zimage_result::Inference => c"inference error",
            zimage_result::Io => c"I/O error",
            zimage_result::Internal => c"internal error",
            zimage_result::Lora => c"LoRA adapter error",
        }
    }
}

/// A failed call inside this crate: the code to return and the message to keep.
#[derive(Debug)]
pub(crate) struct Failure {
    pub code: zimage_result,
    pub message: String,
}

impl Failure {
    pub fn new(code: zimage_result, message: impl Into<String>) -> Self {
        Failure { code, message: message.into() }
    }

    pub fn null(argument: &str) -> Self {
        Failure::new(zimage_result::NullArgument, format!("{argument} is NULL"))
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Failure::new(zimage_result::InvalidArgument, message)
    }
}

impl From<sdk::Error> for Failure {
    fn from(e: sdk::Error) -> Self {
        let code = match e.kind() {
            ErrorKind::Package => zimage_result::Package,
            ErrorKind::Runtime => zimage_result::Runtime,
            ErrorKind::Provider => zimage_result::Provider,
            ErrorKind::InvalidRequest => zimage_result::InvalidRequest,
            ErrorKind::Image => zimage_result::Image,
            ErrorKind::Cancelled => zimage_result::Cancelled,
            ErrorKind::Inference => zimage_result::Inference,
            ErrorKind::Io => zimage_result::Io,
            ErrorKind::Lora => zimage_result::Lora,
            // ErrorKind is non_exhaustive: a kind added to the SDK but not yet given a code.
            _ => zimage_result::Internal,
        };
        Failure::new(code, e.to_string())
    }
}

thread_local! {
    /// The message of the last call on this thread that returned a `zimage_result`.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

// Every access goes through `try_with`: a zimage call can come from a thread whose thread-locals
// are being destroyed (a pthread_key destructor, a C++ thread_local's destructor), where `with`
// panics, and a panic there cannot be caught. Such a call still returns its code; only the
// message is lost.

/// Forgets the previous message: called when an entry point starts, so that a message never
/// outlives the call it describes.
pub(crate) fn clear_last_error() {
    let _ = LAST_ERROR.try_with(|m| *m.borrow_mut() = CString::default());
}

/// Keeps `failure`'s message for `zimage_last_error_message()` and returns its code.
pub(crate) fn record(failure: Failure) -> zimage_result {
    // A NUL inside a message (from a path, say) would cut it short in C; drop those bytes.
    let bytes: Vec<u8> = failure.message.into_bytes().into_iter().filter(|&b| b != 0).collect();
    let message = CString::new(bytes).expect("NUL bytes were removed");
    let _ = LAST_ERROR.try_with(|m| *m.borrow_mut() = message);
    failure.code
}

/// The message describing the most recent call on this thread that returned a
/// `zimage_result`: empty when that call succeeded. Never NULL.
///
/// The string belongs to zimage and stays valid until the next zimage call on the same thread;
/// copy it to keep it. Each thread has its own message, so threads never see each other's.
/// On a thread that is exiting (from a thread-local or pthread_key destructor) there is no
/// message to keep: it is then always empty.
#[no_mangle]
pub extern "C" fn zimage_last_error_message() -> *const c_char {
    // Borrowing the thread-local's buffer: it is only replaced by a later zimage call on this
    // thread, which is exactly the documented lifetime. Once the thread-local is destroyed, a
    // static empty string.
    LAST_ERROR.try_with(|m| m.borrow().as_ptr()).unwrap_or(c"".as_ptr())
}

/// A short, static, English name for a result code ("ok", "cancelled" ...); "unknown result
/// code" for numbers this version does not define. Never NULL, never freed.
#[no_mangle]
pub extern "C" fn zimage_result_string(result: u32) -> *const c_char {
    let name = all_results().iter().find(|r| **r as u32 == result).map_or(c"unknown result code", |r| r.description());
    name.as_ptr()
}

fn all_results() -> &'static [zimage_result] {
    use zimage_result::*;
    &[
        Ok,
        NullArgument,
        InvalidArgument,
        Package,
        Runtime,
        Provider,
        InvalidRequest,
        Image,
        Cancelled,
        Inference,
        Io,
        Internal,
        Lora,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last() -> String {
        unsafe { CStr::from_ptr(zimage_last_error_message()) }.to_str().unwrap().to_owned()
    }

    #[test]
    fn record_keeps_message_per_thread() {
        assert_eq!(record(Failure::invalid("bad\0 value")), zimage_result::InvalidArgument);
        assert_eq!(last(), "bad value");
        std::thread::spawn(|| assert_eq!(last(), "")).join().unwrap();
        clear_last_error();
        assert_eq!(last(), "");
    }

    /// A zimage call from a thread whose thread-locals are being destroyed (here from another
    /// thread-local's destructor; in C, a pthread_key destructor) returns its code, with an
    /// empty message, instead of aborting the process.
    #[test]
    fn calls_from_an_exiting_thread_return_their_code() {
        /// (LAST_ERROR already destroyed, the code, the message)
        static SEEN: std::sync::Mutex<Option<(bool, zimage_result, String)>> = std::sync::Mutex::new(None);
        struct CallsOnDrop;
        impl Drop for CallsOnDrop {
            fn drop(&mut self) {
                let destroyed = LAST_ERROR.try_with(|_| ()).is_err();
                let code = unsafe { crate::pipeline::zimage_cancel(std::ptr::null()) };
                *SEEN.lock().unwrap() = Some((destroyed, code, last()));
            }
        }
        thread_local! {
            static PROBE: CallsOnDrop = const { CallsOnDrop };
        }
        std::thread::spawn(|| {
            // Made before LAST_ERROR, so destroyed after it: thread-locals go in reverse order.
            PROBE.with(|_| {});
            assert_eq!(unsafe { crate::pipeline::zimage_cancel(std::ptr::null()) }, zimage_result::NullArgument);
            assert_eq!(last(), "pipeline is NULL");
        })
        .join()
        .unwrap();
        let seen = SEEN.lock().unwrap().take();
        assert_eq!(seen, Some((true, zimage_result::NullArgument, String::new())));
    }

    #[test]
    fn sdk_kinds_map_to_their_codes() {
        let cancelled: Failure = sdk::Error::Cancelled.into();
        assert_eq!(cancelled.code, zimage_result::Cancelled);
        let invalid: Failure = sdk::Error::InvalidRequest("steps".into()).into();
        assert_eq!(invalid.code, zimage_result::InvalidRequest);
        assert_eq!(invalid.message, "invalid request: steps");
    }

    #[test]
    fn result_strings() {
        let s = |r: u32| unsafe { CStr::from_ptr(zimage_result_string(r)) }.to_str().unwrap();
        assert_eq!(s(0), "ok");
        assert_eq!(s(8), "cancelled");
        assert_eq!(s(11), "internal error");
        assert_eq!(s(12), "LoRA adapter error");
        assert_eq!(s(13), "unknown result code");
        // Every code has a name, and the numbers are 0..n without gaps.
        for (i, r) in all_results().iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
