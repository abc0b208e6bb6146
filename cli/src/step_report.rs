//! What `zimage generate` and `zimage edit` do after each denoising step: the progress display,
//! the step reached (for the message when Ctrl-C stops the run), and, with `--previews N`, the
//! previews written as they arrive.

use std::path::{Path, PathBuf};

use zimage::{image_io, Progress};

use crate::generate::{output_files, ProgressMode, StageProgress};
use crate::output::{secs, Failure};
use crate::{interrupt, log};

pub struct StepReport<'a> {
    progress: &'a StageProgress,
    lines: bool,
    /// The run's first output file and its image count: previews go beside it.
    previews_beside: Option<(PathBuf, u32)>,
    /// Steps done and in all, as last reported.
    pub last_step: (usize, usize),
    /// Every preview written, in order.
    pub preview_files: Vec<PathBuf>,
    /// A preview that could not be written: the run is stopped and this is its error.
    failed: Option<Failure>,
}

impl<'a> StepReport<'a> {
    pub fn new(progress: &'a StageProgress, mode: ProgressMode, previews_beside: Option<(PathBuf, u32)>) -> Self {
        StepReport {
            progress,
            lines: mode == ProgressMode::Lines,
            previews_beside,
            last_step: (0, 0),
            preview_files: Vec::new(),
            failed: None,
        }
    }

    /// The progress callback: false stops the run (Ctrl-C, or a preview that could not be written).
    pub fn on_step(&mut self, p: &Progress) -> bool {
        self.progress.step(p);
        self.last_step = (p.step, p.total_steps);
        if self.lines {
            log::stderr_line("progress", &format!("step {}/{} ({:.2} s)", p.step, p.total_steps, secs(p.elapsed)));
        }
        if let (Some(pictures), Some((output, count))) = (&p.preview, &self.previews_beside) {
            let paths = output_files(&preview_path(output, p.step), *count);
            for (picture, path) in pictures.iter().zip(paths) {
                // Each preview is whole or absent (written beside, then renamed); they stay when
                // the run fails later, as the progress they are.
                if let Err(e) = image_io::write_png(&path, picture, &[("zimage-preview-step", p.step.to_string())]) {
                    self.failed = Some(e.into());
                    return false;
                }
                self.preview_files.push(path);
            }
        }
        // Ctrl-C also cancels through the cancel handle; this catches one that came before
        // the run was registered.
        !interrupt::interrupted()
    }

    /// The run's error: a preview that failed to be written rather than the cancellation it
    /// caused; Ctrl-C with the step reached.
    pub fn failure(&mut self, error: zimage::Error) -> Failure {
        match (self.failed.take(), error) {
            (Some(failed), _) => failed,
            (None, zimage::Error::Cancelled) => Failure::Cancelled(match self.last_step {
                (_, 0) => "cancelled before the first denoising step".into(),
                (done, total) => format!("cancelled after {done} of {total} denoising steps"),
            }),
            (None, other) => other.into(),
        }
    }
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
    fn previews_are_named_after_the_output_and_the_step() {
        assert_eq!(preview_path(Path::new("out/cat.png"), 3), Path::new("out/cat.step3.png"));
        assert_eq!(
            output_files(&preview_path(Path::new("cat.png"), 6), 2),
            [Path::new("cat.step6-0.png"), Path::new("cat.step6-1.png")]
        );
    }
}
