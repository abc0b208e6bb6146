//! The log callback of one pipeline. It is set in the load parameters, never globally, so two
//! pipelines in one process (two plugins in one engine) each get their own messages. ONNX
//! Runtime's own lines reach the same callback through `ort_log`.

use std::collections::VecDeque;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::{Arc, Mutex};

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
/// thread-safe. A message from a thread that finds the callback busy is not waited for: it is
/// queued, and the busy thread passes it to the callback right after (so a message can arrive on
/// another thread than the call it comes from; at most 4096 wait, then they are counted in one
/// WARN). It may call zimage functions itself, even on the pipeline whose message it receives
/// (their messages then come to it on the same thread). It must not throw (C++) or `longjmp`
/// through zimage. Two pipelines loaded with the same callback are two loggers: used from two
/// threads, their calls can overlap.
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
        self.turn.run(level as u32, c_string(message), |level, message| unsafe {
            (self.callback)(level, message.as_ptr(), self.user_data)
        });
    }
}

/// Logs through an optional logger, formatting only when there is one.
pub(crate) fn log(logger: Option<&Logger>, level: zimage_log_level, message: impl FnOnce() -> String) {
    if let Some(logger) = logger {
        logger.log(level, &message());
    }
}

/// One call at a time to a logger's callback, across threads, and never a wait for it: a
/// message from a thread that finds the callback busy with another thread's is queued, and the
/// busy thread delivers the queue before it lets go. A thread that logs while holding a lock
/// (inside an ONNX Runtime call, under a session's mutex) therefore never waits for a callback
/// that may itself be waiting for that lock (a callback calling zimage on the same pipeline).
/// Re-entrant on one thread: the callback may call zimage, which logs through the same logger
/// before the outer call returns.
#[derive(Default)]
struct Turn {
    state: Mutex<TurnState>,
}

#[derive(Default)]
struct TurnState {
    /// The thread whose call runs ([`thread_token`]) and how deeply its calls are nested; a
    /// depth of 0 means free.
    holder: usize,
    depth: usize,
    /// Other threads' messages, waiting for the holder to deliver them.
    queued: VecDeque<(u32, CString)>,
    /// Messages not queued because the queue was full.
    dropped: usize,
}

/// Most messages waiting for a busy callback (a callback slower than the logging); past it they
/// are counted and reported in one WARN line.
const MAX_QUEUED: usize = 4096;

impl Turn {
    fn run(&self, level: u32, message: CString, deliver: impl Fn(u32, &CStr)) {
        let me = thread_token();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.depth > 0 && state.holder != me {
            if state.queued.len() < MAX_QUEUED {
                state.queued.push_back((level, message));
            } else {
                state.dropped += 1;
            }
            return;
        }
        state.holder = me;
        state.depth += 1;
        let outermost = state.depth == 1;
        drop(state);
        deliver(level, &message);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // The outermost call delivers what others queued meanwhile, still holding the turn
        // (their nested messages then run on this thread, as the callback's own would).
        while outermost && (!state.queued.is_empty() || state.dropped > 0) {
            let next = match state.queued.pop_front() {
                Some(queued) => queued,
                None if state.dropped > 0 => {
                    let text = format!(
                        "zimage: {} log messages were dropped: the log callback was busy while more than {MAX_QUEUED} \
                         waited for it",
                        std::mem::take(&mut state.dropped)
                    );
                    (zimage_log_level::Warn as u32, c_string(&text))
                }
                None => unreachable!("checked by the loop's condition"),
            };
            drop(state);
            deliver(next.0, &next.1);
            state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        }
        state.depth -= 1;
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

    /// The callback holds thread A until thread B has logged: B's message is queued, B goes on
    /// (a B that waited, while holding a lock A's callback needs, deadlocked), and A delivers it
    /// on its own thread right after its own message.
    #[test]
    fn a_thread_never_waits_for_another_threads_callback() {
        struct Hold {
            inside: std::sync::mpsc::SyncSender<()>,
            other_logged: Mutex<std::sync::mpsc::Receiver<()>>,
            seen: Mutex<Vec<(String, ThreadId)>>,
            waited_in_vain: AtomicUsize,
        }
        unsafe extern "C" fn hold(_: u32, message: *const c_char, user_data: *mut c_void) {
            let hold = unsafe { &*(user_data as *const Hold) };
            let text = unsafe { std::ffi::CStr::from_ptr(message) }.to_string_lossy().into_owned();
            hold.seen.lock().unwrap().push((text.clone(), std::thread::current().id()));
            if text == "hold" {
                hold.inside.send(()).unwrap();
                if hold.other_logged.lock().unwrap().recv_timeout(Duration::from_secs(10)).is_err() {
                    hold.waited_in_vain.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        let (inside_tx, inside_rx) = std::sync::mpsc::sync_channel(1);
        let (logged_tx, logged_rx) = std::sync::mpsc::channel();
        let probe = Hold {
            inside: inside_tx,
            other_logged: Mutex::new(logged_rx),
            seen: Mutex::default(),
            waited_in_vain: AtomicUsize::new(0),
        };
        let logger = Logger::new(Some(hold), &probe as *const Hold as *mut c_void).unwrap();
        std::thread::scope(|s| {
            let a = logger.clone();
            let a_thread = s.spawn(move || {
                a.log(zimage_log_level::Info, "hold");
                std::thread::current().id()
            });
            inside_rx.recv().unwrap();
            logger.log(zimage_log_level::Info, "other"); // returns at once: queued
            logged_tx.send(()).unwrap();
            let a_id = a_thread.join().unwrap();
            assert_eq!(probe.waited_in_vain.load(Ordering::SeqCst), 0, "the other thread waited for the callback");
            let seen = probe.seen.lock().unwrap();
            assert_eq!(*seen, [("hold".to_string(), a_id), ("other".to_string(), a_id)]);
        });
    }
}
