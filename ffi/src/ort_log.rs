//! ONNX Runtime's own log lines, to the log callback of the call that caused them.
//!
//! With ort's `tracing` feature, ONNX Runtime's messages (and the ort crate's) are `tracing`
//! events whose target starts with `ort`. libzimage installs one process-wide subscriber, once,
//! and only when no other is set (a Rust host that set its own keeps it, and gets the events
//! there). The subscriber hands each `ort` event to the logger of the zimage call running on
//! the current thread, which every entry point with a pipeline or enhancer names with
//! [`CurrentLogger::enter`]. Events on threads with no such call (ONNX Runtime's own worker
//! threads, say) or without a logger are dropped, and so is every non-`ort` event: the SDK's
//! own warnings are reported by the C layer itself, with more context (a CPU fallback: see
//! `pipeline.rs`).
//!
//! ONNX Runtime then logs everything (ort creates its environment at VERBOSE and leaves the
//! filtering to the subscriber): hundreds of lines per session. Forwarded by default are
//! warnings and errors, at `ZIMAGE_LOG_LEVEL_WARN` and `_ERROR`. `ORT_LOG` (the variable ort
//! reads for the same purpose when it does not use `tracing`: `fatal`, `error`, `warning`,
//! `info`, `verbose`), read once, moves that threshold; informational and verbose lines then
//! arrive at `ZIMAGE_LOG_LEVEL_DEBUG`, as details. Every forwarded message starts with
//! "onnxruntime: ".
//!
//! Only `tracing` (its core traits) is needed: no formatting layers, no filters.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use sdk::pipeline::LOAD_JOB_TARGET;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::{Interest, Subscriber};
use tracing::{Event, Level, Metadata};

use crate::log::{zimage_log_level, Logger};

thread_local! {
    /// The logger of the zimage call running on this thread, if any.
    static CURRENT: RefCell<Option<Logger>> = const { RefCell::new(None) };
    /// The loggers [`CURRENT`] held before each load-job span entered on this thread.
    static BEFORE_SPANS: RefCell<Vec<Option<Logger>>> = const { RefCell::new(Vec::new()) };
}

// Both are read with `try_with`: a zimage call can come from a thread whose thread-locals are
// being destroyed (a pthread_key destructor), where `with` panics. Such a call has no logger
// for ONNX Runtime's lines; its own messages still reach the callback.

/// The current thread's logger (a clone: the callback may call zimage, which changes it).
fn current() -> Option<Logger> {
    CURRENT.try_with(|c| c.borrow().clone()).ok().flatten()
}

/// Makes `logger` the current thread's; returns the one it replaces.
fn set_current(logger: Option<Logger>) -> Option<Logger> {
    CURRENT.try_with(|c| c.replace(logger)).ok().flatten()
}

/// The SDK builds a pipeline's sessions concurrently on threads of its own, each inside a span
/// (target [`LOAD_JOB_TARGET`]) made on the calling thread. The span carries the calling
/// thread's logger to the job's thread: entering it makes that logger current there, so
/// ONNX Runtime's lines from every session of a load reach the load call's callback.
/// Span id -> (logger, handles to the span).
type SpanTable = BTreeMap<u64, (Option<Logger>, usize)>;
static SPAN_LOGGERS: Mutex<SpanTable> = Mutex::new(BTreeMap::new());
static NEXT_SPAN: AtomicU64 = AtomicU64::new(1);

fn span_loggers<T>(f: impl FnOnce(&mut SpanTable) -> T) -> T {
    f(&mut SPAN_LOGGERS.lock().unwrap_or_else(|p| p.into_inner()))
}

fn is_load_job(metadata: &Metadata<'_>) -> bool {
    metadata.is_span() && metadata.target() == LOAD_JOB_TARGET
}

/// Names the logger of the zimage call on this thread for as long as it lives; restores the
/// previous one (a nested call's caller) when dropped.
#[must_use = "the logger is current only while the guard lives"]
pub(crate) struct CurrentLogger {
    previous: Option<Logger>,
    // Thread-bound: dropping it on another thread would restore the wrong thread's logger.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl CurrentLogger {
    /// Makes `logger` (None: no logger) the current thread's until the guard is dropped, and
    /// installs the forwarding subscriber the first time a logger is given.
    pub fn enter(logger: Option<Logger>) -> CurrentLogger {
        if logger.is_some() {
            install();
        }
        let previous = set_current(logger);
        CurrentLogger { previous, _not_send: std::marker::PhantomData }
    }
}

impl Drop for CurrentLogger {
    fn drop(&mut self) {
        set_current(self.previous.take());
    }
}

/// Sets [`Forward`] as the global default subscriber unless one is already set.
fn install() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        if !tracing::dispatcher::has_been_set() {
            // Err: a host thread set one in between, which then wins; nothing to undo.
            let _ = tracing::subscriber::set_global_default(Forward);
        }
    });
}

/// The least severe level forwarded: `ORT_LOG`'s, read once, or WARN.
fn threshold() -> Level {
    #[cfg(test)]
    if let Some(level) = *tests::THRESHOLD.lock().unwrap_or_else(|e| e.into_inner()) {
        return level;
    }
    static THRESHOLD: OnceLock<Level> = OnceLock::new();
    *THRESHOLD.get_or_init(|| threshold_for(std::env::var("ORT_LOG").ok().as_deref()))
}

/// `ORT_LOG`'s values, as ort reads them (anything else: the default, warnings).
fn threshold_for(ort_log: Option<&str>) -> Level {
    match ort_log {
        Some("fatal" | "error") => Level::ERROR,
        Some("info") => Level::INFO,
        Some("verbose") => Level::TRACE,
        _ => Level::WARN,
    }
}

/// Whether events of this callsite may go to the C log callback: ort's, of any level (the
/// level is checked per event, against [`threshold`]).
fn from_ort(metadata: &Metadata<'_>) -> bool {
    let target = metadata.target();
    metadata.is_event() && (target == "ort" || target.starts_with("ort::"))
}

/// ERROR and WARN keep their level; the rest is detail.
fn level(level: &Level) -> zimage_log_level {
    match *level {
        Level::ERROR => zimage_log_level::Error,
        Level::WARN => zimage_log_level::Warn,
        _ => zimage_log_level::Debug,
    }
}

/// The subscriber. The only spans it tracks are the SDK's load jobs (above); ONNX Runtime's
/// own spans (its code location sits in one) are not: the message reads well without them.
struct Forward;

impl Subscriber for Forward {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        // "Sometimes": whether an event is wanted depends on the thread's current logger.
        if from_ort(metadata) || is_load_job(metadata) {
            Interest::sometimes()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        let has_logger = CURRENT.try_with(|c| c.borrow().is_some()).unwrap_or(false);
        if is_load_job(metadata) {
            return has_logger;
        }
        from_ort(metadata) && *metadata.level() <= threshold() && has_logger
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        // Only load-job spans are enabled: they take the creating thread's logger along.
        let id = NEXT_SPAN.fetch_add(1, Ordering::Relaxed);
        let logger = current();
        span_loggers(|spans| spans.insert(id, (logger, 1)));
        Id::from_u64(id)
    }

    fn clone_span(&self, id: &Id) -> Id {
        span_loggers(|spans| {
            if let Some(entry) = spans.get_mut(&id.into_u64()) {
                entry.1 += 1;
            }
        });
        id.clone()
    }

    fn try_close(&self, id: Id) -> bool {
        span_loggers(|spans| match spans.get_mut(&id.into_u64()) {
            Some(entry) if entry.1 > 1 => {
                entry.1 -= 1;
                false
            }
            Some(_) => {
                spans.remove(&id.into_u64());
                true
            }
            None => false,
        })
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let Some(logger) = current() else { return };
        let mut text = Text(String::from("onnxruntime: "));
        event.record(&mut text);
        logger.log(level(event.metadata().level()), &text.0);
    }

    fn enter(&self, id: &Id) {
        let logger = span_loggers(|spans| spans.get(&id.into_u64()).and_then(|entry| entry.0.clone()));
        let before = set_current(logger);
        let _ = BEFORE_SPANS.try_with(|stack| stack.borrow_mut().push(before));
    }

    fn exit(&self, _: &Id) {
        if let Ok(Some(before)) = BEFORE_SPANS.try_with(|stack| stack.borrow_mut().pop()) {
            set_current(before);
        }
    }
}

/// The event's message, then its other fields as ` name=value`.
struct Text(String);

impl Visit for Text {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::{c_char, c_void, CStr};
    use std::sync::Mutex;

    /// Replaces `ORT_LOG`'s threshold while set; tests that depend on the threshold hold
    /// [`SERIAL`].
    pub(super) static THRESHOLD: Mutex<Option<Level>> = Mutex::new(None);
    static SERIAL: Mutex<()> = Mutex::new(());

    unsafe extern "C" fn collect(level: u32, message: *const c_char, user_data: *mut c_void) {
        let lines = unsafe { &*(user_data as *const Mutex<Vec<(u32, String)>>) };
        let message = unsafe { CStr::from_ptr(message) }.to_str().unwrap().to_owned();
        lines.lock().unwrap().push((level, message));
    }

    #[test]
    fn ort_events_reach_the_current_logger_only() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let lines: Mutex<Vec<(u32, String)>> = Mutex::new(Vec::new());
        let logger = Logger::new(Some(collect), &lines as *const _ as *mut c_void);
        {
            let _current = CurrentLogger::enter(logger);
            tracing::warn!(target: "ort::logging", "conv {} fell back", 3);
            tracing::error!(target: "ort", source = "session", "no provider");
            tracing::warn!(target: "zimage::runtime::session", "not ort");
            tracing::warn!(target: "ortho", "not ort either");
            // Another thread has no current logger: nothing arrives from it.
            std::thread::scope(|s| {
                s.spawn(|| tracing::error!(target: "ort::logging", "other thread"));
            });
            {
                // A nested call without a logger hides the outer one, then gives it back.
                let _inner = CurrentLogger::enter(None);
                tracing::error!(target: "ort::logging", "nested");
            }
            tracing::warn!(target: "ort::logging", "after nested");
            // ONNX Runtime's informational and verbose lines: only when ORT_LOG asks for them.
            tracing::info!(target: "ort::logging", "Session successfully initialized.");
            tracing::trace!(target: "ort::lifetime", "+NEW Session");
        }
        // Without a guard nothing is called.
        tracing::error!(target: "ort::logging", "no call running");
        // What arrives, in order, at the default threshold (WARN); ORT_LOG moves it.
        let expected: Vec<(u32, &str)> = [
            (Level::WARN, zimage_log_level::Warn, "onnxruntime: conv 3 fell back"),
            (Level::ERROR, zimage_log_level::Error, "onnxruntime: no provider source=session"),
            (Level::WARN, zimage_log_level::Warn, "onnxruntime: after nested"),
            (Level::INFO, zimage_log_level::Debug, "onnxruntime: Session successfully initialized."),
            (Level::TRACE, zimage_log_level::Debug, "onnxruntime: +NEW Session"),
        ]
        .into_iter()
        .filter(|(emitted, _, _)| *emitted <= threshold())
        .map(|(_, level, text)| (level as u32, text))
        .collect();
        if threshold() == Level::WARN {
            assert_eq!(expected.len(), 3);
        }
        let lines = lines.lock().unwrap();
        let got: Vec<(u32, &str)> = lines.iter().map(|(l, m)| (*l, m.as_str())).collect();
        assert_eq!(got, expected);
    }

    /// Runs `load` (a load call, which frees what it loaded) with load parameters whose log
    /// callback collects the lines, ONNX Runtime's INFO lines included; checks it succeeded and
    /// returns the lines.
    fn load_at_info(
        load: impl FnOnce(&crate::load_params::zimage_load_params) -> crate::error::zimage_result,
    ) -> Vec<(u32, String)> {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let lines: Mutex<Vec<(u32, String)>> = Mutex::new(Vec::new());
        let mut params = std::mem::MaybeUninit::<crate::load_params::zimage_load_params>::uninit();
        unsafe { crate::load_params::zimage_load_params_init(params.as_mut_ptr()) };
        let mut params = unsafe { params.assume_init() };
        params.log_callback = Some(collect);
        params.log_user_data = &lines as *const _ as *mut c_void;
        *THRESHOLD.lock().unwrap() = Some(Level::INFO);
        let code = load(&params);
        *THRESHOLD.lock().unwrap() = None;
        assert_eq!(code, crate::error::zimage_result::Ok);
        lines.into_inner().unwrap()
    }

    /// A pipeline's sessions are built on several threads at once: ONNX Runtime's lines from
    /// every one of them reach the load call's logger (one "Session successfully initialized."
    /// per session built at load: text encoder, transformer, VAE decoder; the VAE encoder's is
    /// made by its first use).
    #[test]
    fn onnx_runtime_lines_of_every_loading_thread_reach_the_load_calls_logger() {
        let lines = load_at_info(|params| {
            let package = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny-zimage\0");
            let mut pipeline = std::ptr::null_mut();
            let code = unsafe { crate::pipeline::zimage_pipeline_load(package.as_ptr().cast(), params, &mut pipeline) };
            unsafe { crate::pipeline::zimage_pipeline_free(pipeline) };
            code
        });
        let initialised = lines.iter().filter(|(_, m)| m == "onnxruntime: Session successfully initialized.").count();
        assert_eq!(initialised, 3, "ONNX Runtime's lines of {initialised} of the 3 sessions arrived");
        // The load-job spans are closed: nothing is left behind in the span table.
        assert!(span_loggers(|spans| spans.is_empty()));
    }

    #[test]
    fn ort_log_moves_the_threshold() {
        assert_eq!(threshold_for(None), Level::WARN);
        assert_eq!(threshold_for(Some("warning")), Level::WARN);
        assert_eq!(threshold_for(Some("nonsense")), Level::WARN);
        assert_eq!(threshold_for(Some("error")), Level::ERROR);
        assert_eq!(threshold_for(Some("fatal")), Level::ERROR);
        assert_eq!(threshold_for(Some("info")), Level::INFO);
        assert_eq!(threshold_for(Some("verbose")), Level::TRACE);
        assert_eq!((level(&Level::ERROR), level(&Level::WARN)), (zimage_log_level::Error, zimage_log_level::Warn));
        assert_eq!((level(&Level::INFO), level(&Level::TRACE)), (zimage_log_level::Debug, zimage_log_level::Debug));
    }

    /// The whole way, with ONNX Runtime itself: loading a graph makes ONNX Runtime log
    /// ("Session successfully initialized." and hundreds more at INFO), ort turns the lines into
    /// `tracing` events, and they reach the logger of the load call as DEBUG messages.
    #[test]
    fn onnx_runtime_lines_reach_the_loading_calls_logger() {
        let lines = load_at_info(|params| {
            let package = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny-qwen3-enhancer\0");
            let mut enhancer = std::ptr::null_mut();
            let code = unsafe { crate::enhancer::zimage_enhancer_load(package.as_ptr().cast(), params, &mut enhancer) };
            unsafe { crate::enhancer::zimage_enhancer_free(enhancer) };
            code
        });
        let initialised =
            (zimage_log_level::Debug as u32, "onnxruntime: Session successfully initialized.".to_string());
        assert!(lines.contains(&initialised), "no ONNX Runtime line among {lines:?}");
        // zimage's own messages are still there, and nothing of ONNX Runtime's came at INFO.
        assert_eq!(lines.iter().filter(|(level, _)| *level == zimage_log_level::Info as u32).count(), 2);
        assert!(lines
            .iter()
            .filter(|(_, m)| m.starts_with("onnxruntime: "))
            .all(|(l, _)| *l == zimage_log_level::Debug as u32));
    }
}
