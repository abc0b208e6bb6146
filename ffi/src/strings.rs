//! Text going out to C: NUL-terminated copies, and the one function that frees the strings
//! zimage hands over.

use std::ffi::{c_char, CString};

use crate::panic::guard_value;

/// A C copy of `s`; NUL bytes (which C cannot carry) are dropped.
pub(crate) fn c_string(s: &str) -> CString {
    let bytes: Vec<u8> = s.bytes().filter(|&b| b != 0).collect();
    CString::new(bytes).expect("NUL bytes were removed")
}

/// Frees a string zimage returned (`zimage_enhance()`'s `out_text`). NULL is fine; freeing
/// twice is not, nor freeing strings zimage only lends (error messages, accessors of a list).
/// The string must come back unmodified: its length is found again from its NUL, so writing
/// another NUL into it (or over its end) frees the wrong size.
#[no_mangle]
pub unsafe extern "C" fn zimage_string_free(text: *mut c_char) {
    guard_value((), || {
        if !text.is_null() {
            drop(unsafe { CString::from_raw(text) });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip() {
        let s = c_string("a\0b").into_raw();
        assert_eq!(unsafe { std::ffi::CStr::from_ptr(s) }.to_str().unwrap(), "ab");
        unsafe { zimage_string_free(s) };
        unsafe { zimage_string_free(std::ptr::null_mut()) };
    }
}
