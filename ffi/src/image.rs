//! Images in memory: `zimage_image` (an RGB8 or mask view, in either direction) and the images
//! of one generation, owned by zimage until `zimage_image_list_free()`.

use std::ffi::{c_char, CString};

use crate::args;
use crate::error::{zimage_result, Failure};
use crate::panic::{guard, guard_value};
use crate::strings::c_string;

/// An 8-bit image in memory: rows top to bottom, `stride` bytes from one row to the next,
/// pixels packed within a row (RGB: 3 bytes per pixel, masks: 1 byte).
///
/// As an input (`init_image`, `mask`, `control_image`, edit references), the caller owns the
/// pixels and they only need to live during the call; `pixels == NULL` means "no image";
/// `stride == 0` means packed rows; at most 16384 x 16384 pixels (268435456), or the call fails
/// with `ZIMAGE_RESULT_INVALID_REQUEST` before reading them.
/// As an output (`zimage_image_list_get()`, previews), the pixels belong to zimage.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct zimage_image {
    pub pixels: *const u8,
    pub width: u32,
    pub height: u32,
    pub stride: usize,
}

impl zimage_image {
    pub(crate) const NONE: zimage_image = zimage_image { pixels: std::ptr::null(), width: 0, height: 0, stride: 0 };

    /// A view of an image zimage holds (packed RGB rows), valid while `image` is.
    pub(crate) fn of(image: &sdk::RgbImage) -> zimage_image {
        zimage_image {
            pixels: image.pixels.as_ptr(),
            width: image.width,
            height: image.height,
            stride: image.width as usize * 3,
        }
    }
}

/// The result of `zimage_generate()`: the images, the seed used and, when asked for, the final
/// latents. Immutable; readable from any thread. Freed with `zimage_image_list_free()`, which
/// also invalidates every pixel and latent pointer obtained from it.
pub struct zimage_image_list {
    images: Vec<sdk::RgbImage>,
    seed: u64,
    latents: Option<Latents>,
    enhanced_prompt: Option<CString>,
}

struct Latents {
    /// Row-major, in the order of `shape`.
    values: Vec<f32>,
    shape: [usize; 4],
}

impl zimage_image_list {
    pub(crate) fn new(generation: sdk::Generation) -> Self {
        let latents = generation.latents.map(|l| {
            let (n, c, h, w) = l.dim();
            // `iter` walks in logical (row-major) order whatever the array's memory layout.
            Latents { values: l.iter().copied().collect(), shape: [n, c, h, w] }
        });
        zimage_image_list {
            images: generation.images,
            seed: generation.seed,
            latents,
            enhanced_prompt: generation.enhanced_prompt.as_deref().map(c_string),
        }
    }
}

/// The final latents of a generation, `[batch, channels, height, width]`, row-major, before the
/// VAE's scaling. The values belong to the image list.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct zimage_latents {
    pub values: *const f32,
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

/// The number of images; 0 for NULL.
#[no_mangle]
pub unsafe extern "C" fn zimage_image_list_count(list: *const zimage_image_list) -> usize {
    guard_value(0, || unsafe { list.as_ref() }.map_or(0, |l| l.images.len()))
}

/// The seed the generation used (the one drawn when `ZIMAGE_RANDOM_SEED` was asked for);
/// 0 for NULL.
#[no_mangle]
pub unsafe extern "C" fn zimage_image_list_seed(list: *const zimage_image_list) -> u64 {
    guard_value(0, || unsafe { list.as_ref() }.map_or(0, |l| l.seed))
}

/// The prompt the images were made from when the generation's parameters named an
/// `enhancer` (UTF-8; owned by the list and valid until `zimage_image_list_free()`); NULL when
/// the prompt was not enhanced, and for NULL.
#[no_mangle]
pub unsafe extern "C" fn zimage_image_list_enhanced_prompt(list: *const zimage_image_list) -> *const c_char {
    guard_value(std::ptr::null(), || {
        unsafe { list.as_ref() }.and_then(|l| l.enhanced_prompt.as_ref()).map_or(std::ptr::null(), |p| p.as_ptr())
    })
}

/// Describes image `index` (RGB8, packed rows) in `*out_image`. The pixels belong to the list.
/// `ZIMAGE_RESULT_INVALID_ARGUMENT` when `index >= zimage_image_list_count(list)`.
#[no_mangle]
pub unsafe extern "C" fn zimage_image_list_get(
    list: *const zimage_image_list,
    index: usize,
    out_image: *mut zimage_image,
) -> zimage_result {
    guard(|| {
        let list = unsafe { args::reference(list, "list") }?;
        let out = unsafe { out_image.as_mut() }.ok_or_else(|| Failure::null("out_image"))?;
        let image = list.images.get(index).ok_or_else(|| {
            Failure::invalid(format!("image index {index} is out of range; the list holds {}", list.images.len()))
        })?;
        *out = zimage_image::of(image);
        Ok(())
    })
}

/// Describes the final latents in `*out_latents`. `ZIMAGE_RESULT_INVALID_ARGUMENT` when the
/// generation did not set `return_latents`.
#[no_mangle]
pub unsafe extern "C" fn zimage_image_list_latents(
    list: *const zimage_image_list,
    out_latents: *mut zimage_latents,
) -> zimage_result {
    guard(|| {
        let list = unsafe { args::reference(list, "list") }?;
        let out = unsafe { out_latents.as_mut() }.ok_or_else(|| Failure::null("out_latents"))?;
        let latents = list
            .latents
            .as_ref()
            .ok_or_else(|| Failure::invalid("this generation kept no latents (set return_latents)"))?;
        let [batch, channels, height, width] = latents.shape;
        *out = zimage_latents { values: latents.values.as_ptr(), batch, channels, height, width };
        Ok(())
    })
}

/// Frees the list and its pixels. NULL is fine; freeing twice is not.
#[no_mangle]
pub unsafe extern "C" fn zimage_image_list_free(list: *mut zimage_image_list) {
    guard_value((), || {
        if !list.is_null() {
            drop(unsafe { Box::from_raw(list) });
        }
    })
}
