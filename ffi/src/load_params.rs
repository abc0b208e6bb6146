//! Load parameters: `zimage_load_params`, the enums it carries as `uint32_t` (device, memory
//! mode, TF32), and their conversion to the SDK's `LoadOptions`. Fields are only ever appended
//! (see `struct_size`).

use std::ffi::{c_char, c_void};
use std::mem::{offset_of, size_of};
use std::path::PathBuf;

use sdk::{Device, GpuOptions, LoadOptions, MemoryMode, Tf32, VaeTiling};

use crate::args::{self, CBool, Versioned};
use crate::c_enum::{c_enum, CEnum};
use crate::error::{zimage_result, Failure};
use crate::log::{zimage_log_callback, Logger};
use crate::panic::guard;
use crate::tensorrt_params::{self, zimage_tensorrt_params};

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

// No SDK twin: `Default` has none, and the SDK's devices carry their GPU index.
c_enum!(zimage_device { Default, Cpu, Cuda, Tensorrt });

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

c_enum!(zimage_memory_mode <=> MemoryMode { Resident <=> Resident, Sequential <=> Sequential });

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

c_enum!(zimage_tf32 <=> Tf32 { LikePytorch <=> LikePyTorch, Off <=> Off, On <=> On });

/// How a pipeline (or an enhancer) is loaded. Fill it with `zimage_load_params_init()`, then
/// change fields.
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
    /// Intra-op threads per graph, at most 1024 (`ZIMAGE_RESULT_INVALID_ARGUMENT` past it); 0
    /// lets ONNX Runtime choose (one per physical core).
    pub threads: u32,
    /// Check the SHA-256 of every package file, the large ones too (slow).
    pub verify_checksums: CBool,
    /// When the requested provider cannot be set up, run on CPU (and log a warning per graph,
    /// with the provider's error) instead of failing with `ZIMAGE_RESULT_PROVIDER`.
    pub allow_cpu_fallback: CBool,
    /// Path of the ONNX Runtime shared library (UTF-8); NULL searches: `ORT_DYLIB_PATH`, then
    /// beside the executable, then beside libzimage. Copied during the call.
    pub runtime_library: *const c_char,
    /// Receives this pipeline's log messages; NULL for none.
    pub log_callback: zimage_log_callback,
    /// Passed back to `log_callback` unchanged. Must stay valid until the pipeline is freed.
    pub log_user_data: *mut c_void,
    /// A `zimage_memory_mode`. Default: `ZIMAGE_MEMORY_MODE_RESIDENT`.
    pub memory_mode: u32,
    /// TensorRT settings (fields from here on are read only when the caller's `struct_size`
    /// covers them; an older, smaller struct gets the defaults). NULL (the default) = the
    /// defaults of `zimage_tensorrt_params_init()`. Read during the call only; ignored unless a
    /// graph runs on TensorRT.
    pub tensorrt: *const zimage_tensorrt_params,
    /// CUDA: cap on the memory arena in bytes; 0 = no cap (the default).
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
    pub winograd_vae: CBool,
    /// The package's ControlNet (its name in the manifest, UTF-8) to load as the transformer:
    /// its combined graph is then the only transformer session ever created, instead of the
    /// plain transformer first and `zimage_pipeline_set_controlnet()` after. NULL (the
    /// default): none. Unknown or not fitting: `ZIMAGE_RESULT_PACKAGE`. Copied during the call.
    pub controlnet: *const c_char,
    /// Decode (and encode input pictures) larger than `vae_tile_size` pixels in overlapping
    /// square tiles of that size, blended over `vae_tile_overlap` pixels (diffusers'
    /// `vae.enable_tiling()`; a quarter of the tile is its usual overlap): a fraction of the
    /// VAE's memory, different pixels (each tile is normalised on its own: keep tiles large).
    /// Both multiples of the VAE's scale factor (8), the overlap smaller than
    /// the tile, and not with a VAE on TensorRT: otherwise loading fails with
    /// `ZIMAGE_RESULT_INVALID_REQUEST`. 0 (the default): whole images.
    pub vae_tile_size: u32,
    pub vae_tile_overlap: u32,
    /// CPU: decode with the package's int8 VAE decoder (`vae_decoder_int8`, written by
    /// `quantize_package.py --int8-vae`): about 2x faster decoding, at a cost in image quality
    /// (docs/quantization.md). Loading fails with `ZIMAGE_RESULT_INVALID_REQUEST` when the
    /// package has none, or with `winograd_vae`. Default false.
    pub int8_vae: CBool,
}

// The first version ended at `memory_mode`; its layout is unchanged, and its sizeof (padded to
// the 8-byte alignment of the pointers) is where `tensorrt` starts. zimage 0.1 (before the
// TensorRT fields moved into `zimage_tensorrt_params`) had 120 to 136 bytes, which this struct
// reached with `int8_vae`: the SONAME moved from libzimage.so.0 to libzimage.so.1 then
// (ffi/build.rs), so those programs cannot load this library and their structs are never read
// as this one.
unsafe impl Versioned for zimage_load_params {
    const FIRST_VERSION_SIZE: usize = offset_of!(zimage_load_params, tensorrt);

    fn defaults() -> Self {
        // The SDK's defaults, so the C API cannot drift from them.
        let sdk = LoadOptions::default();
        zimage_load_params {
            struct_size: size_of::<Self>(),
            device: zimage_device::Default.value(),
            device_id: 0,
            transformer_device: zimage_device::Default.value(),
            transformer_device_id: 0,
            threads: 0,
            verify_checksums: sdk.verify_checksums.into(),
            allow_cpu_fallback: sdk.allow_cpu_fallback.into(),
            runtime_library: std::ptr::null(),
            log_callback: None,
            log_user_data: std::ptr::null_mut(),
            memory_mode: zimage_memory_mode::from(sdk.memory_mode).value(),
            tensorrt: std::ptr::null(),
            cuda_memory_limit: sdk.gpu.cuda_memory_limit.unwrap_or(0),
            optimized_model_cache: std::ptr::null(),
            cuda_tf32: zimage_tf32::from(sdk.gpu.cuda_tf32).value(),
            winograd_vae: sdk.winograd_vae.into(),
            controlnet: std::ptr::null(),
            vae_tile_size: sdk.vae_tiling.map_or(0, |t| t.tile_size),
            vae_tile_overlap: sdk.vae_tiling.map_or(0, |t| t.overlap),
            int8_vae: sdk.int8_vae.into(),
        }
    }
}

/// Fills `params` with the defaults (CPU, no log callback, TensorRT defaults) and sets
/// `struct_size`.
///
/// Writes this library's whole struct. Kept for programs built against headers without the init
/// macros; the header's `zimage_load_params_init` macro calls `zimage_load_params_init_sized()`
/// instead.
#[no_mangle]
pub unsafe extern "C" fn zimage_load_params_init(params: *mut zimage_load_params) -> zimage_result {
    guard(|| unsafe { args::init_sized(params, size_of::<zimage_load_params>(), zimage_load_params::defaults()) })
}

/// Like `zimage_load_params_init()`, but writes only the first `size` bytes, with
/// `struct_size = size`: `size` is the caller's `sizeof(zimage_load_params)`, which the header's
/// `zimage_load_params_init` macro passes, so a program built against an older, smaller header gets
/// its own struct filled. A `size` that is no version's `sizeof` (one from a newer header included)
/// is `ZIMAGE_RESULT_INVALID_ARGUMENT` and writes
/// only `struct_size`, to 0 (when `size` holds it), so that every call refuses the struct.
#[no_mangle]
pub unsafe extern "C" fn zimage_load_params_init_sized(params: *mut zimage_load_params, size: usize) -> zimage_result {
    guard(|| unsafe { args::init_sized(params, size, zimage_load_params::defaults()) })
}

/// Load parameters converted for the SDK, plus the part the C layer keeps (the logger).
pub(crate) struct Load {
    pub options: LoadOptions,
    pub logger: Option<Logger>,
}

/// Most intra-op threads per graph: `Pipeline::load`'s bound, checked here because the prompt
/// enhancer's loads (`zimage_enhancer_load()`, `_attach()`) do not check it.
const MAX_THREADS: u32 = sdk::MAX_THREADS as u32;

/// Reads load parameters and copies everything they point to; NULL means all defaults.
pub(crate) unsafe fn load_options(params: *const zimage_load_params) -> Result<Load, Failure> {
    let p =
        if params.is_null() { zimage_load_params::defaults() } else { unsafe { args::versioned(params, "params") }? };
    if p.threads > MAX_THREADS {
        return Err(Failure::invalid(format!(
            "params->threads is {}; at most {MAX_THREADS} (0 lets ONNX Runtime choose)",
            p.threads
        )));
    }
    let main_device = device(p.device, p.device_id, "params->device")?.unwrap_or(Device::Cpu);
    let transformer_device = device(p.transformer_device, p.transformer_device_id, "params->transformer_device")?;
    let runtime_library =
        unsafe { args::optional_string(p.runtime_library, "params->runtime_library") }?.map(PathBuf::from);
    let optimized_model_cache =
        unsafe { args::optional_string(p.optimized_model_cache, "params->optimized_model_cache") }?.map(PathBuf::from);
    let controlnet = unsafe { args::optional_string(p.controlnet, "params->controlnet") }?;
    let mut gpu = GpuOptions::default();
    gpu.tensorrt = unsafe { tensorrt_params::tensorrt_options(p.tensorrt, "params->tensorrt") }?;
    gpu.cuda_memory_limit = (p.cuda_memory_limit > 0).then_some(p.cuda_memory_limit);
    gpu.cuda_tf32 = zimage_tf32::from_c(p.cuda_tf32, "params->cuda_tf32")?.into();
    let mut options = LoadOptions::default();
    options.runtime_library = runtime_library;
    options.gpu = gpu;
    options.device = main_device;
    options.transformer_device = transformer_device;
    options.threads = (p.threads > 0).then_some(p.threads as usize);
    options.verify_checksums = p.verify_checksums.get();
    options.allow_cpu_fallback = p.allow_cpu_fallback.get();
    options.memory_mode = zimage_memory_mode::from_c(p.memory_mode, "params->memory_mode")?.into();
    options.optimized_model_cache = optimized_model_cache;
    options.winograd_vae = p.winograd_vae.get();
    options.int8_vae = p.int8_vae.get();
    options.controlnet = controlnet.map(|name| name.to_string());
    options.vae_tiling =
        (p.vae_tile_size > 0).then_some(VaeTiling { tile_size: p.vae_tile_size, overlap: p.vae_tile_overlap });
    Ok(Load { options, logger: Logger::new(p.log_callback, p.log_user_data) })
}

/// A `zimage_device` number and GPU index; `Ok(None)` for `ZIMAGE_DEVICE_DEFAULT`.
fn device(kind: u32, id: i32, what: &str) -> Result<Option<Device>, Failure> {
    if id < 0 {
        return Err(Failure::invalid(format!("{what}_id is {id}; GPU indices start at 0")));
    }
    Ok(match zimage_device::from_c(kind, what)? {
        zimage_device::Default => None,
        zimage_device::Cpu => Some(Device::Cpu),
        zimage_device::Cuda => Some(Device::Cuda { device_id: id }),
        zimage_device::Tensorrt => Some(Device::TensorRt { device_id: id }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdk::{TensorRtOptions, TensorRtPrecision};

    use crate::tensorrt_params::zimage_tensorrt_precision;

    fn code<T>(r: Result<T, Failure>) -> zimage_result {
        r.err().map_or(zimage_result::Ok, |f| f.code)
    }

    #[test]
    fn defaults_are_the_sdks() {
        let mut p = std::mem::MaybeUninit::<zimage_load_params>::uninit();
        assert_eq!(unsafe { zimage_load_params_init(p.as_mut_ptr()) }, zimage_result::Ok);
        let p = unsafe { p.assume_init() };
        assert_eq!(p.struct_size, size_of::<zimage_load_params>());
        assert!(p.tensorrt.is_null());
        let options = unsafe { load_options(&p) }.unwrap().options;
        assert_eq!((options.device, options.memory_mode, options.threads), (Device::Cpu, MemoryMode::Resident, None));
        assert_eq!(options.gpu, GpuOptions::default());
        assert_eq!(unsafe { load_options(std::ptr::null()) }.unwrap().options.gpu, GpuOptions::default());
        assert_eq!(unsafe { zimage_load_params_init(std::ptr::null_mut()) }, zimage_result::NullArgument);
    }

    #[test]
    fn devices_are_checked() {
        assert_eq!(device(0, 0, "d").unwrap(), None);
        assert_eq!(device(3, 1, "d").unwrap(), Some(Device::TensorRt { device_id: 1 }));
        let bad = device(4, 0, "params->device").unwrap_err();
        assert_eq!(bad.code, zimage_result::InvalidArgument);
        assert_eq!(bad.message, "params->device is 4, which is not a zimage_device (0..=3)");
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
        let bad = unsafe { load_options(&p) }.err().unwrap();
        assert_eq!(bad.code, zimage_result::InvalidArgument);
        assert_eq!(bad.message, "params->memory_mode is 2, which is not a zimage_memory_mode (0..=1)");
    }

    /// The enhancer's loads share this conversion; `Pipeline::load` has the same bound.
    #[test]
    fn threads_are_bounded_for_every_load() {
        let mut p = zimage_load_params::defaults();
        p.threads = MAX_THREADS;
        assert_eq!(unsafe { load_options(&p) }.unwrap().options.threads, Some(1024));
        p.threads = MAX_THREADS + 1;
        let bad = unsafe { load_options(&p) }.err().unwrap();
        assert_eq!(bad.code, zimage_result::InvalidArgument);
        assert_eq!(bad.message, "params->threads is 1025; at most 1024 (0 lets ONNX Runtime choose)");
        p.threads = u32::MAX;
        let package = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny-qwen3-enhancer\0");
        let mut enhancer = std::ptr::null_mut();
        let code = unsafe { crate::enhancer::zimage_enhancer_load(package.as_ptr().cast(), &p, &mut enhancer) };
        assert_eq!((code, enhancer), (zimage_result::InvalidArgument, std::ptr::null_mut()));
    }

    /// C code that fills the struct with memset (or a byte type) can leave any byte in a `bool`
    /// field: anything but 0 reads as true.
    #[test]
    fn bool_fields_take_any_byte() {
        let mut p = zimage_load_params::defaults();
        for field in [&mut p.verify_checksums, &mut p.allow_cpu_fallback, &mut p.winograd_vae, &mut p.int8_vae] {
            unsafe { (field as *mut CBool).cast::<u8>().write(0xa5) };
        }
        let options = unsafe { load_options(&p) }.unwrap().options;
        assert!(options.verify_checksums && options.allow_cpu_fallback && options.winograd_vae && options.int8_vae);
        unsafe { (&mut p.int8_vae as *mut CBool).cast::<u8>().write(0) };
        assert!(!unsafe { load_options(&p) }.unwrap().options.int8_vae);
    }

    /// A `struct_size` that ends inside a field (here half of the `tensorrt` pointer, which
    /// would then point anywhere) is refused, whatever the struct holds.
    #[test]
    fn a_size_inside_a_field_is_refused() {
        let trt = zimage_tensorrt_params::defaults();
        let mut p = zimage_load_params::defaults();
        p.tensorrt = &trt;
        for size in [offset_of!(zimage_load_params, tensorrt) + 4, size_of::<zimage_load_params>() - 1] {
            p.struct_size = size;
            let bad = unsafe { load_options(&p) }.err().unwrap();
            assert_eq!(bad.code, zimage_result::InvalidArgument);
            assert!(bad.message.starts_with(&format!("params->struct_size is {size}; expected ")), "{}", bad.message);
        }
        // Every sizeof a header had is a multiple of the alignment, and still accepted.
        p.struct_size = offset_of!(zimage_load_params, tensorrt) + 8;
        assert!(unsafe { load_options(&p) }.is_ok());
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
    fn gpu_options_reach_the_sdk_and_are_checked() {
        let mut trt = zimage_tensorrt_params::defaults();
        trt.cache_dir = c"/tmp/engines".as_ptr();
        trt.precision = zimage_tensorrt_precision::Fp32 as u32;
        trt.max_images = 4;
        let mut p = zimage_load_params::defaults();
        p.tensorrt = &trt;
        p.cuda_memory_limit = 1 << 30;
        p.cuda_tf32 = zimage_tf32::Off as u32;
        let gpu = unsafe { load_options(&p) }.unwrap().options.gpu;
        assert_eq!(gpu.tensorrt.cache_dir, Some(PathBuf::from("/tmp/engines")));
        assert_eq!((gpu.tensorrt.precision, gpu.tensorrt.max_images), (TensorRtPrecision::Fp32, 4));
        assert_eq!(gpu.cuda_memory_limit, Some(1 << 30));
        assert_eq!(gpu.cuda_tf32, Tf32::Off);
        trt.precision = 3;
        p.tensorrt = &trt;
        let bad = unsafe { load_options(&p) }.err().unwrap();
        assert_eq!(bad.message, "params->tensorrt->precision is 3, which is not a zimage_tensorrt_precision (0..=2)");
        trt.precision = 0;
        trt.struct_size = 0;
        p.tensorrt = &trt;
        let bad = unsafe { load_options(&p) }.err().unwrap();
        assert!(bad.message.starts_with("params->tensorrt->struct_size is 0"), "{}", bad.message);
        trt.struct_size = size_of::<zimage_tensorrt_params>();
        p.tensorrt = &trt;
        p.cuda_tf32 = 3;
        let bad = unsafe { load_options(&p) }.err().unwrap();
        assert_eq!(bad.message, "params->cuda_tf32 is 3, which is not a zimage_tf32 (0..=2)");
        p.cuda_tf32 = zimage_tf32::Off as u32;
        p.winograd_vae = CBool::TRUE;
        assert!(unsafe { load_options(&p) }.unwrap().options.winograd_vae);
        p.int8_vae = CBool::TRUE;
        assert!(unsafe { load_options(&p) }.unwrap().options.int8_vae);
    }

    #[test]
    fn controlnet_reaches_the_sdk() {
        let mut p = zimage_load_params::defaults();
        assert_eq!(unsafe { load_options(&p) }.unwrap().options.controlnet, None);
        p.controlnet = c"union-v1".as_ptr();
        assert_eq!(unsafe { load_options(&p) }.unwrap().options.controlnet.as_deref(), Some("union-v1"));
        p.controlnet = c"\xff".as_ptr();
        let bad = unsafe { load_options(&p) }.err().unwrap();
        assert_eq!(bad.code, zimage_result::InvalidArgument);
        assert!(bad.message.starts_with("params->controlnet"), "{}", bad.message);
    }

    #[test]
    fn vae_tiling_reaches_the_sdk() {
        let mut p = zimage_load_params::defaults();
        assert_eq!(unsafe { load_options(&p) }.unwrap().options.vae_tiling, None);
        p.vae_tile_size = 512;
        p.vae_tile_overlap = 128;
        let tiling = unsafe { load_options(&p) }.unwrap().options.vae_tiling;
        assert_eq!(tiling, Some(VaeTiling { tile_size: 512, overlap: 128 }));
        // An overlap without a tile size is off, like a tile size of 0.
        p.vae_tile_size = 0;
        assert_eq!(unsafe { load_options(&p) }.unwrap().options.vae_tiling, None);
    }

    /// A caller built against the first header: its struct ends at `memory_mode`, and whatever
    /// lies beyond it is never read; every later field takes its default.
    #[test]
    fn a_first_version_struct_gets_defaults_for_the_rest() {
        let garbage = zimage_tensorrt_params { struct_size: 0, ..zimage_tensorrt_params::defaults() };
        let mut old = zimage_load_params::defaults();
        old.struct_size = zimage_load_params::FIRST_VERSION_SIZE;
        old.memory_mode = zimage_memory_mode::Sequential as u32;
        old.tensorrt = &garbage; // would be refused if it were read
        old.cuda_memory_limit = 5;
        old.cuda_tf32 = 99;
        old.winograd_vae = CBool::TRUE;
        old.controlnet = c"union-v1".as_ptr();
        old.vae_tile_size = 64;
        old.int8_vae = CBool::TRUE;
        let options = unsafe { load_options(&old) }.unwrap().options;
        assert_eq!(options.memory_mode, MemoryMode::Sequential);
        assert_eq!(options.gpu, GpuOptions::default());
        assert_eq!(options.gpu.tensorrt, TensorRtOptions::default());
        assert!(!options.winograd_vae);
        assert!(!options.int8_vae);
        assert_eq!(options.vae_tiling, None);
        assert_eq!(options.controlnet, None);
        // Bigger than this library's struct: refused.
        old.struct_size = size_of::<zimage_load_params>() + 8;
        assert_eq!(code(unsafe { load_options(&old) }), zimage_result::InvalidArgument);
    }
}
