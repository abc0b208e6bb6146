//! What a command gives back: its failure (which sets the exit code), standard output that
//! may be closed under it, one-line messages, seconds as JSON numbers.

use std::io::Write;

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

/// SDK messages can span lines (e.g. the list of ONNX Runtime paths tried); the CLI prints
/// one line per error so that scripts and logs can take it whole.
pub fn one_line(message: &str) -> String {
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
