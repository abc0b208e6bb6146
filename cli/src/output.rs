//! What a command gives back: its failure (which sets the exit code), standard output that
//! may be closed under it, one-line messages, seconds as JSON numbers, and the names of the
//! files it writes.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

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

/// Refuses an output name the command would misread (`flag` names the option): `-`, which
/// reads as standard output but would be a file named `-` (the command writes files only), and
/// the extension of another picture format, which would hold PNG bytes (the command writes
/// PNG only: an `out.jpg` that is a PNG is refused by some viewers and uploaders).
pub fn check_png_name(path: &Path, flag: &str) -> Result<(), Failure> {
    refuse_stdout(path, flag)?;
    const OTHER_FORMATS: [&str; 12] =
        ["jpg", "jpeg", "jpe", "webp", "gif", "bmp", "tif", "tiff", "avif", "heic", "heif", "jxl"];
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        if OTHER_FORMATS.iter().any(|other| ext.eq_ignore_ascii_case(other)) {
            return Err(Failure::Usage(format!(
                "{flag} {}: zimage writes PNG files only; name the output .png",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Refuses `-` as an output file name: it reads as standard output, which the command does
/// not write to, and would quietly make a file named `-`.
pub fn refuse_stdout(path: &Path, flag: &str) -> Result<(), Failure> {
    if path.as_os_str() == "-" {
        return Err(Failure::Usage(format!(
            "{flag} -: writing to standard output is not supported; give a file name (./- for a file named -)"
        )));
    }
    Ok(())
}

/// Whether two output paths name the same file once written: the same name in the same
/// folder, or a symbolic link and the file it points to (the SDK writes through a link to its
/// target, so `-o a.png --save-latents link-to-a.png` would write both into `a.png`).
pub fn same_file(a: &Path, b: &Path) -> bool {
    let normal = |p: &Path| -> Option<PathBuf> {
        if let Ok(target) = std::fs::canonicalize(p) {
            return Some(target);
        }
        let parent = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        Some(std::fs::canonicalize(parent).ok()?.join(p.file_name()?))
    };
    match (normal(a), normal(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// `out.png` for one image; `out-0.png`, `out-1.png`, ... for several.
pub fn output_files(output: &Path, count: u32) -> Vec<PathBuf> {
    if count <= 1 {
        return vec![output.to_path_buf()];
    }
    (0..count)
        .map(|i| {
            let mut name = OsString::from(output.file_stem().unwrap_or_default());
            name.push(format!("-{i}"));
            if let Some(ext) = output.extension() {
                name.push(".");
                name.push(ext);
            }
            output.with_file_name(name)
        })
        .collect()
}

/// Refuses `--previews` whose files (`FILE.stepS.png` beside the output, for any step the run
/// could have) would replace one of the input pictures: `--init-image in.step1.png -o in.png
/// --previews 1` overwrote its own input while it ran.
pub fn refuse_previews_over_inputs(
    output: &Path,
    count: u32,
    previews: u32,
    steps: usize,
    inputs: &[&Path],
) -> Result<(), Failure> {
    if previews == 0 || inputs.is_empty() {
        return Ok(());
    }
    for step in 1..=steps {
        for preview in output_files(&preview_path(output, step), count) {
            if let Some(input) = inputs.iter().find(|input| same_file(&preview, input)) {
                return Err(Failure::Usage(format!(
                    "--previews would write {} over the input {}; choose another -o",
                    preview.display(),
                    input.display()
                )));
            }
        }
    }
    Ok(())
}

/// `out.png` -> `out.step3.png` (with several images `out.step3-0.png`, ... through
/// `output_files`).
pub fn preview_path(output: &Path, step: usize) -> PathBuf {
    let mut name = output.file_stem().unwrap_or_default().to_os_string();
    name.push(format!(".step{step}"));
    if let Some(ext) = output.extension() {
        name.push(".");
        name.push(ext);
    }
    output.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_names_that_would_be_misread_are_refused() {
        for bad in ["-", "out.jpg", "dir/out.JPEG", "x.webp", "x.gif", "x.bmp", "x.tiff"] {
            assert!(check_png_name(Path::new(bad), "-o").is_err(), "{bad}");
        }
        for good in ["out.png", "out.PNG", "out", "./-", "a.b/c", ".jpg", "latents.npy"] {
            assert!(check_png_name(Path::new(good), "-o").is_ok(), "{good}");
        }
    }

    #[test]
    fn previews_are_named_after_the_output_and_the_step() {
        assert_eq!(preview_path(Path::new("out/cat.png"), 3), Path::new("out/cat.step3.png"));
        assert_eq!(
            output_files(&preview_path(Path::new("cat.png"), 6), 2),
            [Path::new("cat.step6-0.png"), Path::new("cat.step6-1.png")]
        );
    }
}
