//! Where the SDK's and ONNX Runtime's log events go: stderr, one line each, in the command's own
//! format (`zimage: warning: …`), never ONNX Runtime's colour-coded multi-part lines.
//!
//! Default: warnings. ONNX Runtime's error lines are held back: when the command then fails,
//! its one `zimage: error: …` line already carries ONNX Runtime's message; when it succeeds
//! anyway, they are printed as warnings at the end. `--verbose` (or `ZIMAGE_LOG=info`) adds
//! informational lines, `ZIMAGE_LOG=debug|trace` more (ONNX Runtime's verbose log is `trace`),
//! `ZIMAGE_LOG=off` silences everything but errors; with any of them set, lines are printed
//! as they come.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// Most held-back ONNX Runtime error lines kept (the first ones).
const MAX_HELD: usize = 16;

struct Logger {
    max: LevelFilter,
    /// Hold ONNX Runtime's errors back until the command's outcome is known.
    hold_ort_errors: bool,
    held: Mutex<Vec<String>>,
    next_span: AtomicU64,
}

static LOGGER: std::sync::OnceLock<&'static Logger> = std::sync::OnceLock::new();

/// Installs the logger as the process's `tracing` subscriber (before the SDK loads ONNX Runtime,
/// which asks ONNX Runtime for nothing less severe than what is listened to).
pub fn install(verbose: bool) -> Result<(), String> {
    let setting = std::env::var("ZIMAGE_LOG").ok().map(|v| v.trim().to_ascii_lowercase()).filter(|v| !v.is_empty());
    let max = match setting.as_deref() {
        None if verbose => LevelFilter::INFO,
        None => LevelFilter::WARN,
        Some("off" | "none" | "error") => LevelFilter::ERROR,
        Some("warn" | "warning") => LevelFilter::WARN,
        Some("info") => LevelFilter::INFO,
        Some("debug") => LevelFilter::DEBUG,
        Some("trace" | "verbose") => LevelFilter::TRACE,
        Some(other) => return Err(format!("ZIMAGE_LOG={other:?} is not one of off, warn, info, debug, trace")),
    };
    let logger: &'static Logger = Box::leak(Box::new(Logger {
        max,
        hold_ort_errors: setting.is_none() && !verbose,
        held: Mutex::new(Vec::new()),
        next_span: AtomicU64::new(1),
    }));
    let _ = LOGGER.set(logger);
    // Fails only when a subscriber is already set (never, in this binary).
    let _ = tracing::subscriber::set_global_default(Forward(logger));
    Ok(())
}

/// At the end of a command: held-back ONNX Runtime errors are printed as warnings when the
/// command succeeded, dropped when it failed (its error line says what went wrong).
pub fn finish(succeeded: bool) {
    let Some(logger) = LOGGER.get() else { return };
    let held = std::mem::take(&mut *logger.held.lock().unwrap_or_else(|p| p.into_inner()));
    if succeeded {
        for line in held {
            stderr_line("warning", &line);
        }
    }
}

/// One line on stderr, `zimage: LEVEL: message`; a closed stderr is ignored (there is nowhere
/// left to report it).
pub fn stderr_line(level: &str, message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "zimage: {level}: {}", crate::output::one_line(message));
}

struct Forward(&'static Logger);

impl Subscriber for Forward {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.is_span() || *metadata.level() <= self.0.max
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.0.max)
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        // Spans (ONNX Runtime wraps each line in one naming its logger) carry nothing printed.
        Id::from_u64(self.0.next_span.fetch_add(1, Ordering::Relaxed).max(1))
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let meta = event.metadata();
        let mut text = Message::default();
        event.record(&mut text);
        let from_ort = meta.target() == "ort" || meta.target().starts_with("ort::");
        let text = text.line();
        let line = if from_ort { format!("onnxruntime: {text}") } else { text };
        let level = *meta.level();
        if from_ort && level == Level::ERROR && self.0.hold_ort_errors {
            let mut held = self.0.held.lock().unwrap_or_else(|p| p.into_inner());
            if held.len() < MAX_HELD {
                held.push(line);
            }
            return;
        }
        let name = match level {
            Level::ERROR | Level::WARN => "warning",
            Level::INFO => "info",
            Level::DEBUG => "debug",
            Level::TRACE => "trace",
        };
        stderr_line(name, &line);
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// An event's message, then its other fields as `(name=value, ...)`.
#[derive(Default)]
struct Message {
    message: String,
    fields: Vec<String>,
}

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.push(field, format!("{value:?}"));
    }
}

impl Message {
    fn push(&mut self, field: &Field, value: String) {
        if field.name() == "message" {
            self.message = value;
        } else {
            self.fields.push(format!("{}={value}", field.name()));
        }
    }

    fn line(self) -> String {
        match (self.message.is_empty(), self.fields.is_empty()) {
            (_, true) => self.message,
            (true, false) => self.fields.join(", "),
            (false, false) => format!("{} ({})", self.message, self.fields.join(", ")),
        }
    }
}
