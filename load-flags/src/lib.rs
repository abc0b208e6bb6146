//! The load flags every front end shares (the `zimage` command, `zimage-server`): where the
//! graphs run, threads, memory mode, TensorRT profiles and caches, and the SDK's `LoadOptions`
//! made from them. One definition, so the front ends take the same flags the same way.

use std::path::PathBuf;

use clap::Args;
use zimage::{CudaGraphs, Device, LoadOptions, MemoryMode, ResolutionRange, TensorRtPrecision, Tf32, VaeTiling};

/// How the graphs of a package are loaded (flatten it into a front end's arguments).
#[derive(Args, Debug, Clone)]
pub struct LoadFlags {
    /// Where the graphs run: cpu, cuda[:N] or tensorrt[:N].
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// ONNX Runtime intra-op threads per graph [default: one per physical core].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// ONNX Runtime shared library [default: $ORT_DYLIB_PATH, beside the executable, then the
    /// copy installed by scripts/setup.sh].
    #[arg(long, value_name = "PATH")]
    pub ort_library: Option<PathBuf>,
    /// Where the transformer runs when it should differ from --device (e.g. tensorrt with
    /// --device cuda).
    #[arg(long, value_name = "DEVICE", value_parser = parse_device)]
    pub transformer_device: Option<Device>,
    /// Use the CPU when the requested provider cannot be set up, instead of failing.
    #[arg(long)]
    pub allow_cpu_fallback: bool,
    /// Load each graph only for its stage (text encoder, transformer, VAE) to save memory.
    #[arg(long)]
    pub sequential: bool,
    /// CPU: decode with the package's Winograd VAE decoder (vae_decoder_cpu): about 15-20 %
    /// faster decoding, more memory while decoding, images within one level.
    #[arg(long)]
    pub winograd_vae: bool,
    /// CPU: decode with the package's int8 VAE decoder (vae_decoder_int8, written by
    /// quantize_package.py --int8-vae): about 2x faster decoding, lossy (docs/quantization.md).
    #[arg(long, conflicts_with = "winograd_vae")]
    pub int8_vae: bool,
    /// Decode images larger than SIZE pixels in overlapping SIZE x SIZE tiles blended over
    /// OVERLAP pixels (default SIZE/4), as diffusers' vae.enable_tiling(): a fraction of the
    /// decode's memory, different pixels (per-tile normalisation; keep tiles large). Multiples of 8.
    #[arg(long, value_name = "SIZE[:OVERLAP]", value_parser = parse_vae_tiling)]
    pub vae_tiling: Option<VaeTiling>,
    /// Check the sha256 of every package file, the large ones too.
    #[arg(long)]
    pub verify_checksums: bool,
    /// TensorRT: smallest image size (WxH) the engines serve.
    #[arg(long, value_name = "WxH", value_parser = parse_size, default_value = "512x512")]
    pub trt_min: (u32, u32),
    /// TensorRT: the size the engines are tuned for.
    #[arg(long, value_name = "WxH", value_parser = parse_size, default_value = "1024x1024")]
    pub trt_opt: (u32, u32),
    /// TensorRT: largest image size the engines serve (no rebuild for sizes in between).
    #[arg(long, value_name = "WxH", value_parser = parse_size, default_value = "1536x1536")]
    pub trt_max: (u32, u32),
    /// TensorRT: precision inside the engines (bf16 avoids fp16 overflow; fp32 for GPUs
    /// older than Ampere).
    #[arg(long, value_name = "P", default_value = "bf16", value_parser = ["fp32", "fp16", "bf16"])]
    pub trt_precision: String,
    /// TensorRT: folder for engine and timing caches [default: ~/.cache/zimage/tensorrt].
    #[arg(long, value_name = "DIR")]
    pub trt_cache: Option<PathBuf>,
    /// CPU: keep optimised graphs in this folder so later loads are faster.
    #[arg(long, value_name = "DIR")]
    pub optimized_cache: Option<PathBuf>,
    /// CUDA: where float32 work may run in TF32: like-pytorch (the VAE's convolutions only, the
    /// reference's image), off, or on (fastest; the transformer drifts from the reference).
    #[arg(long, value_name = "WHEN", default_value = "like-pytorch", value_parser = ["like-pytorch", "off", "on"])]
    pub cuda_tf32: String,
    /// CUDA: record the transformer's denoising calls once per shape and replay them as CUDA
    /// graphs where it is safe (auto), or never (off).
    #[arg(long, value_name = "WHEN", default_value = "auto", value_parser = ["auto", "off"])]
    pub cuda_graphs: String,
    /// Run the denoising loop on the host (latents copied to the device and back every step)
    /// instead of on the transformer's device: for comparison; same latents.
    #[arg(long)]
    pub host_loop: bool,
}

impl LoadFlags {
    /// The SDK's load options. `max_images` (clamped to 1..=64) and `guidance` size the TensorRT
    /// profiles: the most images a request will ask for, and whether requests use guidance
    /// (a doubled batch).
    pub fn options(&self, max_images: u32, guidance: bool) -> LoadOptions {
        let precision = match self.trt_precision.as_str() {
            "fp32" => TensorRtPrecision::Fp32,
            "fp16" => TensorRtPrecision::Fp16,
            _ => TensorRtPrecision::Bf16,
        };
        let mut options = LoadOptions::default();
        options.runtime_library = self.ort_library.clone();
        options.device = self.device;
        options.transformer_device = self.transformer_device;
        options.threads = self.threads;
        options.verify_checksums = self.verify_checksums;
        options.allow_cpu_fallback = self.allow_cpu_fallback;
        options.memory_mode = if self.sequential { MemoryMode::Sequential } else { MemoryMode::Resident };
        let trt = &mut options.gpu.tensorrt;
        trt.cache_dir = self.trt_cache.clone();
        trt.precision = precision;
        trt.resolutions = ResolutionRange { min: self.trt_min, opt: self.trt_opt, max: self.trt_max };
        trt.max_images = max_images.clamp(1, zimage::MAX_IMAGES_PER_REQUEST);
        trt.guidance = guidance;
        options.gpu.cuda_tf32 = match self.cuda_tf32.as_str() {
            "off" => Tf32::Off,
            "on" => Tf32::On,
            _ => Tf32::LikePyTorch,
        };
        options.gpu.cuda_graphs = match self.cuda_graphs.as_str() {
            "off" => CudaGraphs::Off,
            _ => CudaGraphs::Auto,
        };
        options.host_denoise_loop = self.host_loop;
        options.optimized_model_cache = self.optimized_cache.clone();
        options.winograd_vae = self.winograd_vae;
        options.int8_vae = self.int8_vae;
        options.vae_tiling = self.vae_tiling;
        options
    }
}

/// `FILE[:SCALE]` of a LoRA adapter (`--lora`), as [`zimage::LoraFile`] reads it.
pub fn parse_lora(value: &str) -> Result<zimage::LoraFile, String> {
    value.parse().map_err(|e: zimage::Error| match e {
        zimage::Error::InvalidRequest(message) => message,
        other => other.to_string(),
    })
}

pub fn parse_device(s: &str) -> Result<Device, String> {
    s.parse::<Device>().map_err(|e| match e {
        zimage::Error::InvalidRequest(message) => message,
        other => other.to_string(),
    })
}

/// `SIZE` or `SIZE:OVERLAP` in pixels (the SDK's syntax); whether they fit the package's VAE is
/// checked at load.
pub fn parse_vae_tiling(s: &str) -> Result<VaeTiling, String> {
    s.parse::<VaeTiling>().map_err(|e| match e {
        zimage::Error::InvalidRequest(message) => message,
        other => other.to_string(),
    })
}

pub fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(|| format!("{s:?} is not WxH"))?;
    let parse = |v: &str| v.trim().parse::<u32>().map_err(|_| format!("{s:?} is not WxH"));
    Ok((parse(w)?, parse(h)?))
}
