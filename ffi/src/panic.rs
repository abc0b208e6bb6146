//! The boundary every entry point runs inside. A panic must not unwind into C (that aborts the
//! host), so it is caught here and becomes `ZIMAGE_RESULT_INTERNAL`.
//!
//! Plain functions rather than a macro around the whole `extern "C" fn`: signatures stay
//! ordinary Rust, which cbindgen reads directly.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{clear_last_error, record, zimage_result, Failure};

/// Runs an entry point that returns a result code: clears the last error, runs `body`, and
/// records its failure or panic. A success clears it again: the caller's callbacks (progress,
/// log) may have made failing zimage calls meanwhile, and the header promises an empty
/// message after a successful call.
pub(crate) fn guard(body: impl FnOnce() -> Result<(), Failure>) -> zimage_result {
    // AssertUnwindSafe: after a panic nothing observes the half-updated state except through
    // the handles the caller already holds, and the SDK keeps those consistent (its locks
    // recover from poisoning). The clearing is inside too: nothing may panic outside the catch.
    let run = || {
        clear_last_error();
        body()
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok(())) => {
            clear_last_error();
            zimage_result::Ok
        }
        Ok(Err(failure)) => record(failure),
        Err(payload) => {
            record(Failure::new(zimage_result::Internal, format!("zimage panicked: {}", panic_message(&*payload))))
        }
    }
}

/// Runs an entry point that returns a plain value (a count, a seed); a panic gives `fallback`.
/// It leaves the last error alone: these functions do not return a code.
pub(crate) fn guard_value<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn panic_becomes_internal_error() {
        let code = guard(|| panic!("boom {}", 7));
        assert_eq!(code, zimage_result::Internal);
        let message = unsafe { CStr::from_ptr(crate::error::zimage_last_error_message()) };
        assert_eq!(message.to_str().unwrap(), "zimage panicked: boom 7");
        assert_eq!(guard(|| Ok(())), zimage_result::Ok);
        assert_eq!(unsafe { CStr::from_ptr(crate::error::zimage_last_error_message()) }.to_bytes(), b"");
        assert_eq!(guard_value(5usize, || panic!("boom")), 5);
        // A failing call made inside a successful one (from a progress callback) leaves no
        // message behind it.
        let outer = guard(|| {
            assert_eq!(
                guard(|| Err(Failure::new(zimage_result::NullArgument, "params is NULL"))),
                zimage_result::NullArgument
            );
            Ok(())
        });
        assert_eq!(outer, zimage_result::Ok);
        assert_eq!(unsafe { CStr::from_ptr(crate::error::zimage_last_error_message()) }.to_bytes(), b"");
    }
}
