//! Editing (Z-Image Omni packages): `zimage_edit_params`, its `*_init` function and
//! `zimage_edit()`. Reference pictures are RGB8 views with a stride (`zimage_image`), copied
//! during the call. Fields are only ever appended (see `struct_size`).

use std::ffi::{c_char, c_void};
use std::mem::{offset_of, size_of};

use sdk::pipeline::edit::MAX_REFERENCE_PIXELS;
use sdk::{EditRequest, Progress, RgbImage};

use crate::args::{self, CBool, Versioned, ZIMAGE_RANDOM_SEED};
use crate::error::{zimage_result, Failure};
use crate::generate_params::{read_pixels, zimage_preview_callback, zimage_progress_callback, StepCallbacks};
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
    /// Images generated, 1..=64, at most 2^26 pixels together (64 of 1024x1024).
    pub count: u32,
    /// Tokens kept per text segment; 0 = the package's default (512).
    pub max_sequence_length: u32,
    /// Keep the final latents, for `zimage_image_list_latents()`.
    pub return_latents: CBool,
    /// Called after every denoising step; NULL for none.
    pub progress_callback: zimage_progress_callback,
    /// Passed back to `progress_callback` and `preview_callback` unchanged.
    pub progress_user_data: *mut c_void,
    /// Previews (appended after `progress_user_data`: an older, smaller struct means none), as
    /// `zimage_generate_params.preview_count`: this many at evenly spaced steps before the last.
    /// 0 (the default): none.
    pub preview_count: u32,
    /// Receives the previews, one per image (`count`). NULL (the default): none are made,
    /// whatever `preview_count`.
    pub preview_callback: zimage_preview_callback,
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
            return_latents: CBool::FALSE,
            progress_callback: None,
            progress_user_data: std::ptr::null_mut(),
            preview_count: sdk.previews,
            preview_callback: None,
        }
    }
}

/// Fills `params` with the defaults and sets `struct_size`; `prompt` and `images` are left NULL.
///
/// Writes this library's whole struct. Kept for programs built against headers without the init
/// macros; the header's `zimage_edit_params_init` macro calls `zimage_edit_params_init_sized()`
/// instead.
#[no_mangle]
pub unsafe extern "C" fn zimage_edit_params_init(params: *mut zimage_edit_params) -> zimage_result {
    guard(|| unsafe { args::init_sized(params, size_of::<zimage_edit_params>(), zimage_edit_params::defaults()) })
}

/// Like `zimage_edit_params_init()`, but writes only the first `size` bytes, with
/// `struct_size = size`: `size` is the caller's `sizeof(zimage_edit_params)`, which the header's
/// `zimage_edit_params_init` macro passes, so a program built against an older, smaller header gets
/// its own struct filled. A `size` that is no version's `sizeof` (one from a newer header included)
/// is `ZIMAGE_RESULT_INVALID_ARGUMENT` and writes
/// only `struct_size`, to 0 (when `size` holds it), so that every call refuses the struct.
#[no_mangle]
pub unsafe extern "C" fn zimage_edit_params_init_sized(params: *mut zimage_edit_params, size: usize) -> zimage_result {
    guard(|| unsafe { args::init_sized(params, size, zimage_edit_params::defaults()) })
}

/// Reads edit parameters and copies the reference pictures; returns the callbacks too.
unsafe fn edit_request(params: *const zimage_edit_params) -> Result<(EditRequest, StepCallbacks), Failure> {
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
            return Err(Failure::null(&format!("{what}.pixels")));
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
    request.return_latents = p.return_latents.get();
    let callbacks =
        StepCallbacks { progress: p.progress_callback, preview: p.preview_callback, user_data: p.progress_user_data };
    request.previews = callbacks.previews(p.preview_count);
    Ok((request, callbacks))
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
    let (request, callbacks) = unsafe { edit_request(params) }?;
    let mut on_progress = |s: &Progress| callbacks.on_step(s);
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
        let (r, _) = unsafe { edit_request(&p) }.unwrap();
        assert_eq!(r.images[0].pixels.len(), 70 * 64 * 3);
        assert_eq!(r.images[0].pixels[70 * 3..70 * 3 + 3], buffer[70 * 3 + 5..70 * 3 + 8]);
        assert!(r.images[1].pixels.is_empty(), "a 4-gigapixel view is never read");
        assert_eq!((r.steps, r.guidance_scale, r.width), (None, None, None));
    }

    /// A reference whose pixels are NULL is named down to the field.
    #[test]
    fn a_reference_without_pixels_names_its_field() {
        let mut p = zimage_edit_params::defaults();
        p.prompt = c"make it blue".as_ptr();
        let buffer = vec![0u8; 64 * 64 * 3];
        let views = [
            zimage_image { pixels: buffer.as_ptr(), width: 64, height: 64, stride: 0 },
            zimage_image { pixels: std::ptr::null(), width: 64, height: 64, stride: 0 },
        ];
        (p.images, p.image_count) = (views.as_ptr(), 2);
        let failure = unsafe { edit_request(&p) }.err().expect("refused");
        assert_eq!(failure.code, zimage_result::NullArgument);
        assert_eq!(failure.message, "params->images[1].pixels is NULL");
    }

    /// What the preview callback saw: (step, total, image count, first image's shape).
    type Previews = Vec<(u32, u32, u32, (u32, u32, usize))>;

    unsafe extern "C" fn on_preview(step: u32, total: u32, images: *const zimage_image, count: u32, data: *mut c_void) {
        let image = unsafe { &*images };
        unsafe { &mut *(data as *mut Previews) }.push((step, total, count, (image.width, image.height, image.stride)));
    }

    unsafe extern "C" fn ignore_log(_: u32, _: *const c_char, _: *mut c_void) {}

    /// An edit without references (ZImageOmniPipeline's text-to-image) passes its previews on
    /// too: 4 steps and one preview, after step 2.
    #[test]
    fn edits_have_previews() {
        // A log callback, as every test that loads here (see generate.rs's preview test).
        let mut load = std::mem::MaybeUninit::uninit();
        unsafe { crate::load_params::zimage_load_params_init(load.as_mut_ptr()) };
        let mut load = unsafe { load.assume_init() };
        load.log_callback = Some(ignore_log);
        let package = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny-zimage-omni\0");
        let mut pipeline = std::ptr::null_mut();
        let code = unsafe { crate::pipeline::zimage_pipeline_load(package.as_ptr().cast(), &load, &mut pipeline) };
        assert_eq!(code, zimage_result::Ok);
        let mut seen = Previews::new();
        let mut p = zimage_edit_params::defaults();
        p.prompt = c"a red square".as_ptr();
        (p.width, p.height, p.steps, p.seed) = (64, 48, 4, 3);
        p.preview_count = 1;
        p.preview_callback = Some(on_preview);
        p.progress_user_data = &mut seen as *mut Previews as *mut c_void;
        let mut list = std::ptr::null_mut();
        assert_eq!(unsafe { zimage_edit(pipeline, &p, &mut list) }, zimage_result::Ok);
        assert_eq!(seen, [(2, 4, 1, (64, 48, 64 * 3))]);
        unsafe { crate::image::zimage_image_list_free(list) };
        unsafe { crate::pipeline::zimage_pipeline_free(pipeline) };
    }
}
