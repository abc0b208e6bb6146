//! Checks on what C hands in: NULL pointers, UTF-8, versioned structs, sentinel values.

use std::ffi::{c_char, CStr};
use std::mem::{align_of, size_of};

use crate::error::Failure;

/// `seed` value that asks for a random seed; the one used is reported by
/// `zimage_image_list_seed()` (or `zimage_enhance()`'s `out_seed`).
pub const ZIMAGE_RANDOM_SEED: u64 = u64::MAX;

/// A C `bool` coming in from C (a parameter struct's field, a callback's return value): one
/// byte, true when it is not 0. A Rust `bool` must be exactly 0 or 1, and C can put any byte
/// there (a struct filled with memset, a callback compiled without `_Bool`); reading that byte
/// as a Rust `bool` would be undefined behaviour. Named `bool` in the header (ffi/cbindgen.toml
/// renames it), which has the same size and calling convention on every platform zimage
/// supports, so C code sees no difference.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CBool(u8);

impl CBool {
    pub const FALSE: CBool = CBool(0);
    pub const TRUE: CBool = CBool(1);

    pub fn get(self) -> bool {
        self.0 != 0
    }
}

impl From<bool> for CBool {
    fn from(value: bool) -> Self {
        CBool(value as u8)
    }
}

impl std::fmt::Debug for CBool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

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
/// bit pattern C can put in its fields is valid: integers, floats, raw pointers, callbacks
/// (`Option<fn>`: NULL is `None`) and [`CBool`], never a Rust `bool` or enum.
pub(crate) unsafe trait Versioned: Copy {
    /// `sizeof` of the first published version of the struct: its last field's end rounded up
    /// to the struct's alignment, as C's `sizeof` is (checked when the struct is read).
    const FIRST_VERSION_SIZE: usize;
    /// The values of fields the caller does not know about: what `*_init` writes.
    fn defaults() -> Self;
}

/// Reads a versioned struct: the caller's `struct_size` bytes over the defaults. A size below
/// the first version means the struct was not initialised; one above ours means the header is
/// newer than this library.
///
/// The size must also be a multiple of the struct's alignment, as every `sizeof` is. A size
/// that ends inside a field would copy part of it over the default: half of a pointer makes a
/// wild one. No field is wider than the struct's alignment, so at a multiple of it every
/// field is copied whole or not at all, nested ones (`zimage_image`) included: a cut between
/// a nested struct's fields leaves defaults that are checked like any caller's value.
///
/// Safety: a non-NULL `ptr` must point to at least `struct_size` readable bytes.
pub(crate) unsafe fn versioned<T: Versioned>(ptr: *const T, what: &str) -> Result<T, Failure> {
    const { assert!(T::FIRST_VERSION_SIZE % align_of::<T>() == 0, "FIRST_VERSION_SIZE must be a sizeof") };
    if ptr.is_null() {
        return Err(Failure::null(what));
    }
    // Only the first field is read until the size is known to be in range.
    let size = unsafe { ptr.cast::<usize>().read() };
    if !is_a_size_of::<T>(size) {
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

/// Whether `size` is the `sizeof` of some version of `T`, up to this library's (see [`versioned`]).
fn is_a_size_of<T: Versioned>(size: usize) -> bool {
    (T::FIRST_VERSION_SIZE..=size_of::<T>()).contains(&size) && size.is_multiple_of(align_of::<T>())
}

/// What the `*_init_sized` functions do: writes the first `size` bytes of `value`, with
/// `struct_size = size`, to the caller's struct, whose `sizeof` is `size` (the header's init
/// macros pass it). A program built against an older header thus gets its own, smaller struct
/// filled, never bytes past its end. A `size` that is no version's `sizeof` is refused with
/// only `struct_size` written, to 0 ([`refuse_struct`]).
///
/// Safety: a non-NULL `ptr` must point to at least `size` writable bytes.
pub(crate) unsafe fn init_sized<T: Versioned>(ptr: *mut T, size: usize, mut value: T) -> Result<(), Failure> {
    if ptr.is_null() {
        return Err(Failure::null("params"));
    }
    if !is_a_size_of::<T>(size) {
        unsafe { refuse_struct(ptr, size) };
        return Err(Failure::invalid(format!(
            "size is {size}; expected sizeof of the struct, {} here (use a header no newer than this \
             library, zimage {})",
            size_of::<T>(),
            sdk::VERSION
        )));
    }
    // `struct_size` is the first field (the trait's contract).
    unsafe { (&mut value as *mut T).cast::<usize>().write(size) };
    unsafe { std::ptr::copy_nonoverlapping((&value as *const T).cast::<u8>(), ptr.cast::<u8>(), size) };
    Ok(())
}

/// What an `*_init*` function that fails leaves in the caller's struct: `struct_size = 0`, when
/// the `size` bytes the caller gave hold that first field, and nothing else. A caller that
/// ignores the result then passes a struct that every call refuses ("struct_size is 0"),
/// instead of one whose `struct_size` is whatever the memory held, which could read as valid.
///
/// Safety: a non-NULL `ptr` must point to at least `size` writable bytes.
pub(crate) unsafe fn refuse_struct<T>(ptr: *mut T, size: usize) {
    if !ptr.is_null() && size >= size_of::<usize>() {
        unsafe { ptr.cast::<usize>().write_unaligned(0) };
    }
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

    #[test]
    fn any_byte_is_a_c_bool() {
        // What memset or a byte-sized C type can leave in a `bool` field: anything but 0 is true.
        for (byte, expected) in [(0u8, false), (1, true), (2, true), (0x55, true), (0xff, true)] {
            let read: CBool = unsafe { std::mem::transmute(byte) };
            assert_eq!(read.get(), expected, "{byte:#x}");
        }
        assert_eq!((CBool::from(true), CBool::from(false)), (CBool::TRUE, CBool::FALSE));
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq)]
    struct Grown {
        struct_size: usize,
        old: u32,
        new: *const u8,
    }

    unsafe impl Versioned for Grown {
        // `old` ends at 12; C's sizeof of the first version rounds that up to 16.
        const FIRST_VERSION_SIZE: usize = std::mem::offset_of!(Grown, new);
        fn defaults() -> Self {
            Grown { struct_size: size_of::<Grown>(), old: 1, new: std::ptr::null() }
        }
    }

    #[test]
    fn older_callers_get_defaults_for_new_fields() {
        let byte = 7u8;
        let old_caller = Grown { struct_size: Grown::FIRST_VERSION_SIZE, old: 10, new: &byte };
        let read = unsafe { versioned(&old_caller, "p") }.unwrap();
        assert_eq!((read.old, read.new), (10, std::ptr::null()));
        let current = Grown { struct_size: size_of::<Grown>(), old: 10, new: &byte };
        assert_eq!(unsafe { versioned(&current, "p") }.unwrap().new, &byte as *const u8);
        // Too small, too large, and sizes that end inside `new` (which would copy half of the
        // pointer) or inside `old`.
        for size in [0, 12, Grown::FIRST_VERSION_SIZE + 4, Grown::FIRST_VERSION_SIZE + 1, size_of::<Grown>() + 8] {
            let wrong = Grown { struct_size: size, ..current };
            let failure = unsafe { versioned(&wrong, "p") }.unwrap_err();
            assert_eq!(failure.code, zimage_result::InvalidArgument);
            assert!(
                failure.message.starts_with(&format!("p->struct_size is {size}; expected 24")),
                "{}",
                failure.message
            );
        }
    }
}
