//! Load and generate parameters: the C structs, their `*_init` functions, and their conversion
//! to SDK options. Fields are only ever appended (see `struct_size`).

use std::ffi::{c_char, c_void};
use std::mem::{offset_of, size_of};
use std::path::PathBuf;

use sdk::{
    Device, EnhanceOptions, GenerateRequest, GpuOptions, GrayImage, InitImage, LoadOptions, MemoryMode, Prompt,
    ResolutionRange, RgbImage, TensorRtPrecision, Tf32,
};

use crate::args::{self, Versioned};
use crate::enhancer::{self, zimage_enhance_params, zimage_enhancer};
use crate::error::{zimage_result, Failure};
use crate::log::{zimage_log_callback, Logger};
use crate::panic::guard;
use crate::prompt::zimage_prompt_embedding;

/// Where graphs run. Passed as a `uint32_t` in the parameter structs.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum zimage_device {
    /// CPU for `device`; "the same as `device`" for `transformer_device`.
    Default = 0,
    Cpu = 1,
    /// NVIDIA CUDA (needs onnxruntime-gpu beside libzimage).
    Cuda = 2,
    /// NVIDIA TensorRT (needs onnxruntime-gpu and TensorRT 10).
    Tensorrt = 3,
}

/// When a pipeline's graphs are in memory. Passed as a `uint32_t` in `zimage_load_params`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum zimage_memory_mode {
    /// Every graph is loaded once and stays loaded: fastest.
    Resident = 0,
    /// Each graph is loaded for its stage only (text encoder, transformer, VAE), so one model
    /// is in memory at a time; costs a session creation per stage per generation.
    Sequential = 1,
}

/// Precision TensorRT may use inside its engines (inputs and outputs stay float32). Passed as a
/// `uint32_t` in `zimage_load_params`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum zimage_tensorrt_precision {
    /// The default: Z-Image is trained in bf16, and fp16 activations can overflow into NaN
    /// (black images). Needs an Ampere or newer GPU; use FP32 on older ones.
    Bf16 = 0,
    Fp16 = 1,
    Fp32 = 2,
}

/// Where CUDA may run float32 work in TF32 (`zimage_load_params.cuda_tf32`, a `uint32_t`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum zimage_tf32 {
    /// The default: PyTorch's defaults, so float32 packages give the reference's image (TF32
    /// for the VAE's convolutions, full float32 for the text encoder and transformer).
    LikePytorch = 0,
    /// Full float32 everywhere.
    Off = 1,
    /// TF32 in every graph: fastest, but the transformer drifts from the reference.
    On = 2,
}

/// `seed` value that asks for a random seed; the one used is reported by
/// `zimage_image_list_seed()`.
pub const ZIMAGE_RANDOM_SEED: u64 = u64::MAX;

/// An 8-bit image in memory: rows top to bottom, `stride` bytes from one row to the next,
/// pixels packed within a row (RGB: 3 bytes per pixel, masks: 1 byte).
///
/// As an input (`init_image`, `mask`), the caller owns the pixels and they only need to live
/// during the call; `pixels == NULL` means "no image"; `stride == 0` means packed rows.
/// As an output (`zimage_image_list_get()`), the pixels belong to the image list.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct zimage_image {
    pub pixels: *const u8,
    pub width: u32,
    pub height: u32,
    pub stride: usize,
}

impl zimage_image {
    const NONE: zimage_image = zimage_image { pixels: std::ptr::null(), width: 0, height: 0, stride: 0 };
}

/// How a pipeline is loaded. Fill it with `zimage_load_params_init()`, then change fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct zimage_load_params {
    /// `sizeof(zimage_load_params)`, set by `zimage_load_params_init()`. Lets later versions
    /// append fields without breaking callers built against this header.
    pub struct_size: usize,
    /// A `zimage_device` for every graph. Default: CPU.
    pub device: u32,
    /// The GPU index for CUDA and TensorRT (>= 0).
    pub device_id: i32,
    /// A `zimage_device` for the transformer alone (e.g. TensorRT while the rest runs on
    /// CUDA). Default: the same as `device`.
    pub transformer_device: u32,
    pub transformer_device_id: i32,
    /// Intra-op threads per graph; 0 lets ONNX Runtime choose (one per physical core).
    pub threads: u32,
    /// Check the SHA-256 of every package file, the large ones too (slow).
    pub verify_checksums: bool,
    /// When the requested provider cannot be set up, run on CPU (and log a warning) instead
    /// of failing with `ZIMAGE_RESULT_PROVIDER`.
    pub allow_cpu_fallback: bool,
    /// Path of the ONNX Runtime shared library (UTF-8); NULL searches: `ORT_DYLIB_PATH`, then
    /// beside the executable, then beside libzimage. Copied during the call.
    pub runtime_library: *const c_char,
    /// Receives this pipeline's log messages; NULL for none.
    pub log_callback: zimage_log_callback,
    /// Passed back to `log_callback` unchanged. Must stay valid until the pipeline is freed.
    pub log_user_data: *mut c_void,
    /// A `zimage_memory_mode`. Default: `ZIMAGE_MEMORY_MODE_RESIDENT`.
    pub memory_mode: u32,
    /// GPU settings (appended after `memory_mode`: a caller with an older, smaller struct gets the
    /// defaults; ignored on CPU). The resolution range, `max_images`, `guidance` and
    /// `typical_caption_tokens` shape the TensorRT optimisation profiles: they are checked when a
    /// graph runs on TensorRT (`ZIMAGE_RESULT_INVALID_REQUEST` when out of range), and a request
    /// outside them is refused rather than rebuilding engines.
    ///
    /// `tensorrt_cache_dir`: where TensorRT keeps engines and timing caches (UTF-8); NULL =
    /// `$XDG_CACHE_HOME/zimage/tensorrt` (or `~/.cache/zimage/tensorrt`). Copied during the call.
    pub tensorrt_cache_dir: *const c_char,
    /// A `zimage_tensorrt_precision`. Default: `ZIMAGE_TENSORRT_PRECISION_BF16`.
    pub tensorrt_precision: u32,
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
    pub guidance: bool,
    /// Caption tokens the profiles optimise for, 1..=the model's limit. Default 128.
    pub typical_caption_tokens: u32,
    /// Cap on the CUDA memory arena in bytes; 0 = no cap (the default).
    pub cuda_memory_limit: usize,
    /// CPU: a folder where ONNX Runtime's optimised transformer and VAE graphs are kept, so
    /// later loads skip graph optimisation. NULL (the default) = off. UTF-8.
    pub optimized_model_cache: *const c_char,
    /// CUDA: a `zimage_tf32`, where float32 work may run in TF32. Default
    /// `ZIMAGE_TF32_LIKE_PYTORCH`.
    pub cuda_tf32: u32,
    /// CPU: decode with the package's Winograd VAE decoder (`vae_decoder_cpu`): about 15-20 %
    /// faster decoding, more memory while decoding, images within one 8-bit level. Loading
    /// fails with `ZIMAGE_RESULT_INVALID_REQUEST` when the package has none. Default false.
    pub winograd_vae: bool,
}

unsafe impl Versioned for zimage_load_params {
    const FIRST_VERSION_SIZE: usize = offset_of!(zimage_load_params, memory_mode) + size_of::<u32>();

    fn defaults() -> Self {
        let gpu = GpuOptions::default();
        zimage_load_params {
            struct_size: size_of::<Self>(),
            device: zimage_device::Default as u32,
            device_id: 0,
            transformer_device: zimage_device::Default as u32,
            transformer_device_id: 0,
            threads: 0,
            verify_checksums: false,
            allow_cpu_fallback: false,
            runtime_library: std::ptr::null(),
            log_callback: None,
            log_user_data: std::ptr::null_mut(),
            memory_mode: zimage_memory_mode::Resident as u32,
            // The SDK's defaults, so the C API cannot drift from them.
            tensorrt_cache_dir: std::ptr::null(),
            tensorrt_precision: match gpu.tensorrt.precision {
                TensorRtPrecision::Bf16 => zimage_tensorrt_precision::Bf16,
                TensorRtPrecision::Fp16 => zimage_tensorrt_precision::Fp16,
                TensorRtPrecision::Fp32 => zimage_tensorrt_precision::Fp32,
            } as u32,
            min_width: gpu.tensorrt.resolutions.min.0,
            min_height: gpu.tensorrt.resolutions.min.1,
            opt_width: gpu.tensorrt.resolutions.opt.0,
            opt_height: gpu.tensorrt.resolutions.opt.1,
            max_width: gpu.tensorrt.resolutions.max.0,
            max_height: gpu.tensorrt.resolutions.max.1,
            max_images: gpu.tensorrt.max_images,
            guidance: gpu.tensorrt.guidance,
            typical_caption_tokens: gpu.tensorrt.typical_caption_tokens,
            cuda_memory_limit: gpu.cuda_memory_limit.unwrap_or(0),
            optimized_model_cache: std::ptr::null(),
            cuda_tf32: match gpu.cuda_tf32 {
                Tf32::LikePyTorch => zimage_tf32::LikePytorch,
                Tf32::Off => zimage_tf32::Off,
                Tf32::On => zimage_tf32::On,
            } as u32,
            winograd_vae: false,
        }
    }
}

/// Called after every denoising step with the steps done so far (1..=total) and the seconds
/// since the generation started. Return true to go on, false to stop: the generation then
/// fails with `ZIMAGE_RESULT_CANCELLED`. Called on the thread that called `zimage_generate()`.
pub type zimage_progress_callback =
    Option<unsafe extern "C" fn(step: u32, total: u32, elapsed_seconds: f64, user_data: *mut c_void) -> bool>;

/// One generation. Fill it with `zimage_generate_params_init()` (Z-Image-Turbo's recommended
/// settings: 1024x1024, 8 steps, no guidance, a random seed), then change fields. Pointers in it
/// are borrowed for the duration of `zimage_generate()` only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct zimage_generate_params {
    /// `sizeof(zimage_generate_params)`, set by `zimage_generate_params_init()`.
    pub struct_size: usize,
    /// The prompt, UTF-8. Exactly one of `prompt` and `prompt_embedding` must be set.
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
    /// Images generated from this prompt, 1..=64.
    pub count: u32,
    /// Prompt tokens kept (chat template included); 0 = the package's default (512).
    pub max_sequence_length: u32,
    /// Keep the final latents, for `zimage_image_list_latents()`.
    pub return_latents: bool,
    /// Image-to-image: start from this RGB picture (same size as the request) instead of pure
    /// noise. `init_image.pixels == NULL` (the default) means text-to-image.
    pub init_image: zimage_image,
    /// Inpainting: a 1-channel mask of the same size, white (>= 128) = repaint. Needs
    /// `init_image`. `mask.pixels == NULL` means no mask.
    pub mask: zimage_image,
    /// How much of `init_image` is re-generated, 0..=1 (1 = all of it).
    pub strength: f64,
    /// Called after every denoising step; NULL for none.
    pub progress_callback: zimage_progress_callback,
    /// Passed back to `progress_callback` unchanged.
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
}

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
            return_latents: sdk.return_latents,
            init_image: zimage_image::NONE,
            mask: zimage_image::NONE,
            strength: DEFAULT_STRENGTH,
            progress_callback: None,
            progress_user_data: std::ptr::null_mut(),
            enhancer: std::ptr::null(),
            enhance_params: std::ptr::null(),
        }
    }
}

/// Fills `params` with the defaults (CPU, no log callback) and sets `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn zimage_load_params_init(params: *mut zimage_load_params) -> zimage_result {
    guard(|| {
        let params = unsafe { params.as_mut() }.ok_or_else(|| Failure::null("params"))?;
        *params = zimage_load_params::defaults();
        Ok(())
    })
}

/// Fills `params` with Z-Image-Turbo's recommended settings and sets `struct_size`; the
/// prompt is left NULL.
#[no_mangle]
pub unsafe extern "C" fn zimage_generate_params_init(params: *mut zimage_generate_params) -> zimage_result {
    guard(|| {
        let params = unsafe { params.as_mut() }.ok_or_else(|| Failure::null("params"))?;
        *params = zimage_generate_params::defaults();
        Ok(())
    })
}

/// Load parameters converted for the SDK, plus the part the C layer keeps (the logger).
pub(crate) struct Load {
    pub options: LoadOptions,
    pub logger: Option<Logger>,
}

/// Reads load parameters; NULL means all defaults.
pub(crate) unsafe fn load_options(params: *const zimage_load_params) -> Result<Load, Failure> {
    let p =
        if params.is_null() { zimage_load_params::defaults() } else { unsafe { args::versioned(params, "params") }? };
    let main_device = device(p.device, p.device_id, "params->device")?.unwrap_or(Device::Cpu);
    let transformer_device = device(p.transformer_device, p.transformer_device_id, "params->transformer_device")?;
    let runtime_library =
        unsafe { args::optional_string(p.runtime_library, "params->runtime_library") }?.map(PathBuf::from);
    let cache_dir =
        unsafe { args::optional_string(p.tensorrt_cache_dir, "params->tensorrt_cache_dir") }?.map(PathBuf::from);
    let optimized_model_cache =
        unsafe { args::optional_string(p.optimized_model_cache, "params->optimized_model_cache") }?.map(PathBuf::from);
    let mut gpu = GpuOptions::default();
    gpu.tensorrt.cache_dir = cache_dir;
    gpu.tensorrt.precision = tensorrt_precision(p.tensorrt_precision)?;
    gpu.tensorrt.resolutions = ResolutionRange {
        min: (p.min_width, p.min_height),
        opt: (p.opt_width, p.opt_height),
        max: (p.max_width, p.max_height),
    };
    gpu.tensorrt.max_images = p.max_images;
    gpu.tensorrt.guidance = p.guidance;
    gpu.tensorrt.typical_caption_tokens = p.typical_caption_tokens;
    gpu.cuda_memory_limit = (p.cuda_memory_limit > 0).then_some(p.cuda_memory_limit);
    gpu.cuda_tf32 = tf32(p.cuda_tf32)?;
    let mut options = LoadOptions::default();
    options.runtime_library = runtime_library;
    options.gpu = gpu;
    options.device = main_device;
    options.transformer_device = transformer_device;
    options.threads = (p.threads > 0).then_some(p.threads as usize);
    options.verify_checksums = p.verify_checksums;
    options.allow_cpu_fallback = p.allow_cpu_fallback;
    options.memory_mode = memory_mode(p.memory_mode)?;
    options.optimized_model_cache = optimized_model_cache;
    options.winograd_vae = p.winograd_vae;
    Ok(Load { options, logger: Logger::new(p.log_callback, p.log_user_data) })
}

fn memory_mode(value: u32) -> Result<MemoryMode, Failure> {
    match value {
        v if v == zimage_memory_mode::Resident as u32 => Ok(MemoryMode::Resident),
        v if v == zimage_memory_mode::Sequential as u32 => Ok(MemoryMode::Sequential),
        other => {
            Err(Failure::invalid(format!("params->memory_mode is {other}, which is not a zimage_memory_mode (0..=1)")))
        }
    }
}

fn tensorrt_precision(value: u32) -> Result<TensorRtPrecision, Failure> {
    match value {
        v if v == zimage_tensorrt_precision::Bf16 as u32 => Ok(TensorRtPrecision::Bf16),
        v if v == zimage_tensorrt_precision::Fp16 as u32 => Ok(TensorRtPrecision::Fp16),
        v if v == zimage_tensorrt_precision::Fp32 as u32 => Ok(TensorRtPrecision::Fp32),
        other => Err(Failure::invalid(format!(
            "params->tensorrt_precision is {other}, which is not a zimage_tensorrt_precision (0..=2)"
        ))),
    }
}

fn tf32(value: u32) -> Result<Tf32, Failure> {
    match value {
        v if v == zimage_tf32::LikePytorch as u32 => Ok(Tf32::LikePyTorch),
        v if v == zimage_tf32::Off as u32 => Ok(Tf32::Off),
        v if v == zimage_tf32::On as u32 => Ok(Tf32::On),
        other => Err(Failure::invalid(format!("params->cuda_tf32 is {other}, which is not a zimage_tf32 (0..=2)"))),
    }
}

/// A `zimage_device` number and GPU index; `Ok(None)` for `ZIMAGE_DEVICE_DEFAULT`.
fn device(kind: u32, id: i32, what: &str) -> Result<Option<Device>, Failure> {
    if id < 0 {
        return Err(Failure::invalid(format!("{what}_id is {id}; GPU indices start at 0")));
    }
    match kind {
        k if k == zimage_device::Default as u32 => Ok(None),
        k if k == zimage_device::Cpu as u32 => Ok(Some(Device::Cpu)),
        k if k == zimage_device::Cuda as u32 => Ok(Some(Device::Cuda { device_id: id })),
        k if k == zimage_device::Tensorrt as u32 => Ok(Some(Device::TensorRt { device_id: id })),
        other => Err(Failure::invalid(format!("{what} is {other}, which is not a zimage_device (0..=3)"))),
    }
}

/// A generate request converted for the SDK, plus the progress callback the C layer calls.
pub(crate) struct Generate {
    pub request: GenerateRequest,
    pub progress: zimage_progress_callback,
    pub progress_user_data: *mut c_void,
    /// The enhancer to run first, with its options.
    pub enhance: Option<(*const zimage_enhancer, EnhanceOptions)>,
}

/// Reads generate parameters and copies everything they point to.
pub(crate) unsafe fn generate_request(params: *const zimage_generate_params) -> Result<Generate, Failure> {
    let p = unsafe { args::versioned(params, "params") }?;
    let positive = unsafe { prompt(p.prompt, p.prompt_embedding, "params->prompt") }?
        .ok_or_else(|| Failure::null("params->prompt (and params->prompt_embedding)"))?;
    let negative = unsafe { prompt(p.negative_prompt, p.negative_prompt_embedding, "params->negative_prompt") }?;
    let init_image = unsafe { init_image(&p) }?;
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
    request.return_latents = p.return_latents;
    request.init_image = init_image;
    let enhance = if p.enhancer.is_null() {
        None
    } else {
        let options = unsafe { enhancer::enhance_options(p.enhance_params, "params->enhance_params") }?;
        Some((p.enhancer, options))
    };
    Ok(Generate { request, progress: p.progress_callback, progress_user_data: p.progress_user_data, enhance })
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

/// Copies a caller's image into packed rows; `None` when `pixels` is NULL.
unsafe fn read_pixels(
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
    let mut packed = Vec::with_capacity(row * height);
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

    #[test]
    fn devices_are_checked() {
        assert_eq!(device(0, 0, "d").unwrap(), None);
        assert_eq!(device(3, 1, "d").unwrap(), Some(Device::TensorRt { device_id: 1 }));
        assert_eq!(code(device(4, 0, "d")), zimage_result::InvalidArgument);
        assert_eq!(code(device(2, -1, "d")), zimage_result::InvalidArgument);
        let mut p = zimage_load_params::defaults();
        p.transformer_device = 2;
        let load = unsafe { load_options(&p) }.unwrap();
        assert_eq!(
            (load.options.device, load.options.transformer_device),
            (Device::Cpu, Some(Device::Cuda { device_id: 0 }))
        );
        assert_eq!(unsafe { load_options(std::ptr::null()) }.unwrap().options.threads, None);
        p.memory_mode = 1;
        assert_eq!(unsafe { load_options(&p) }.unwrap().options.memory_mode, MemoryMode::Sequential);
        p.memory_mode = 2;
        assert_eq!(code(unsafe { load_options(&p) }), zimage_result::InvalidArgument);
    }

    #[test]
    fn optimized_model_cache_reaches_the_sdk() {
        let mut p = zimage_load_params::defaults();
        assert_eq!(unsafe { load_options(&p) }.unwrap().options.optimized_model_cache, None);
        p.optimized_model_cache = c"/tmp/zimage-opt".as_ptr();
        let options = unsafe { load_options(&p) }.unwrap().options;
        assert_eq!(options.optimized_model_cache, Some(PathBuf::from("/tmp/zimage-opt")));
        p.optimized_model_cache = c"\xff".as_ptr();
        assert_eq!(code(unsafe { load_options(&p) }), zimage_result::InvalidArgument);
    }

    #[test]
    fn gpu_options_default_to_the_sdk_and_are_checked() {
        let mut p = zimage_load_params::defaults();
        assert_eq!(unsafe { load_options(&p) }.unwrap().options.gpu, GpuOptions::default());
        p.tensorrt_cache_dir = c"/tmp/engines".as_ptr();
        p.tensorrt_precision = zimage_tensorrt_precision::Fp32 as u32;
        p.max_width = 2048;
        p.max_images = 4;
        p.guidance = true;
        p.cuda_memory_limit = 1 << 30;
        p.cuda_tf32 = zimage_tf32::Off as u32;
        let gpu = unsafe { load_options(&p) }.unwrap().options.gpu;
        assert_eq!(gpu.tensorrt.cache_dir, Some(PathBuf::from("/tmp/engines")));
        assert_eq!(gpu.tensorrt.precision, TensorRtPrecision::Fp32);
        assert_eq!(
            (gpu.tensorrt.resolutions.max, gpu.tensorrt.max_images, gpu.tensorrt.guidance),
            ((2048, 1536), 4, true)
        );
        assert_eq!(gpu.cuda_memory_limit, Some(1 << 30));
        assert_eq!(gpu.cuda_tf32, Tf32::Off);
        p.tensorrt_precision = 3;
        assert_eq!(code(unsafe { load_options(&p) }), zimage_result::InvalidArgument);
        p.tensorrt_precision = zimage_tensorrt_precision::Fp32 as u32;
        p.cuda_tf32 = 3;
        assert_eq!(code(unsafe { load_options(&p) }), zimage_result::InvalidArgument);
        p.cuda_tf32 = zimage_tf32::Off as u32;
        p.winograd_vae = true;
        assert!(unsafe { load_options(&p) }.unwrap().options.winograd_vae);
        // A caller built against the first version: its struct ends at memory_mode.
        let mut old = zimage_load_params::defaults();
        old.struct_size = zimage_load_params::FIRST_VERSION_SIZE;
        old.max_images = 0;
        assert_eq!(unsafe { load_options(&old) }.unwrap().options.gpu, GpuOptions::default());
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
