//! `zimage`: the command-line face of the zimage SDK. It parses arguments, calls the SDK and
//! prints; the work itself lives in the `zimage` crate.

mod allocator;
mod bench;
mod device_memory;
mod enhance;
mod generate;
mod interrupt;
mod model_args;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
}

fn main() -> ExitCode {
    allocator::map_large_allocations();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    interrupt::install_handler();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Enhance(args) => enhance::run(args),
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
