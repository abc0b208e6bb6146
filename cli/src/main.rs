//! `zimage`: the command-line face of the zimage SDK. It parses arguments, calls the SDK and
//! prints; the work itself lives in the `zimage` crate.

mod allocator;
mod bench;
mod device_memory;
mod enhance;
mod generate;
mod interrupt;
mod log;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use zimage::{Device, ErrorKind, LoadOptions, MemoryMode, Pipeline, ResolutionRange, TensorRtPrecision, Tf32};

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
  10   LoRA file unreadable, malformed, or not for this model
  130  cancelled (Ctrl-C); no output or temporary file is left
  141  standard output was closed before everything was printed (e.g. | head)

Set ZIMAGE_LOG=off|warn|info|debug|trace for more or fewer log lines (ONNX Runtime's too).";

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
    /// Also print informational log lines (the SDK's and ONNX Runtime's) on stderr.
    #[arg(long, short, global = true)]
    verbose: bool,
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
        self.load_with_loras(max_images, guidance, Vec::new())
    }

    /// [`load`](Self::load) with LoRA adapters merged into the transformer.
    pub fn load_with_loras(
        &self,
        max_images: u32,
        guidance: bool,
        loras: Vec<zimage::LoraSetting>,
    ) -> zimage::Result<Pipeline> {
        let mut options = self.options(max_images, guidance);
        options.loras = loras;
        let pipeline = Pipeline::load(&self.model, &options)?;
        interrupt::set_cancel_handle(pipeline.cancel_handle());
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

/// Why a command did not succeed.
pub enum Failure {
    /// The SDK's error: its kind sets the exit code.
    Sdk(zimage::Error),
    /// The arguments do not make sense together (exit 2, like clap's own errors).
    Usage(String),
    /// Ctrl-C stopped the SDK's run; the message says where (exit 130).
    Cancelled(String),
    /// Standard output was closed by its reader (`| head`): end quietly (exit 141, what a
    /// shell reports for a process ended by SIGPIPE).
    StdoutClosed,
}

impl From<zimage::Error> for Failure {
    fn from(e: zimage::Error) -> Self {
        Failure::Sdk(e)
    }
}

/// Prints to stdout; a reader that went away is [`Failure::StdoutClosed`], not a panic.
pub fn out(text: &str) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            Failure::StdoutClosed
        } else {
            Failure::Sdk(zimage::Error::Io { path: "<standard output>".into(), source: e })
        }
    })
}

fn main() -> ExitCode {
    allocator::map_large_allocations();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    if let Err(message) = log::install(cli.verbose) {
        log::stderr_line("error", &message);
        return ExitCode::from(2);
    }
    interrupt::install();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Enhance(args) => enhance::run(args),
    };
    log::finish(result.is_ok());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Sdk(e)) => {
            log::stderr_line("error", &e.to_string());
            ExitCode::from(exit_code(e.kind()))
        }
        Err(Failure::Usage(message)) => {
            log::stderr_line("error", &message);
            ExitCode::from(2)
        }
        Err(Failure::Cancelled(message)) => {
            log::stderr_line("error", &message);
            ExitCode::from(130)
        }
        Err(Failure::StdoutClosed) => ExitCode::from(141),
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
        ErrorKind::Lora => 10,
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
    log::stderr_line("error", &format!("{message} (see {help})"));
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

/// Seconds as a JSON number.
pub fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}
