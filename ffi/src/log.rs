//! The log callback of one pipeline. It is set in the load parameters, never globally, so two
//! pipelines in one process (two plugins in one engine) each get their own messages. ONNX
//! Runtime's own lines reach the same callback through `ort_log`.

use std::ffi::{c_char, c_void};
use std::sync::{Arc, Condvar, Mutex};

use crate::strings::c_string;

/// How important a log message is. Passed to the log callback as a `uint32_t`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum zimage_log_level {
    /// An operation failed; the same text is in `zimage_last_error_message()`. Also ONNX
    /// Runtime's own errors (messages starting with "onnxruntime: ").
    Error = 1,
    /// Something worked, but not as asked (e.g. a graph fell back to CPU, a prompt was
    /// truncated). Also ONNX Runtime's own warnings ("onnxruntime: ...").
    Warn = 2,
    /// Milestones: a package loaded, a generation finished.
    Info = 3,
    /// Details: the parameters of each request; ONNX Runtime's informational lines when the
    /// `ORT_LOG` environment variable asks for them (ffi/README.md, "Log messages").
    Debug = 4,
}

/// Receives the log messages of one pipeline (or enhancer). `level` is a `zimage_log_level`;
/// `message` is UTF-8, NUL-terminated and valid only during the call (copy it to keep it).
///
/// It is called on the thread that made the zimage call being logged and, while a pipeline or
/// enhancer loads, also on the threads that load builds its sessions on (ONNX Runtime's own
/// lines come from those). Calls never overlap: zimage makes one call at a time to the
/// callback of one set of load parameters, whatever the threads, so the callback need not be
/// thread-safe. It should return promptly, as another thread's message waits for it. It may
/// call zimage functions itself (their messages then come to it on the same thread), but must
/// not wait for another thread's zimage call on the same pipeline, which may be waiting to log.
/// Two pipelines loaded with the same callback are two loggers: used from two threads, their
/// calls can overlap.
pub type zimage_log_callback = Option<unsafe extern "C" fn(level: u32, message: *const c_char, user_data: *mut c_void)>;

/// A C log callback and its user data. Clones share one [`Turn`]: a pipeline's logger and the
/// copies that carry it to its load's threads (`ort_log`) are one logger.
#[derive(Clone)]
pub(crate) struct Logger {
    callback: unsafe extern "C" fn(u32, *const c_char, *mut c_void),
    user_data: *mut c_void,
    turn: Arc<Turn>,
}

// The callback and user data are the caller's; the header promises calls that never overlap,
// which `turn` ensures, so they may be passed to any thread.
unsafe impl Send for Logger {}
unsafe impl Sync for Logger {}

impl Logger {
    pub fn new(callback: zimage_log_callback, user_data: *mut c_void) -> Option<Logger> {
        callback.map(|callback| Logger { callback, user_data, turn: Arc::default() })
    }

    pub fn log(&self, level: zimage_log_level, message: &str) {
        let message = c_string(message);
        self.turn.run(|| unsafe { (self.callback)(level as u32, message.as_ptr(), self.user_data) });
    }
}

/// Logs through an optional logger, formatting only when there is one.
pub(crate) fn log(logger: Option<&Logger>, level: zimage_log_level, message: impl FnOnce() -> String) {
    if let Some(logger) = logger {
        logger.log(level, &message());
    }
}

/// One call at a time to a logger's callback, across threads. Re-entrant on one thread: the
/// callback may call zimage, which logs through the same logger before the outer call returns.
#[derive(Default)]
struct Turn {
    /// The thread whose call runs ([`thread_token`]) and how deeply its calls are nested; a
    /// depth of 0 means free.
    holder: Mutex<(usize, usize)>,
    released: Condvar,
}

impl Turn {
    fn run(&self, call: impl FnOnce()) {
        let me = thread_token();
        let mut holder = self.holder.lock().unwrap_or_else(|p| p.into_inner());
        while holder.1 > 0 && holder.0 != me {
            holder = self.released.wait(holder).unwrap_or_else(|p| p.into_inner());
        }
        *holder = (me, holder.1 + 1);
        drop(holder);
        call();
        let mut holder = self.holder.lock().unwrap_or_else(|p| p.into_inner());
        holder.1 -= 1;
        if holder.1 == 0 {
            self.released.notify_one();
        }
    }
}

/// A number that tells the calling thread from every other running thread: the address of a
/// thread-local. A `const` one without a destructor stays readable while a thread's other
/// thread-locals are destroyed; 0 (never an address) only if it were not.
fn thread_token() -> usize {
    thread_local! {
        static TOKEN: u8 = const { 0 };
    }
    TOKEN.try_with(|t| t as *const u8 as usize).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread::ThreadId;
    use std::time::Duration;

    /// Records which threads are inside the callback. A message "outer" logs "nested" through
    /// the same logger from inside the callback, as a callback calling zimage would.
    #[derive(Default)]
    struct Probe {
        inside: Mutex<Vec<ThreadId>>,
        calls: AtomicUsize,
        nested: AtomicUsize,
        overlaps: AtomicUsize,
        logger: Mutex<Option<Logger>>,
    }

    unsafe extern "C" fn record_call(_: u32, message: *const c_char, user_data: *mut c_void) {
        let probe = unsafe { &*(user_data as *const Probe) };
        let me = std::thread::current().id();
        {
            let mut inside = probe.inside.lock().unwrap();
            if inside.iter().any(|t| *t != me) {
                probe.overlaps.fetch_add(1, Ordering::SeqCst);
            }
            if inside.contains(&me) {
                probe.nested.fetch_add(1, Ordering::SeqCst);
            }
            inside.push(me);
        }
        probe.calls.fetch_add(1, Ordering::SeqCst);
        if unsafe { std::ffi::CStr::from_ptr(message) }.to_bytes() == b"outer" {
            let logger = probe.logger.lock().unwrap().clone().unwrap();
            logger.log(zimage_log_level::Debug, "nested");
        }
        // Long enough for the other threads to try their calls meanwhile.
        std::thread::sleep(Duration::from_millis(2));
        let mut inside = probe.inside.lock().unwrap();
        let mine = inside.iter().rposition(|t| *t == me).unwrap();
        inside.remove(mine);
    }

    #[test]
    fn calls_to_one_logger_never_overlap_and_may_nest() {
        let probe = Probe::default();
        let logger = Logger::new(Some(record_call), &probe as *const Probe as *mut c_void).unwrap();
        *probe.logger.lock().unwrap() = Some(logger.clone());
        std::thread::scope(|s| {
            for _ in 0..4 {
                let logger = logger.clone();
                s.spawn(move || {
                    for _ in 0..10 {
                        logger.log(zimage_log_level::Info, "outer");
                    }
                });
            }
        });
        // 40 outer calls, each with its nested one (which ran inside it on its thread, without
        // waiting for itself), and never two threads inside the callback at once.
        assert_eq!(probe.calls.load(Ordering::SeqCst), 80);
        assert_eq!(probe.nested.load(Ordering::SeqCst), 40);
        assert_eq!(probe.overlaps.load(Ordering::SeqCst), 0);
        // Free again: another thread's call goes through.
        std::thread::spawn(move || logger.log(zimage_log_level::Info, "last")).join().unwrap();
        assert_eq!(probe.calls.load(Ordering::SeqCst), 81);
    }
}
