//! Checks on what C hands in: NULL pointers, UTF-8, versioned structs, sentinel values.

use std::ffi::{c_char, CStr};
use std::mem::size_of;

use crate::error::Failure;

/// `seed` value that asks for a random seed; the one used is reported by
/// `zimage_image_list_seed()` (or `zimage_enhance()`'s `out_seed`).
pub const ZIMAGE_RANDOM_SEED: u64 = u64::MAX;

/// `ptr` as a reference, or `NullArgument` naming `what`.
///
/// Safety: a non-NULL `ptr` must point to a valid `T` for `'a`.
pub(crate) unsafe fn reference<'a, T>(ptr: *const T, what: &str) -> Result<&'a T, Failure> {
    unsafe { ptr.as_ref() }.ok_or_else(|| Failure::null(what))
}

/// A NUL-terminated UTF-8 string; NULL gives `NullArgument`, other encodings `InvalidArgument`.
///
/// Safety: a non-NULL `ptr` must point to a NUL-terminated string valid for `'a`.
pub(crate) unsafe fn string<'a>(ptr: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if ptr.is_null() {
        return Err(Failure::null(what));
    }
    unsafe { CStr::from_ptr(ptr) }.to_str().map_err(|e| Failure::invalid(format!("{what} is not valid UTF-8 ({e})")))
}

/// Like [`string`], with NULL meaning "not given".
pub(crate) unsafe fn optional_string<'a>(ptr: *const c_char, what: &str) -> Result<Option<&'a str>, Failure> {
    if ptr.is_null() {
        Ok(None)
    } else {
        unsafe { string(ptr, what) }.map(Some)
    }
}

/// Checks an output argument before any work is done, so a NULL is reported up front rather
/// than after a long generation.
pub(crate) fn output<T>(ptr: *mut *mut T, what: &str) -> Result<*mut *mut T, Failure> {
    if ptr.is_null() {
        Err(Failure::null(what))
    } else {
        Ok(ptr)
    }
}

/// A parameter struct whose first field is `size_t struct_size`, so that it can grow: fields are
/// only ever appended, and a caller compiled against an older header passes its smaller size.
///
/// Safety (for implementors): `Self` is `repr(C)`, `Copy`, starts with a `usize`, and any
/// bit pattern C can put in its fields is valid.
pub(crate) unsafe trait Versioned: Copy {
    /// The size of the first published version of the struct (up to its last field).
    const FIRST_VERSION_SIZE: usize;
    /// The values of fields the caller does not know about: what `*_init` writes.
    fn defaults() -> Self;
}

/// Reads a versioned struct: the caller's `struct_size` bytes over the defaults. A size below
/// the first version means the struct was not initialised; one above ours means the header is
/// newer than this library.
///
/// Safety: a non-NULL `ptr` must point to at least `struct_size` readable bytes.
pub(crate) unsafe fn versioned<T: Versioned>(ptr: *const T, what: &str) -> Result<T, Failure> {
    if ptr.is_null() {
        return Err(Failure::null(what));
    }
    // Only the first field is read until the size is known to be in range.
    let size = unsafe { ptr.cast::<usize>().read() };
    if size < T::FIRST_VERSION_SIZE || size > size_of::<T>() {
        return Err(Failure::invalid(format!(
            "{what}->struct_size is {size}; expected {} (call the matching *_init function first, \
             and use a header no newer than this library, zimage {})",
            size_of::<T>(),
            sdk::VERSION
        )));
    }
    let mut value = T::defaults();
    unsafe { std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), (&mut value as *mut T).cast::<u8>(), size) };
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::zimage_result;

    #[test]
    fn strings() {
        assert_eq!(unsafe { string(c"fox".as_ptr(), "prompt") }.unwrap(), "fox");
        let null = unsafe { string(std::ptr::null(), "prompt") }.unwrap_err();
        assert_eq!((null.code, null.message.as_str()), (zimage_result::NullArgument, "prompt is NULL"));
        let latin1 = [b'f', 0xe9, 0];
        let bad = unsafe { string(latin1.as_ptr().cast(), "prompt") }.unwrap_err();
        assert_eq!(bad.code, zimage_result::InvalidArgument);
        assert_eq!(unsafe { optional_string(std::ptr::null(), "x") }.unwrap(), None);
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq)]
    struct Grown {
        struct_size: usize,
        old: u32,
        new: u32,
    }

    unsafe impl Versioned for Grown {
        const FIRST_VERSION_SIZE: usize = std::mem::offset_of!(Grown, old) + size_of::<u32>();
        fn defaults() -> Self {
            Grown { struct_size: size_of::<Grown>(), old: 1, new: 2 }
        }
    }

    #[test]
    fn older_callers_get_defaults_for_new_fields() {
        let old_caller = Grown { struct_size: Grown::FIRST_VERSION_SIZE, old: 10, new: 99 };
        let read = unsafe { versioned(&old_caller, "p") }.unwrap();
        assert_eq!((read.old, read.new), (10, 2));
        let current = Grown { struct_size: size_of::<Grown>(), old: 10, new: 20 };
        assert_eq!(unsafe { versioned(&current, "p") }.unwrap().new, 20);
        for size in [0, Grown::FIRST_VERSION_SIZE - 1, size_of::<Grown>() + 1] {
            let wrong = Grown { struct_size: size, ..current };
            assert_eq!(unsafe { versioned(&wrong, "p") }.unwrap_err().code, zimage_result::InvalidArgument);
        }
    }
}
