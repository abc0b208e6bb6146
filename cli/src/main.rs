//! `zimage`: the command-line face of the zimage SDK. It parses arguments, calls the SDK and
//! prints; the work itself lives in the `zimage` crate.

mod allocator;
mod bench;
mod device_memory;
mod enhance;
mod generate;
mod triton_repo;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use clap::{Args, Parser, Subcommand};
use zimage::{
    CancelHandle, Device, ErrorKind, LoadOptions, MemoryMode, Pipeline, ResolutionRange, TensorRtPrecision, Tf32,
};

const EXIT_CODES: &str = "\
Exit codes:
  0    success
  1    other failure
  2    bad command-line arguments
  3    model package missing, incomplete or invalid
  4    ONNX Runtime library not found, not loadable or wrong version
  5    execution provider (CUDA, TensorRT) unavailable
  6    invalid request (size, steps, guidance, count, strength, ...)
  7    input image or mask unreadable or unusable
  8    inference failed (ONNX Runtime error, non-finite values)
  9    reading or writing a file failed
  130  cancelled (Ctrl-C)";

#[derive(Parser)]
#[command(
    name = "zimage",
    version,
    about = "Z-Image-Turbo text-to-image on ONNX Runtime",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a prompt (text-to-image, image-to-image, inpainting).
    #[command(after_help = EXIT_CODES)]
    Generate(generate::GenerateArgs),
    /// Time every stage of a generation, with peak memory, over several runs.
    #[command(after_help = EXIT_CODES)]
    Bench(bench::BenchArgs),
    /// Rewrite a prompt into a detailed visual description with the local Qwen3 decoder.
    #[command(after_help = EXIT_CODES)]
    Enhance(enhance::EnhanceArgs),
    /// Write a Triton Inference Server model repository for a package (zimage backend).
    #[command(after_help = EXIT_CODES)]
    TritonRepo(triton_repo::TritonRepoArgs),
}

/// How the model package is loaded; shared by every subcommand.
#[derive(Args)]
pub struct ModelArgs {
    /// Model package folder (made by export-scripts/export.py).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
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
}

impl ModelArgs {
    /// Loads the pipeline and lets Ctrl-C cancel its runs from then on. The image count and
    /// guidance size the TensorRT profiles (unused elsewhere).
    pub fn load(&self, max_images: u32, guidance: bool) -> zimage::Result<Pipeline> {
        let pipeline = Pipeline::load(&self.model, &self.options(max_images, guidance))?;
        set_cancel_handle(pipeline.cancel_handle());
        Ok(pipeline)
    }

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
        options.optimized_model_cache = self.optimized_cache.clone();
        options.winograd_vae = self.winograd_vae;
        options
    }
}

fn parse_device(s: &str) -> Result<Device, String> {
    s.parse::<Device>().map_err(|e| match e {
        zimage::Error::InvalidRequest(message) => message,
        other => other.to_string(),
    })
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(|| format!("{s:?} is not WxH"))?;
    let parse = |v: &str| v.trim().parse::<u32>().map_err(|_| format!("{s:?} is not WxH"));
    Ok((parse(w)?, parse(h)?))
}

fn main() -> ExitCode {
    allocator::map_large_allocations();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    install_interrupt_handler();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Enhance(args) => enhance::run(args),
        Command::TritonRepo(args) => triton_repo::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zimage: error: {}", one_line(&e.to_string()));
            ExitCode::from(exit_code(e.kind()))
        }
    }
}

/// The exit code for each SDK error kind (the table in `EXIT_CODES`).
fn exit_code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Package => 3,
        ErrorKind::Runtime => 4,
        ErrorKind::Provider => 5,
        ErrorKind::InvalidRequest => 6,
        ErrorKind::Image => 7,
        ErrorKind::Inference => 8,
        ErrorKind::Io => 9,
        // 128 + SIGINT, what a shell reports for a process stopped by Ctrl-C.
        ErrorKind::Cancelled => 130,
        // ErrorKind is non-exhaustive: a kind added later still fails, with the generic code.
        _ => 1,
    }
}

/// Help and version go to stdout as clap prints them; argument errors become one line
/// (clap's own rendering spans several, with a usage block) and exit with clap's code, 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind as Clap;
    if matches!(e.kind(), Clap::DisplayHelp | Clap::DisplayVersion | Clap::DisplayHelpOnMissingArgumentOrSubcommand) {
        let _ = e.print();
        return ExitCode::from(e.exit_code() as u8);
    }
    // Keep the message and clap's tip ("a similar argument exists"), drop the usage block.
    let rendered = e.render().to_string();
    let parts: Vec<String> = rendered
        .split("\n\n")
        .filter(|p| !p.trim_start().starts_with("Usage:") && !p.trim_start().starts_with("For more information"))
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|p| !p.is_empty())
        .collect();
    let message = parts.join("; ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    let help = match std::env::args().nth(1).as_deref() {
        Some(sub @ ("generate" | "bench")) => format!("zimage {sub} --help"),
        _ => "zimage --help".into(),
    };
    eprintln!("zimage: error: {message} (see {help})");
    ExitCode::from(e.exit_code() as u8)
}

/// SDK messages can span lines (e.g. the list of ONNX Runtime paths tried); the CLI prints
/// one line per error so that scripts and logs can take it whole.
fn one_line(message: &str) -> String {
    let mut out = String::new();
    for line in message.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !out.is_empty() {
            out.push_str(if out.ends_with(':') { " " } else { "; " });
        }
        out.push_str(line);
    }
    out
}

/// The pipeline whose runs the first Ctrl-C cancels (set once it is loaded).
static CANCEL: OnceLock<CancelHandle> = OnceLock::new();

pub fn set_cancel_handle(handle: CancelHandle) {
    let _ = CANCEL.set(handle);
}

/// First Ctrl-C: cancel the running generation, which then ends with the Cancelled error
/// (exit 130) after ONNX Runtime returns. Before the pipeline is loaded, or on a second
/// Ctrl-C, exit at once with the same code.
fn install_interrupt_handler() {
    static PRESSES: AtomicU32 = AtomicU32::new(0);
    let installed = ctrlc::set_handler(|| match (CANCEL.get(), PRESSES.fetch_add(1, Ordering::SeqCst)) {
        (Some(handle), 0) => handle.cancel(),
        _ => exit_now(130),
    });
    // Without a handler Ctrl-C keeps its default effect (the process ends), which is still
    // correct, only less tidy.
    let _ = installed;
}

/// Ends the process from the Ctrl-C handler's thread while the main thread may be inside ONNX
/// Runtime (loading, or after a second Ctrl-C): `std::process::exit` would run ONNX Runtime's
/// C++ static destructors while that thread still uses them.
fn exit_now(code: i32) -> ! {
    #[cfg(unix)]
    // SAFETY: _exit ends the process at once; nothing after it runs.
    unsafe {
        libc::_exit(code)
    }
    #[cfg(not(unix))]
    std::process::exit(code)
}

/// Seconds as a JSON number.
pub fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}
