//! What `zimage generate` and `zimage edit` do after each denoising step: the progress display,
//! the step reached (for the message when Ctrl-C stops the run), and, with `--previews N`, the
//! previews written as they arrive.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use zimage::image_io::{self, ImageFormat};
use zimage::Progress;

use crate::output::{output_files, preview_path, secs, Failure};
use crate::{interrupt, log};

pub struct StepReport<'a> {
    progress: &'a StageProgress,
    lines: bool,
    /// The run's first output file, its image count and format: previews go beside it, in
    /// the same format.
    previews_beside: Option<(PathBuf, u32, ImageFormat)>,
    /// Steps done and in all, as last reported.
    pub last_step: (usize, usize),
    /// Every preview written, in order.
    pub preview_files: Vec<PathBuf>,
    /// A preview that could not be written: the run is stopped and this is its error.
    failed: Option<Failure>,
}

impl<'a> StepReport<'a> {
    pub fn new(
        progress: &'a StageProgress,
        mode: ProgressMode,
        previews_beside: Option<(PathBuf, u32, ImageFormat)>,
    ) -> Self {
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
        if let (Some(pictures), Some((output, count, format))) = (&p.preview, &self.previews_beside) {
            let paths = output_files(&preview_path(output, p.step), *count);
            for (picture, path) in pictures.iter().zip(paths) {
                // Each preview is whole or absent (written beside, then renamed); they stay when
                // the run fails later, as the progress they are.
                let text = [("zimage-preview-step", p.step.to_string())];
                if let Err(e) = image_io::write_image(&path, picture, *format, &text) {
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

/// How generation progress is shown on stderr.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, nothing otherwise.
    Auto,
    /// `zimage: progress: step N/M (S s)` after every denoising step.
    Lines,
    /// Nothing.
    None,
}

impl ProgressMode {
    /// Whether the bar shows.
    pub fn visible(self) -> bool {
        self == ProgressMode::Auto && std::io::stderr().is_terminal()
    }
}

/// The terminal display: a spinner with the stage name, then a bar over the denoising steps.
/// Hidden when stderr is not a terminal, so logs and pipes stay clean.
pub struct StageProgress {
    bar: ProgressBar,
}

impl StageProgress {
    pub fn new(visible: bool) -> Self {
        let bar = if visible { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
        bar.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"));
        bar.enable_steady_tick(Duration::from_millis(120));
        StageProgress { bar }
    }

    pub fn stage(&self, name: impl Into<std::borrow::Cow<'static, str>>) {
        self.bar.set_message(name);
    }

    pub fn step(&self, p: &Progress) {
        if self.bar.length() != Some(p.total_steps as u64) {
            self.bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps, {elapsed} (eta {eta})")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            self.bar.set_length(p.total_steps as u64);
            self.bar.set_message("denoising");
        }
        self.bar.set_position(p.step as u64);
        if p.step == p.total_steps {
            self.bar.set_message("decoding");
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
