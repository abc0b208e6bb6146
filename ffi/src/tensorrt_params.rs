//! TensorRT settings: `zimage_tensorrt_params`, an optional sub-struct of the load parameters
//! with its own `struct_size`, and its conversion to the SDK's `TensorRtOptions`.

use std::ffi::c_char;
use std::mem::{offset_of, size_of};
use std::path::PathBuf;

use sdk::{ResolutionRange, TensorRtOptions, TensorRtPrecision};

use crate::args::{self, CBool, Versioned};
use crate::c_enum::{c_enum, CEnum};
use crate::error::{zimage_result, Failure};
use crate::panic::guard;

/// Precision TensorRT may use inside its engines (inputs and outputs stay float32). Passed as a
/// `uint32_t` in `zimage_tensorrt_params`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum zimage_tensorrt_precision {
    /// The default: Z-Image is trained in bf16, and fp16 activations can overflow into NaN
    /// (black images). Needs an Ampere or newer GPU; use FP32 on older ones.
    Bf16 = 0,
    Fp16 = 1,
    Fp32 = 2,
}

c_enum!(zimage_tensorrt_precision <=> TensorRtPrecision { Bf16 <=> Bf16, Fp16 <=> Fp16, Fp32 <=> Fp32 });

/// How TensorRT builds its engines. Fill it with `zimage_tensorrt_params_init()`, change fields,
/// and point `zimage_load_params.tensorrt` at it (NULL there = these defaults). Read during the
/// load call only; ignored unless a graph runs on TensorRT.
///
/// The resolution range, `max_images`, `guidance` and `typical_caption_tokens` shape the engines'
/// optimisation profiles: they are checked when a graph runs on TensorRT
/// (`ZIMAGE_RESULT_INVALID_REQUEST` when out of range), and a request outside them is refused
/// rather than rebuilding engines.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct zimage_tensorrt_params {
    /// `sizeof(zimage_tensorrt_params)`, set by `zimage_tensorrt_params_init()`. Lets later
    /// versions append fields without breaking callers built against this header.
    pub struct_size: usize,
    /// Where TensorRT keeps engines and timing caches (UTF-8); NULL =
    /// `$XDG_CACHE_HOME/zimage/tensorrt` (or `~/.cache/zimage/tensorrt`). Copied during the call.
    pub cache_dir: *const c_char,
    /// A `zimage_tensorrt_precision`. Default: `ZIMAGE_TENSORRT_PRECISION_BF16`.
    pub precision: u32,
    /// Image sizes in pixels the engines serve: smallest, most common, largest (each side a
    /// multiple of 16; min <= opt <= max). Default: 512x512, 1024x1024, 1536x1536.
    pub min_width: u32,
    pub min_height: u32,
    pub opt_width: u32,
    pub opt_height: u32,
    pub max_width: u32,
    pub max_height: u32,
    /// Most images per request the engines are built for, 1..=64 (doubled under guidance).
    /// Default 1.
    pub max_images: u32,
    /// Whether requests will use classifier-free guidance (a batch of 2 per image). Default
    /// false.
    pub guidance: CBool,
    /// Caption tokens the profiles optimise for, 1..=the model's limit. Default 128.
    pub typical_caption_tokens: u32,
}

unsafe impl Versioned for zimage_tensorrt_params {
    const FIRST_VERSION_SIZE: usize = offset_of!(zimage_tensorrt_params, typical_caption_tokens) + size_of::<u32>();

    fn defaults() -> Self {
        // The SDK's defaults, so the C API cannot drift from them.
        let trt = TensorRtOptions::default();
        zimage_tensorrt_params {
            struct_size: size_of::<Self>(),
            cache_dir: std::ptr::null(),
            precision: zimage_tensorrt_precision::from(trt.precision).value(),
            min_width: trt.resolutions.min.0,
            min_height: trt.resolutions.min.1,
            opt_width: trt.resolutions.opt.0,
            opt_height: trt.resolutions.opt.1,
            max_width: trt.resolutions.max.0,
            max_height: trt.resolutions.max.1,
            max_images: trt.max_images,
            guidance: trt.guidance.into(),
            typical_caption_tokens: trt.typical_caption_tokens,
        }
    }
}

/// Fills `params` with the defaults (the SDK's: bf16, 512..1536 pixels a side, one image, no
/// guidance, 128 caption tokens) and sets `struct_size`.
///
/// Writes this library's whole struct. Kept for programs built against headers without the init
/// macros; the header's `zimage_tensorrt_params_init` macro calls
/// `zimage_tensorrt_params_init_sized()` instead.
#[no_mangle]
pub unsafe extern "C" fn zimage_tensorrt_params_init(params: *mut zimage_tensorrt_params) -> zimage_result {
    guard(|| unsafe {
        args::init_sized(params, size_of::<zimage_tensorrt_params>(), zimage_tensorrt_params::defaults())
    })
}

/// Like `zimage_tensorrt_params_init()`, but writes only the first `size` bytes, with
/// `struct_size = size`: `size` is the caller's `sizeof(zimage_tensorrt_params)`, which the
/// header's `zimage_tensorrt_params_init` macro passes, so a program built against an older,
/// smaller header gets its own struct filled. A `size` that is no version's `sizeof` (one from a
/// newer header included) is `ZIMAGE_RESULT_INVALID_ARGUMENT` and writes
/// only `struct_size`, to 0 (when `size` holds it), so that every call refuses the struct.
#[no_mangle]
pub unsafe extern "C" fn zimage_tensorrt_params_init_sized(
    params: *mut zimage_tensorrt_params,
    size: usize,
) -> zimage_result {
    guard(|| unsafe { args::init_sized(params, size, zimage_tensorrt_params::defaults()) })
}

/// Reads TensorRT parameters named `what` in messages; NULL means all defaults. Range checks
/// are the SDK's, at load (`ZIMAGE_RESULT_INVALID_REQUEST`).
pub(crate) unsafe fn tensorrt_options(
    params: *const zimage_tensorrt_params,
    what: &str,
) -> Result<TensorRtOptions, Failure> {
    let mut options = TensorRtOptions::default();
    if params.is_null() {
        return Ok(options);
    }
    let p = unsafe { args::versioned(params, what) }?;
    options.cache_dir =
        unsafe { args::optional_string(p.cache_dir, &format!("{what}->cache_dir")) }?.map(PathBuf::from);
    options.precision = zimage_tensorrt_precision::from_c(p.precision, &format!("{what}->precision"))?.into();
    options.resolutions = ResolutionRange {
        min: (p.min_width, p.min_height),
        opt: (p.opt_width, p.opt_height),
        max: (p.max_width, p.max_height),
    };
    options.max_images = p.max_images;
    options.guidance = p.guidance.get();
    options.typical_caption_tokens = p.typical_caption_tokens;
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_sdks() {
        let mut p = std::mem::MaybeUninit::<zimage_tensorrt_params>::uninit();
        assert_eq!(unsafe { zimage_tensorrt_params_init(p.as_mut_ptr()) }, zimage_result::Ok);
        let p = unsafe { p.assume_init() };
        assert_eq!(p.struct_size, size_of::<zimage_tensorrt_params>());
        assert_eq!(p.precision, zimage_tensorrt_precision::Bf16 as u32);
        assert_eq!((p.min_width, p.opt_height, p.max_width, p.max_images), (512, 1024, 1536, 1));
        assert_eq!((p.guidance, p.typical_caption_tokens), (CBool::FALSE, 128));
        assert_eq!(unsafe { tensorrt_options(&p, "t") }.unwrap(), TensorRtOptions::default());
        assert_eq!(unsafe { tensorrt_options(std::ptr::null(), "t") }.unwrap(), TensorRtOptions::default());
        assert_eq!(unsafe { zimage_tensorrt_params_init(std::ptr::null_mut()) }, zimage_result::NullArgument);
    }

    #[test]
    fn fields_reach_the_sdk_and_are_checked() {
        let mut p = zimage_tensorrt_params::defaults();
        p.cache_dir = c"/tmp/engines".as_ptr();
        p.precision = zimage_tensorrt_precision::Fp32 as u32;
        p.max_width = 2048;
        p.max_images = 4;
        p.guidance = CBool::TRUE;
        p.typical_caption_tokens = 64;
        let trt = unsafe { tensorrt_options(&p, "params->tensorrt") }.unwrap();
        assert_eq!(trt.cache_dir, Some(PathBuf::from("/tmp/engines")));
        assert_eq!(trt.precision, TensorRtPrecision::Fp32);
        assert_eq!((trt.resolutions.max, trt.max_images, trt.guidance), ((2048, 1536), 4, true));
        assert_eq!(trt.typical_caption_tokens, 64);
        p.precision = 3;
        let bad = unsafe { tensorrt_options(&p, "params->tensorrt") }.unwrap_err();
        assert_eq!(bad.code, zimage_result::InvalidArgument);
        assert_eq!(bad.message, "params->tensorrt->precision is 3, which is not a zimage_tensorrt_precision (0..=2)");
        p.precision = 0;
        p.cache_dir = c"\xff".as_ptr();
        assert_eq!(unsafe { tensorrt_options(&p, "t") }.unwrap_err().code, zimage_result::InvalidArgument);
        p.struct_size = 8;
        assert_eq!(unsafe { tensorrt_options(&p, "t") }.unwrap_err().code, zimage_result::InvalidArgument);
    }

    /// A later header may append fields; a caller built against this one passes its smaller
    /// size and gets the defaults for the rest. Simulated with a struct one field larger.
    #[test]
    fn a_smaller_struct_gets_defaults_for_the_rest() {
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Later {
            current: zimage_tensorrt_params,
            appended: u64,
        }
        unsafe impl Versioned for Later {
            const FIRST_VERSION_SIZE: usize = zimage_tensorrt_params::FIRST_VERSION_SIZE;
            fn defaults() -> Self {
                Later { current: zimage_tensorrt_params::defaults(), appended: 7 }
            }
        }
        let mut caller = zimage_tensorrt_params::defaults();
        caller.max_images = 3;
        // The caller's struct is all this library may read: copy it into a larger buffer whose
        // tail holds garbage, as memory after a C struct would.
        let mut buffer = Later { current: caller, appended: 99 };
        buffer.current.struct_size = size_of::<zimage_tensorrt_params>();
        let read = unsafe { args::versioned(&buffer, "t") }.unwrap();
        assert_eq!((read.current.max_images, read.appended), (3, 7));
    }
}
