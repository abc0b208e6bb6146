//! Editing (Z-Image Omni packages): `zimage_edit_params`, its `*_init` function and
//! `zimage_edit()`. Reference pictures are RGB8 views with a stride (`zimage_image`), copied
//! during the call. Fields are only ever appended (see `struct_size`).

use std::ffi::{c_char, c_void};
use std::mem::{offset_of, size_of};

use sdk::pipeline::edit::MAX_REFERENCE_PIXELS;
use sdk::{EditRequest, Progress, RgbImage};

use crate::args::{self, Versioned, ZIMAGE_RANDOM_SEED};
use crate::error::{zimage_result, Failure};
use crate::generate_params::{read_pixels, zimage_progress_callback};
use crate::image::{zimage_image, zimage_image_list};
use crate::log::{log, zimage_log_level};
use crate::panic::guard;
use crate::pipeline::zimage_pipeline;

/// `guidance_scale` / `cfg_truncation` value meaning "the package's default".
pub const ZIMAGE_EDIT_PACKAGE_DEFAULT: f32 = -1.0;

/// One edit. Fill it with `zimage_edit_params_init()` (the package's defaults: for
/// ZImageOmniPipeline 50 steps and guidance 5.0; the output takes the last reference's size;
/// a random seed), then set `prompt` and `images`. Pointers in it are borrowed for the duration
/// of `zimage_edit()` only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct zimage_edit_params {
    /// `sizeof(zimage_edit_params)`, set by `zimage_edit_params_init()`.
    pub struct_size: usize,
    /// The instruction, UTF-8 (may be empty, not NULL; at most 1 MiB).
    pub prompt: *const c_char,
    /// Used only with guidance; NULL means the empty prompt.
    pub negative_prompt: *const c_char,
    /// The reference pictures (RGB8 views, `stride == 0` for packed rows), in order:
    /// `image_count` of them, 0..=the package's maximum (8 for the exported Omni models). None
    /// (`image_count` 0, `images` may be NULL) is ZImageOmniPipeline's text-to-image.
    pub images: *const zimage_image,
    pub image_count: usize,
    /// Output size: both 0 (the default) = the last reference's size cropped to the package's
    /// size multiple (1024 x 1024 without references); otherwise both positive multiples of it.
    pub width: u32,
    pub height: u32,
    /// Denoising steps, 1..=1000; 0 (the default) = the package's.
    pub steps: u32,
    /// Guidance scale (0 = off); `ZIMAGE_EDIT_PACKAGE_DEFAULT` (the default) = the package's.
    pub guidance_scale: f32,
    /// 0 = off; otherwise the guided prediction's norm is capped at this factor times the
    /// conditional one's.
    pub cfg_normalization: f32,
    /// Guidance stops at steps whose normalised time exceeds this; `ZIMAGE_EDIT_PACKAGE_DEFAULT`
    /// (the default) = the package's (1.0 = never).
    pub cfg_truncation: f32,
    /// The noise seed; `ZIMAGE_RANDOM_SEED` (the default) draws one.
    pub seed: u64,
    /// Images generated, 1..=64.
    pub count: u32,
    /// Tokens kept per text segment; 0 = the package's default (512).
    pub max_sequence_length: u32,
    /// Keep the final latents, for `zimage_image_list_latents()`.
    pub return_latents: bool,
    /// Called after every denoising step; NULL for none.
    pub progress_callback: zimage_progress_callback,
    /// Passed back to `progress_callback` unchanged.
    pub progress_user_data: *mut c_void,
}

unsafe impl Versioned for zimage_edit_params {
    const FIRST_VERSION_SIZE: usize = offset_of!(zimage_edit_params, progress_user_data) + size_of::<*mut c_void>();

    fn defaults() -> Self {
        let sdk = EditRequest::new("", Vec::new());
        zimage_edit_params {
            struct_size: size_of::<Self>(),
            prompt: std::ptr::null(),
            negative_prompt: std::ptr::null(),
            images: std::ptr::null(),
            image_count: 0,
            width: 0,
            height: 0,
            steps: 0,
            guidance_scale: ZIMAGE_EDIT_PACKAGE_DEFAULT,
            cfg_normalization: sdk.cfg_normalization,
            cfg_truncation: ZIMAGE_EDIT_PACKAGE_DEFAULT,
            seed: ZIMAGE_RANDOM_SEED,
            count: sdk.count,
            max_sequence_length: 0,
            return_latents: false,
            progress_callback: None,
            progress_user_data: std::ptr::null_mut(),
        }
    }
}

/// Fills `params` with the defaults and sets `struct_size`; `prompt` and `images` are left NULL.
#[no_mangle]
pub unsafe extern "C" fn zimage_edit_params_init(params: *mut zimage_edit_params) -> zimage_result {
    guard(|| {
        let params = unsafe { params.as_mut() }.ok_or_else(|| Failure::null("params"))?;
        *params = zimage_edit_params::defaults();
        Ok(())
    })
}

/// Reads edit parameters and copies the reference pictures.
unsafe fn edit_request(params: *const zimage_edit_params) -> Result<EditRequest, Failure> {
    let p = unsafe { args::versioned(params, "params") }?;
    let prompt = unsafe { args::string(p.prompt, "params->prompt") }?;
    let negative = unsafe { args::optional_string(p.negative_prompt, "params->negative_prompt") }?;
    if p.images.is_null() && p.image_count > 0 {
        return Err(Failure::null("params->images"));
    }
    // More than the SDK's cap is refused there; keep the copy bounded before that.
    if p.image_count > 64 {
        return Err(Failure::invalid(format!("params->image_count {} is beyond any model's limit", p.image_count)));
    }
    let views: &[zimage_image] =
        if p.image_count == 0 { &[] } else { unsafe { std::slice::from_raw_parts(p.images, p.image_count) } };
    let mut images = Vec::with_capacity(views.len());
    for (i, view) in views.iter().enumerate() {
        let what = format!("params->images[{i}]");
        if view.pixels.is_null() {
            return Err(Failure::null(&what));
        }
        // A picture past the SDK's size limit is refused from its size alone, without copying it.
        if view.width as u64 * view.height as u64 > MAX_REFERENCE_PIXELS {
            images.push(RgbImage { width: view.width, height: view.height, pixels: Vec::new() });
            continue;
        }
        let (width, height, pixels) = unsafe { read_pixels(view, 3, &what) }?.expect("non-NULL pixels");
        images.push(RgbImage { width, height, pixels });
    }
    let mut request = EditRequest::new(prompt, images);
    request.negative_prompt = negative.map(str::to_owned);
    match (p.width, p.height) {
        (0, 0) => {}
        (w, h) => {
            request.width = Some(w);
            request.height = Some(h);
        }
    }
    request.steps = (p.steps > 0).then_some(p.steps as usize);
    request.guidance_scale = (p.guidance_scale != ZIMAGE_EDIT_PACKAGE_DEFAULT).then_some(p.guidance_scale);
    request.cfg_normalization = p.cfg_normalization;
    request.cfg_truncation = (p.cfg_truncation != ZIMAGE_EDIT_PACKAGE_DEFAULT).then_some(p.cfg_truncation);
    request.seed = (p.seed != ZIMAGE_RANDOM_SEED).then_some(p.seed);
    request.count = p.count;
    request.max_sequence_length = (p.max_sequence_length > 0).then_some(p.max_sequence_length as usize);
    request.return_latents = p.return_latents;
    Ok(request)
}

/// Edits: images from the reference pictures and the instruction (packages that list the
/// "edit" pipeline; others fail with `ZIMAGE_RESULT_INVALID_REQUEST`). On success
/// `*out_images` receives a list to free with `zimage_image_list_free()`; on failure it is
/// left untouched. Blocks until done; cancellation as for `zimage_generate()`.
#[no_mangle]
pub unsafe extern "C" fn zimage_edit(
    pipeline: *const zimage_pipeline,
    params: *const zimage_edit_params,
    out_images: *mut *mut zimage_image_list,
) -> zimage_result {
    guard(|| {
        let handle = unsafe { args::reference(pipeline, "pipeline") }?;
        let _current = handle.enter();
        handle.logged(unsafe { edit(handle, params, out_images) })
    })
}

unsafe fn edit(
    handle: &zimage_pipeline,
    params: *const zimage_edit_params,
    out_images: *mut *mut zimage_image_list,
) -> Result<(), Failure> {
    let out = args::output(out_images, "out_images")?;
    let request = unsafe { edit_request(params) }?;
    let p = unsafe { args::versioned(params, "params") }?;
    let (progress, user_data) = (p.progress_callback, p.progress_user_data);
    let mut on_progress = |s: &Progress| -> bool {
        match progress {
            Some(callback) => unsafe {
                callback(s.step as u32, s.total_steps as u32, s.elapsed.as_secs_f64(), user_data)
            },
            None => true,
        }
    };
    let generation = handle.pipeline.edit(&request, Some(&mut on_progress))?;
    log(handle.logger(), zimage_log_level::Info, || {
        format!(
            "edited {} image(s) from {} reference(s) in {:.2} s (seed {})",
            generation.images.len(),
            request.images.len(),
            generation.timings.total.as_secs_f64(),
            generation.seed
        )
    });
    let list = Box::new(zimage_image_list::new(generation));
    unsafe { out.write(Box::into_raw(list)) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_fills_the_defaults() {
        let mut p = std::mem::MaybeUninit::<zimage_edit_params>::uninit();
        assert_eq!(unsafe { zimage_edit_params_init(p.as_mut_ptr()) }, zimage_result::Ok);
        let p = unsafe { p.assume_init() };
        assert_eq!(p.struct_size, size_of::<zimage_edit_params>());
        assert_eq!((p.steps, p.width, p.height, p.count, p.seed), (0, 0, 0, 1, ZIMAGE_RANDOM_SEED));
        assert_eq!(p.guidance_scale, ZIMAGE_EDIT_PACKAGE_DEFAULT);
        // No prompt yet: a NULL argument.
        let code = unsafe { edit_request(&p) }.err().map(|f| f.code);
        assert_eq!(code, Some(zimage_result::NullArgument));
    }

    #[test]
    fn strided_references_are_repacked_and_huge_ones_not_copied() {
        let mut p = zimage_edit_params::defaults();
        let prompt = c"make it blue";
        p.prompt = prompt.as_ptr();
        let buffer: Vec<u8> = (0..(70 * 3 + 5) * 64).map(|i| i as u8).collect();
        let views = [
            zimage_image { pixels: buffer.as_ptr(), width: 70, height: 64, stride: 70 * 3 + 5 },
            zimage_image { pixels: buffer.as_ptr(), width: 1 << 16, height: 1 << 16, stride: 0 },
        ];
        p.images = views.as_ptr();
        p.image_count = 2;
        let r = unsafe { edit_request(&p) }.unwrap();
        assert_eq!(r.images[0].pixels.len(), 70 * 64 * 3);
        assert_eq!(r.images[0].pixels[70 * 3..70 * 3 + 3], buffer[70 * 3 + 5..70 * 3 + 8]);
        assert!(r.images[1].pixels.is_empty(), "a 4-gigapixel view is never read");
        assert_eq!((r.steps, r.guidance_scale, r.width), (None, None, None));
    }
}
