//! Generate parameters: `zimage_generate_params`, its `*_init` function, the reading of the
//! caller's input images (`zimage_image` views), and the conversion to an SDK
//! `GenerateRequest`. Fields are only ever appended (see `struct_size`).
//!
//! Per-call references to handles live here: a prompt embedding, an enhancer with its
//! parameters (and, later, adapters as a pointer + count array; see ffi/README.md, "Handles").

use std::ffi::{c_char, c_void};
use std::mem::{offset_of, size_of};

use sdk::limits::MAX_INPUT_SIDE;
use sdk::{
    ControlCondition, ControlPreprocess, EnhanceOptions, GenerateRequest, GrayImage, InitImage, Progress, Prompt,
    RgbImage,
};

use crate::args::{self, CBool, Versioned, ZIMAGE_RANDOM_SEED};
use crate::c_enum::{c_enum, CEnum};
use crate::enhancer::{self, zimage_enhance_params, zimage_enhancer};
use crate::error::{zimage_result, Failure};
use crate::image::zimage_image;
use crate::panic::guard;
use crate::pipeline::zimage_pipeline;
use crate::prompt::zimage_prompt_embedding;

/// Called after every denoising step with the steps done so far (1..=total) and the seconds
/// since the generation started. Return true to go on, false to stop: the generation then
/// fails with `ZIMAGE_RESULT_CANCELLED`. Called on the thread that called `zimage_generate()`.
pub type zimage_progress_callback =
    Option<unsafe extern "C" fn(step: u32, total: u32, elapsed_seconds: f64, user_data: *mut c_void) -> CBool>;

/// Receives previews: what the images would look like if denoising stopped after step `step`
/// of `total_steps` (the progress callback's numbers), decoded from the model's current
/// estimate (blurry early, close to the result late). `images` holds `image_count` views, one
/// per image of the request, RGB8 with packed rows at the request's size; the views and their
/// pixels belong to zimage and are valid only during the call (copy them to keep them).
///
/// Called on the thread that called `zimage_generate()` (or `zimage_edit()`), with
/// `progress_user_data`, right after the progress callback at each step `preview_count` asks
/// for; not after a progress callback that returned false.
pub type zimage_preview_callback = Option<
    unsafe extern "C" fn(
        step: u32,
        total_steps: u32,
        images: *const zimage_image,
        image_count: u32,
        user_data: *mut c_void,
    ),
>;

/// One generation. Fill it with `zimage_generate_params_init()` (Z-Image-Turbo's recommended
/// settings: 1024x1024, 8 steps, no guidance, a random seed), then change fields. Pointers in it
/// are borrowed for the duration of `zimage_generate()` only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct zimage_generate_params {
    /// `sizeof(zimage_generate_params)`, set by `zimage_generate_params_init()`.
    pub struct_size: usize,
    /// The prompt, UTF-8. Exactly one of `prompt` and `prompt_embedding` must be set. Text
    /// prompts (negative ones too) are at most 1 MiB (`ZIMAGE_RESULT_INVALID_REQUEST` past it).
    pub prompt: *const c_char,
    /// A prompt encoded once with `zimage_encode_prompt()`, instead of `prompt`.
    pub prompt_embedding: *const zimage_prompt_embedding,
    /// Used only with guidance (`guidance_scale > 0`). At most one of `negative_prompt` and
    /// `negative_prompt_embedding`; neither means the empty prompt.
    pub negative_prompt: *const c_char,
    pub negative_prompt_embedding: *const zimage_prompt_embedding,
    /// Image size in pixels: positive multiples of the package's size multiple (16 for
    /// Z-Image-Turbo).
    pub width: u32,
    pub height: u32,
    /// Denoising steps, 1..=1000.
    pub steps: u32,
    /// Classifier-free guidance scale; 0 turns guidance off (Z-Image-Turbo needs none).
    pub guidance_scale: f32,
    /// 0 = off; otherwise the guided prediction's norm is capped at this factor times the
    /// conditional one's.
    pub cfg_normalization: f32,
    /// Guidance stops at steps whose normalised time exceeds this (1.0, the default, = never).
    pub cfg_truncation: f32,
    /// The noise seed; `ZIMAGE_RANDOM_SEED` (the default) draws one.
    pub seed: u64,
    /// Images generated from this prompt, 1..=64, at most 2^26 pixels together (64 of
    /// 1024x1024, one of 8192x8192).
    pub count: u32,
    /// Prompt tokens kept (chat template included); 0 = the package's default (512).
    pub max_sequence_length: u32,
    /// Keep the final latents, for `zimage_image_list_latents()`.
    pub return_latents: CBool,
    /// Image-to-image: start from this RGB picture instead of pure noise; one of another size
    /// than the request's is resized to it as diffusers resizes it (Pillow's Lanczos).
    /// `init_image.pixels == NULL` (the default) means text-to-image.
    pub init_image: zimage_image,
    /// Inpainting: a 1-channel mask, white (>= 128) = repaint, resized to the request's size
    /// when it has another (as diffusers' mask processor does). Needs `init_image`.
    /// `mask.pixels == NULL` means no mask.
    pub mask: zimage_image,
    /// How much of `init_image` is re-generated, 0..=1 (1 = all of it).
    pub strength: f64,
    /// Called after every denoising step; NULL for none.
    pub progress_callback: zimage_progress_callback,
    /// Passed back to `progress_callback` and `preview_callback` unchanged.
    pub progress_user_data: *mut c_void,
    /// Prompt enhancement (appended after `progress_user_data`: an older, smaller struct means
    /// none). When set, the text `prompt` is first rewritten by this enhancer (no token callback is
    /// called), and the images are made from the rewritten prompt, which
    /// `zimage_image_list_enhanced_prompt()` reports. The request is checked before the enhancer
    /// runs. NULL (the default): the prompt is used as given. Needs a text `prompt` (not an
    /// embedding); `ZIMAGE_RESULT_INFERENCE` when the enhancer produced no text. `zimage_cancel()`
    /// stops the enhancement too when the enhancer was attached to this pipeline; a standalone one
    /// is stopped with `zimage_enhancer_cancel()`.
    pub enhancer: *const zimage_enhancer,
    /// How to enhance; NULL = the defaults of `zimage_enhance_params_init()`. Ignored without
    /// `enhancer`.
    pub enhance_params: *const zimage_enhance_params,
    /// ControlNet (appended after `enhance_params`: an older, smaller struct means none): the
    /// control map, RGB8, resized to the request's size (then preprocessed), guiding the generation through
    /// the ControlNet attached with `zimage_pipeline_set_controlnet()`. With `init_image` and
    /// `mask` also set: ControlNet inpainting, which starts from noise (`strength` is not used;
    /// a ControlNet with 2C+1 control channels is needed). `control_image.pixels == NULL` (the
    /// default): no ControlNet condition.
    pub control_image: zimage_image,
    /// ControlNet conditioning scale (default 0.75, diffusers'); finite.
    pub control_scale: f32,
    /// How `control_image` is made into the control map first (a `zimage_control_preprocess`,
    /// as `uint32_t`); default `ZIMAGE_CONTROL_PREPROCESS_NONE`.
    pub control_preprocess: u32,
    /// Previews (appended after `control_preprocess`: an older, smaller struct means none):
    /// this many, passed to `preview_callback` at evenly spaced steps before the last (step
    /// k * total_steps / (preview_count + 1), rounded up, for k = 1..=preview_count, where
    /// total_steps is the progress callback's), at most one per step: a larger number means
    /// every step but the last. Each costs one VAE decode of the images. 0 (the default): none.
    pub preview_count: u32,
    /// Receives the previews. NULL (the default): none are made, whatever `preview_count`.
    pub preview_callback: zimage_preview_callback,
}

/// How a ControlNet control image is prepared (`zimage_generate_params.control_preprocess`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum zimage_control_preprocess {
    /// The image is the control map already (edges, depth, pose ...).
    None = 0,
    /// Canny edges of the image (thresholds 100 and 200, as the ControlNet annotators).
    Canny = 1,
}

c_enum!(zimage_control_preprocess { None, Canny });

/// diffusers' default image-to-image strength.
const DEFAULT_STRENGTH: f64 = 0.6;

unsafe impl Versioned for zimage_generate_params {
    const FIRST_VERSION_SIZE: usize = offset_of!(zimage_generate_params, progress_user_data) + size_of::<*mut c_void>();

    fn defaults() -> Self {
        // The SDK's defaults, so the C API cannot drift from them.
        let sdk = GenerateRequest::default();
        zimage_generate_params {
            struct_size: size_of::<Self>(),
            prompt: std::ptr::null(),
            prompt_embedding: std::ptr::null(),
            negative_prompt: std::ptr::null(),
            negative_prompt_embedding: std::ptr::null(),
            width: sdk.width,
            height: sdk.height,
            steps: sdk.steps,
            guidance_scale: sdk.guidance_scale,
            cfg_normalization: sdk.cfg_normalization,
            cfg_truncation: sdk.cfg_truncation,
            seed: sdk.seed.unwrap_or(ZIMAGE_RANDOM_SEED),
            count: sdk.count,
            max_sequence_length: sdk.max_sequence_length.map_or(0, |n| n as u32),
            return_latents: sdk.return_latents.into(),
            init_image: zimage_image::NONE,
            mask: zimage_image::NONE,
            strength: DEFAULT_STRENGTH,
            progress_callback: None,
            progress_user_data: std::ptr::null_mut(),
            enhancer: std::ptr::null(),
            enhance_params: std::ptr::null(),
            control_image: zimage_image::NONE,
            control_scale: ControlCondition::DEFAULT_SCALE,
            control_preprocess: zimage_control_preprocess::None as u32,
            preview_count: sdk.previews,
            preview_callback: None,
        }
    }
}

/// Fills `params` with Z-Image-Turbo's recommended settings and sets `struct_size`; the
/// prompt is left NULL.
///
/// Writes this library's whole struct. Kept for programs built against headers without the init
/// macros; the header's `zimage_generate_params_init` macro calls
/// `zimage_generate_params_init_sized()` instead.
#[no_mangle]
pub unsafe extern "C" fn zimage_generate_params_init(params: *mut zimage_generate_params) -> zimage_result {
    guard(|| unsafe {
        args::init_sized(params, size_of::<zimage_generate_params>(), zimage_generate_params::defaults())
    })
}

/// Like `zimage_generate_params_init()`, but writes only the first `size` bytes, with
/// `struct_size = size`: `size` is the caller's `sizeof(zimage_generate_params)`, which the
/// header's `zimage_generate_params_init` macro passes, so a program built against an older,
/// smaller header gets its own struct filled. A `size` that is no version's `sizeof` (one from a
/// newer header included) is `ZIMAGE_RESULT_INVALID_ARGUMENT` and writes
/// only `struct_size`, to 0 (when `size` holds it), so that every call refuses the struct.
#[no_mangle]
pub unsafe extern "C" fn zimage_generate_params_init_sized(
    params: *mut zimage_generate_params,
    size: usize,
) -> zimage_result {
    guard(|| unsafe { args::init_sized(params, size, zimage_generate_params::defaults()) })
}

/// Fills `params` like `zimage_generate_params_init()`, then with the steps, guidance and CFG
/// settings `pipeline`'s package recommends (its manifest's `generation_defaults`): 8 steps
/// without guidance for Z-Image-Turbo, many steps with guidance for the base model `Z-Image`.
/// On failure only `struct_size` is written, to 0, so that a struct left so is refused by every
/// call that takes it.
///
/// Writes this library's whole struct. Kept for programs built against headers without the
/// init macros; the header's `zimage_generate_params_init_for_pipeline` macro calls
/// `zimage_generate_params_init_for_pipeline_sized()` instead.
#[no_mangle]
pub unsafe extern "C" fn zimage_generate_params_init_for_pipeline(
    pipeline: *const zimage_pipeline,
    params: *mut zimage_generate_params,
) -> zimage_result {
    unsafe { zimage_generate_params_init_for_pipeline_sized(pipeline, params, size_of::<zimage_generate_params>()) }
}

/// What `zimage_generate_params_init_for_pipeline()` does, writing only the first `size` bytes:
/// `size` is the caller's `sizeof(zimage_generate_params)`, as for
/// `zimage_generate_params_init_sized()`.
#[no_mangle]
pub unsafe extern "C" fn zimage_generate_params_init_for_pipeline_sized(
    pipeline: *const zimage_pipeline,
    params: *mut zimage_generate_params,
    size: usize,
) -> zimage_result {
    guard(|| {
        let Some(pipeline) = (unsafe { pipeline.as_ref() }) else {
            unsafe { args::refuse_struct(params, size) };
            return Err(Failure::null("pipeline"));
        };
        let recommended = GenerateRequest::for_package(pipeline.pipeline.manifest(), "");
        let mut filled = zimage_generate_params::defaults();
        filled.steps = recommended.steps;
        filled.guidance_scale = recommended.guidance_scale;
        filled.cfg_normalization = recommended.cfg_normalization;
        filled.cfg_truncation = recommended.cfg_truncation;
        unsafe { args::init_sized(params, size, filled) }
    })
}

/// The C callbacks of one generation or edit, called after each denoising step.
#[derive(Clone, Copy)]
pub(crate) struct StepCallbacks {
    pub progress: zimage_progress_callback,
    pub preview: zimage_preview_callback,
    pub user_data: *mut c_void,
}

impl StepCallbacks {
    /// The number of previews to ask the SDK for: none without a callback to receive them, as
    /// each costs a VAE decode.
    pub fn previews(&self, preview_count: u32) -> u32 {
        if self.preview.is_some() {
            preview_count
        } else {
            0
        }
    }

    /// What the SDK calls after each step: the progress callback, then, at a preview step, the
    /// preview callback. false stops the run (cancelled).
    pub fn on_step(&self, p: &Progress) -> bool {
        let (step, total) = (p.step as u32, p.total_steps as u32);
        let go_on = match self.progress {
            Some(callback) => unsafe { callback(step, total, p.elapsed.as_secs_f64(), self.user_data) }.get(),
            None => true,
        };
        if let (true, Some(callback), Some(pictures)) = (go_on, self.preview, &p.preview) {
            // Views of the SDK's pictures, which outlive the call.
            let views: Vec<zimage_image> = pictures.iter().map(zimage_image::of).collect();
            unsafe { callback(step, total, views.as_ptr(), views.len() as u32, self.user_data) };
        }
        go_on
    }
}

/// A generate request converted for the SDK, plus the callbacks the C layer calls.
pub(crate) struct Generate {
    pub request: GenerateRequest,
    pub callbacks: StepCallbacks,
    /// The enhancer to run first, with its options.
    pub enhance: Option<(*const zimage_enhancer, EnhanceOptions)>,
}

/// Reads generate parameters and copies everything they point to.
pub(crate) unsafe fn generate_request(params: *const zimage_generate_params) -> Result<Generate, Failure> {
    let p = unsafe { args::versioned(params, "params") }?;
    let positive = unsafe { prompt(p.prompt, p.prompt_embedding, "params->prompt") }?
        .ok_or_else(|| Failure::null("params->prompt (and params->prompt_embedding)"))?;
    let negative = unsafe { prompt(p.negative_prompt, p.negative_prompt_embedding, "params->negative_prompt") }?;
    let mut init_image = unsafe { init_image(&p) }?;
    let control = unsafe { control(&p, &mut init_image) }?;
    let mut request = GenerateRequest::new(positive);
    request.negative_prompt = negative;
    request.width = p.width;
    request.height = p.height;
    request.steps = p.steps;
    request.guidance_scale = p.guidance_scale;
    request.cfg_normalization = p.cfg_normalization;
    request.cfg_truncation = p.cfg_truncation;
    request.seed = (p.seed != ZIMAGE_RANDOM_SEED).then_some(p.seed);
    request.count = p.count;
    request.max_sequence_length = (p.max_sequence_length > 0).then_some(p.max_sequence_length as usize);
    request.return_latents = p.return_latents.get();
    request.init_image = init_image;
    request.control = control;
    let callbacks =
        StepCallbacks { progress: p.progress_callback, preview: p.preview_callback, user_data: p.progress_user_data };
    request.previews = callbacks.previews(p.preview_count);
    let enhance = if p.enhancer.is_null() {
        None
    } else {
        let options = unsafe { enhancer::enhance_options(p.enhance_params, "params->enhance_params") }?;
        Some((p.enhancer, options))
    };
    Ok(Generate { request, callbacks, enhance })
}

/// A prompt given as text or as an embedding handle (not both); `None` when neither is set.
unsafe fn prompt(
    text: *const c_char,
    embedding: *const zimage_prompt_embedding,
    what: &str,
) -> Result<Option<Prompt>, Failure> {
    match (text.is_null(), embedding.is_null()) {
        (true, true) => Ok(None),
        (false, false) => Err(Failure::invalid(format!("{what} and {what}_embedding are both set; give one"))),
        (false, true) => Ok(Some(Prompt::Text(unsafe { args::string(text, what) }?.to_owned()))),
        (true, false) => Ok(Some(Prompt::Embedded(unsafe { &*embedding }.embedding.clone()))),
    }
}

unsafe fn init_image(p: &zimage_generate_params) -> Result<Option<InitImage>, Failure> {
    let Some((width, height, pixels)) = (unsafe { read_pixels(&p.init_image, 3, "params->init_image") })? else {
        if !p.mask.pixels.is_null() {
            return Err(Failure::invalid("params->mask is set without params->init_image"));
        }
        return Ok(None);
    };
    let image = RgbImage { width, height, pixels };
    let mask = unsafe { read_pixels(&p.mask, 1, "params->mask") }?.map(|(width, height, pixels)| GrayImage {
        width,
        height,
        pixels,
    });
    Ok(Some(InitImage { image, mask, strength: p.strength }))
}

/// The ControlNet condition, taking the init image and mask for ControlNet inpainting.
unsafe fn control(
    p: &zimage_generate_params,
    init: &mut Option<InitImage>,
) -> Result<Option<ControlCondition>, Failure> {
    // The enum is checked whether or not a control image is given, as every enum is.
    let preprocess = match zimage_control_preprocess::from_c(p.control_preprocess, "params->control_preprocess")? {
        zimage_control_preprocess::None => ControlPreprocess::None,
        zimage_control_preprocess::Canny => ControlPreprocess::CANNY_DEFAULT,
    };
    let Some((width, height, pixels)) = (unsafe { read_pixels(&p.control_image, 3, "params->control_image") })? else {
        return Ok(None);
    };
    let control = RgbImage { width, height, pixels };
    let mut condition = match init.take() {
        None => ControlCondition::new(control),
        Some(InitImage { image, mask: Some(mask), .. }) => ControlCondition::inpaint(control, image, mask),
        Some(InitImage { mask: None, .. }) => {
            return Err(Failure::invalid(
                "params->control_image with params->init_image needs params->mask (ControlNet inpainting); there \
                 is no ControlNet image-to-image",
            ))
        }
    };
    // The pipeline resizes the pictures to the request's size, then preprocesses the map, as
    // `zimage generate` does.
    condition.preprocess = preprocess;
    condition.conditioning_scale = p.control_scale;
    Ok(Some(condition))
}

/// Most pixels in a caller's picture: the largest the SDK decodes from a file (16384 on a
/// side), so a picture in memory may be as large as one read from disk.
const MAX_IMAGE_PIXELS: u64 = MAX_INPUT_SIDE as u64 * MAX_INPUT_SIDE as u64;

/// Copies a caller's image into packed rows; `None` when `pixels` is NULL. Pictures of more
/// than [`MAX_IMAGE_PIXELS`] are refused (`InvalidRequest`) before the pixels are touched: the
/// size is all there is to check a caller's buffer against, and one that lies would otherwise
/// make us allocate, and read, terabytes.
pub(crate) unsafe fn read_pixels(
    image: &zimage_image,
    channels: usize,
    what: &str,
) -> Result<Option<(u32, u32, Vec<u8>)>, Failure> {
    if image.pixels.is_null() {
        return Ok(None);
    }
    if image.width == 0 || image.height == 0 {
        // Not a malformed argument but an unusable image: the SDK rejects it with
        // ZIMAGE_RESULT_IMAGE, as it does any other picture it cannot use.
        return Ok(Some((image.width, image.height, Vec::new())));
    }
    if image.width as u64 * image.height as u64 > MAX_IMAGE_PIXELS {
        return Err(Failure::new(
            zimage_result::InvalidRequest,
            format!(
                "{what} is {}x{}: more than {MAX_IMAGE_PIXELS} pixels ({MAX_INPUT_SIDE}x{MAX_INPUT_SIDE})",
                image.width, image.height
            ),
        ));
    }
    let (width, height) = (image.width as usize, image.height as usize);
    let row = width.checked_mul(channels).ok_or_else(|| Failure::invalid(format!("{what} width {width} overflows")))?;
    let stride = if image.stride == 0 { row } else { image.stride };
    if stride < row {
        return Err(Failure::invalid(format!("{what}->stride {stride} is less than a row of {row} bytes")));
    }
    // The last row needs only `row` bytes, so a tightly cropped view of a larger buffer works.
    let total =
        stride
            .checked_mul(height - 1)
            .and_then(|n| n.checked_add(row))
            .filter(|&n| n <= isize::MAX as usize)
            .ok_or_else(|| Failure::invalid(format!("{what} of {width}x{height} with stride {stride} overflows")))?;
    let bytes = unsafe { std::slice::from_raw_parts(image.pixels, total) };
    // Up to 768 MiB at the largest size: a failed allocation is an error, not an abort.
    let mut packed = Vec::new();
    packed.try_reserve_exact(row * height).map_err(|_| {
        Failure::new(zimage_result::InvalidRequest, format!("{what}: no memory for a copy of {width}x{height}"))
    })?;
    for y in 0..height {
        packed.extend_from_slice(&bytes[y * stride..y * stride + row]);
    }
    Ok(Some((image.width, image.height, packed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code<T>(r: Result<T, Failure>) -> zimage_result {
        r.err().map_or(zimage_result::Ok, |f| f.code)
    }

    #[test]
    fn generate_defaults_are_the_sdks() {
        let mut p = std::mem::MaybeUninit::<zimage_generate_params>::uninit();
        assert_eq!(unsafe { zimage_generate_params_init(p.as_mut_ptr()) }, zimage_result::Ok);
        let mut p = unsafe { p.assume_init() };
        assert_eq!(p.struct_size, size_of::<zimage_generate_params>());
        assert_eq!((p.width, p.height, p.steps, p.count, p.seed), (1024, 1024, 8, 1, ZIMAGE_RANDOM_SEED));
        assert_eq!(p.cfg_truncation, 1.0);
        assert_eq!(code(unsafe { generate_request(&p) }), zimage_result::NullArgument);
        p.prompt = c"a fox".as_ptr();
        let g = unsafe { generate_request(&p) }.unwrap();
        assert!(matches!(&g.request.prompt, Prompt::Text(t) if t == "a fox"));
        assert_eq!((g.request.seed, g.request.max_sequence_length), (None, None));
        p.seed = 42;
        assert_eq!(unsafe { generate_request(&p) }.unwrap().request.seed, Some(42));
    }

    /// `zimage_generate_params_init()` as compiled against an older header: the macro passes that
    /// header's smaller sizeof, and nothing past it is written (the caller's next variable).
    #[test]
    fn sized_init_writes_only_the_callers_struct() {
        const GUARD: u8 = 0xAB;
        // u64s for the struct's alignment, one more for guard bytes past the largest size.
        const WORDS: usize = size_of::<zimage_generate_params>() / 8 + 1;
        let defaults = zimage_generate_params::defaults();
        let before_previews = offset_of!(zimage_generate_params, preview_count);
        for size in [zimage_generate_params::FIRST_VERSION_SIZE, before_previews, size_of::<zimage_generate_params>()] {
            let mut buffer = [u64::from_ne_bytes([GUARD; 8]); WORDS];
            let p = buffer.as_mut_ptr().cast::<zimage_generate_params>();
            assert_eq!(unsafe { zimage_generate_params_init_sized(p, size) }, zimage_result::Ok, "{size}");
            let bytes: &[u8] = unsafe { std::slice::from_raw_parts(buffer.as_ptr().cast(), WORDS * 8) };
            assert!(bytes[size..].iter().all(|&b| b == GUARD), "{size}: written past the caller's struct");
            let written = unsafe { p.read() };
            assert_eq!(written.struct_size, size);
            assert_eq!(
                (written.width, written.height, written.steps, written.seed),
                (1024, 1024, 8, ZIMAGE_RANDOM_SEED)
            );
            assert_eq!((written.strength, written.progress_user_data), (DEFAULT_STRENGTH, std::ptr::null_mut()));
            if size > before_previews {
                assert_eq!((written.preview_count, written.preview_callback), (0, None));
            }
            if size > zimage_generate_params::FIRST_VERSION_SIZE {
                assert_eq!((written.control_scale, written.control_preprocess), (defaults.control_scale, 0));
            } else {
                // The first version ends at progress_user_data: enhancer is a guard byte pattern.
                assert_eq!(written.enhancer as usize, usize::from_ne_bytes([GUARD; 8]));
            }
        }
        // Too small, ending inside a field, larger than this library's struct: refused, with
        // only struct_size written (to 0, where the size holds it), which every call refuses.
        let first = zimage_generate_params::FIRST_VERSION_SIZE;
        for size in [0, 4, 8, first - 8, first + 4, before_previews + 4, size_of::<zimage_generate_params>() + 8] {
            let mut buffer = [u64::from_ne_bytes([GUARD; 8]); WORDS];
            let p = buffer.as_mut_ptr().cast::<zimage_generate_params>();
            assert_eq!(unsafe { zimage_generate_params_init_sized(p, size) }, zimage_result::InvalidArgument, "{size}");
            let mut expected = [u64::from_ne_bytes([GUARD; 8]); WORDS];
            if size >= 8 {
                expected[0] = 0;
                let refused = unsafe { args::versioned(p.cast_const(), "params") }.map(|_| ()).unwrap_err();
                assert!(refused.message.starts_with("params->struct_size is 0;"), "{}", refused.message);
            }
            assert_eq!(buffer, expected, "{size}: written");
        }
        // The same for the pipeline's defaults without a pipeline.
        let mut buffer = [u64::from_ne_bytes([GUARD; 8]); WORDS];
        let p = buffer.as_mut_ptr().cast::<zimage_generate_params>();
        let size = size_of::<zimage_generate_params>();
        let result = unsafe { zimage_generate_params_init_for_pipeline_sized(std::ptr::null(), p, size) };
        assert_eq!(result, zimage_result::NullArgument);
        assert_eq!(buffer[0], 0);
        assert!(buffer[1..].iter().all(|&w| w == u64::from_ne_bytes([GUARD; 8])));
        assert_eq!(
            unsafe { zimage_generate_params_init_sized(std::ptr::null_mut(), size_of::<zimage_generate_params>()) },
            zimage_result::NullArgument
        );
    }

    /// A caller built against the first header: its struct ends at `progress_user_data`, so it
    /// names no enhancer, whatever lies beyond.
    #[test]
    fn a_first_version_struct_gets_defaults_for_the_rest() {
        let mut p = zimage_generate_params::defaults();
        p.prompt = c"x".as_ptr();
        p.struct_size = zimage_generate_params::FIRST_VERSION_SIZE;
        p.enhancer = std::ptr::NonNull::<zimage_enhancer>::dangling().as_ptr(); // never read
        p.enhance_params = std::ptr::NonNull::<zimage_enhance_params>::dangling().as_ptr();
        assert!(unsafe { generate_request(&p) }.unwrap().enhance.is_none());
        p.struct_size = size_of::<zimage_generate_params>() + 1;
        assert_eq!(code(unsafe { generate_request(&p) }), zimage_result::InvalidArgument);
    }

    #[test]
    fn images_are_repacked_from_strided_rows() {
        // 2x2 RGB in rows of 8 bytes: 6 pixel bytes and 2 padding bytes.
        let buffer: Vec<u8> = (0..14).collect();
        let view = zimage_image { pixels: buffer.as_ptr(), width: 2, height: 2, stride: 8 };
        let (w, h, pixels) = unsafe { read_pixels(&view, 3, "img") }.unwrap().unwrap();
        assert_eq!((w, h), (2, 2));
        assert_eq!(pixels, [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
        let packed = zimage_image { stride: 0, ..view };
        assert_eq!(unsafe { read_pixels(&packed, 3, "img") }.unwrap().unwrap().2, (0..12).collect::<Vec<u8>>());
        for bad in [zimage_image { stride: 5, ..view }, zimage_image { stride: usize::MAX, ..view }] {
            assert_eq!(code(unsafe { read_pixels(&bad, 3, "img") }), zimage_result::InvalidArgument);
        }
        let empty = zimage_image { width: 0, ..view };
        assert_eq!(unsafe { read_pixels(&empty, 3, "img") }.unwrap().unwrap(), (0, 2, Vec::new()));
    }

    /// A size that lies (a terapixel over a 16-byte buffer) is refused from the size alone:
    /// nothing is read or allocated for it.
    #[test]
    fn huge_pictures_are_refused_before_they_are_read() {
        let small = [0u8; 16];
        let huge = zimage_image { pixels: small.as_ptr(), width: 1 << 20, height: 1 << 20, stride: 0 };
        let mut p = zimage_generate_params::defaults();
        p.prompt = c"x".as_ptr();
        let rgb = [0u8; 12];
        let tiny = zimage_image { pixels: rgb.as_ptr(), width: 2, height: 2, stride: 0 };
        for (field, name) in
            [("init_image", "params->init_image"), ("mask", "params->mask"), ("control", "params->control_image")]
        {
            let mut q = p;
            match field {
                "init_image" => q.init_image = huge,
                "mask" => (q.init_image, q.mask) = (tiny, huge),
                _ => q.control_image = huge,
            }
            let bad = unsafe { generate_request(&q) }.err().unwrap();
            assert_eq!(bad.code, zimage_result::InvalidRequest);
            assert_eq!(bad.message, format!("{name} is 1048576x1048576: more than 268435456 pixels (16384x16384)"));
        }
        // One pixel past the cap, in one long row.
        let long = zimage_image { width: (MAX_IMAGE_PIXELS + 1) as u32, height: 1, ..huge };
        assert_eq!(code(unsafe { read_pixels(&long, 1, "img") }), zimage_result::InvalidRequest);
    }

    #[test]
    fn the_control_enum_is_checked_without_a_control_image() {
        let mut p = zimage_generate_params::defaults();
        p.prompt = c"x".as_ptr();
        p.control_preprocess = 99;
        assert_eq!(code(unsafe { generate_request(&p) }), zimage_result::InvalidArgument);
        p.control_preprocess = zimage_control_preprocess::Canny as u32;
        assert!(unsafe { generate_request(&p) }.unwrap().request.control.is_none());
    }

    #[test]
    fn mask_needs_an_init_image() {
        let mut p = zimage_generate_params::defaults();
        p.prompt = c"x".as_ptr();
        let mask = [255u8; 4];
        p.mask = zimage_image { pixels: mask.as_ptr(), width: 2, height: 2, stride: 0 };
        assert_eq!(code(unsafe { generate_request(&p) }), zimage_result::InvalidArgument);
        let rgb = [0u8; 12];
        p.init_image = zimage_image { pixels: rgb.as_ptr(), width: 2, height: 2, stride: 0 };
        let init = unsafe { generate_request(&p) }.unwrap().request.init_image.unwrap();
        assert_eq!((init.mask.unwrap().pixels.len(), init.strength), (4, DEFAULT_STRENGTH));
    }
}
