//! `zimage`: the command-line face of the zimage SDK. It parses arguments, calls the SDK and
//! prints; the work itself lives in the `zimage` crate.

mod allocator;
mod bench;
mod device_memory;
mod edit;
mod enhance;
mod generate;
mod interrupt;
mod log;
mod model_args;
mod output;
mod step_report;
mod triton_repo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use output::Failure;
use zimage::ErrorKind;

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
  130  cancelled (Ctrl-C); no output or temporary file is left (previews already written stay)
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

/// `allow_negative_numbers`: `--control-scale -0.5` (a valid scale) and `--guidance -1` (refused
/// by the request check, with the range) are values, not the unknown flags `-0` and `-1`.
#[derive(Subcommand)]
enum Command {
    /// Generate images from a prompt (text-to-image, image-to-image, inpainting).
    #[command(after_help = EXIT_CODES, allow_negative_numbers = true)]
    Generate(generate::GenerateArgs),
    /// Edit pictures with an instruction (Z-Image Omni / Edit packages): --image A.png [--image B.png].
    #[command(after_help = EXIT_CODES, allow_negative_numbers = true)]
    Edit(edit::EditArgs),
    /// Time every stage of a generation, with peak memory, over several runs.
    #[command(after_help = EXIT_CODES, allow_negative_numbers = true)]
    Bench(bench::BenchArgs),
    /// Rewrite a prompt into a detailed visual description with the local Qwen3 decoder.
    #[command(after_help = EXIT_CODES)]
    Enhance(enhance::EnhanceArgs),
    /// Write a Triton Inference Server model repository for a package (zimage backend).
    #[command(after_help = EXIT_CODES)]
    TritonRepo(triton_repo::TritonRepoArgs),
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
        Command::Edit(args) => edit::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Enhance(args) => enhance::run(args),
        Command::TritonRepo(args) => triton_repo::run(args),
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
        Some(sub @ ("generate" | "edit" | "bench" | "enhance" | "triton-repo")) => format!("zimage {sub} --help"),
        _ => "zimage --help".into(),
    };
    log::stderr_line("error", &format!("{message} (see {help})"));
    ExitCode::from(e.exit_code() as u8)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap's own consistency checks (argument groups naming real arguments, ...), which it
    /// otherwise runs only in debug builds.
    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
