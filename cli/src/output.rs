//! What a command gives back: its failure (which sets the exit code), standard output that
//! may be closed under it, one-line messages, seconds as JSON numbers, and the names of the
//! files it writes.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use zimage::image_io::ImageFormat;

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

/// The picture format of an output name (`flag` names the option): `.jpg` / `.jpeg` JPEG (at
/// `quality`, or `ImageFormat::DEFAULT_JPEG_QUALITY`), `.webp` lossless WebP, `.png`, no
/// extension or any other PNG. Refused: `-`, which reads as standard output but would be a file
/// named `-` (the command writes files only); the extension of a picture format it cannot write
/// (`out.gif` would hold PNG bytes, which some viewers and uploaders refuse); `--quality` for
/// an output that is not JPEG (it would be ignored).
pub fn output_format(path: &Path, flag: &str, quality: Option<u8>) -> Result<ImageFormat, Failure> {
    refuse_stdout(path, flag)?;
    const UNWRITTEN_FORMATS: [&str; 9] = ["jpe", "gif", "bmp", "tif", "tiff", "avif", "heic", "heif", "jxl"];
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
    if UNWRITTEN_FORMATS.iter().any(|other| ext.eq_ignore_ascii_case(other)) {
        return Err(Failure::Usage(format!(
            "{flag} {}: zimage writes PNG, JPEG (.jpg) or WebP (.webp) files; name the output accordingly",
            path.display()
        )));
    }
    let format =
        ImageFormat::for_path(path, quality.unwrap_or(ImageFormat::DEFAULT_JPEG_QUALITY)).unwrap_or(ImageFormat::Png);
    if quality.is_some() && !matches!(format, ImageFormat::Jpeg { .. }) {
        return Err(Failure::Usage(format!(
            "--quality is the JPEG quality, and {flag} {} is a {} file",
            path.display(),
            format.name().to_uppercase()
        )));
    }
    Ok(format)
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

/// A folder given as the output gets a file name inside it.
pub fn resolve_output(path: &Path, default_name: &str) -> PathBuf {
    let names_folder = path.is_dir() || path.as_os_str().to_string_lossy().ends_with(std::path::MAIN_SEPARATOR);
    if names_folder {
        path.join(default_name)
    } else {
        path.to_path_buf()
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
    fn output_names_give_their_format_or_are_refused() {
        for bad in ["-", "x.gif", "x.bmp", "x.tiff", "dir/x.JPE", "x.avif"] {
            assert!(output_format(Path::new(bad), "-o", None).is_err(), "{bad}");
        }
        let jpeg = ImageFormat::Jpeg { quality: ImageFormat::DEFAULT_JPEG_QUALITY };
        for (name, format) in [
            ("out.png", ImageFormat::Png),
            ("out.PNG", ImageFormat::Png),
            ("out", ImageFormat::Png),
            ("./-", ImageFormat::Png),
            ("a.b/c", ImageFormat::Png),
            (".jpg", ImageFormat::Png),
            ("x.data", ImageFormat::Png),
            ("out.jpg", jpeg),
            ("dir/out.JPEG", jpeg),
            ("x.webp", ImageFormat::Webp),
        ] {
            assert_eq!(output_format(Path::new(name), "-o", None).ok(), Some(format), "{name}");
        }
        assert_eq!(output_format(Path::new("x.jpg"), "-o", Some(80)).ok(), Some(ImageFormat::Jpeg { quality: 80 }));
        assert!(output_format(Path::new("x.png"), "-o", Some(80)).is_err());
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
