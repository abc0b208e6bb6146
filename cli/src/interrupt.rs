//! Ctrl-C at any moment: exit 130, and nothing half-written left behind.
//!
//! - While the SDK runs (a generation, an enhancement): the first Ctrl-C cancels it through the
//!   pipeline's cancel handle, and the progress callback also stops at the next step; the SDK
//!   returns `Cancelled` and the command ends with exit 130 through its normal error path.
//! - At any other moment (loading a package, writing the outputs), or on a second Ctrl-C: the
//!   temporary files of the outputs being written are removed and the process exits with 130
//!   at once.
//! - Once every output is renamed into place: the first Ctrl-C is ignored and the command ends
//!   as it would have (exit 0, its summary printed), since its outputs are all there.
//!
//! Outputs are written through [`stage`] and [`commit_all`]: every output goes to a temporary
//! file first (registered here before a byte is written), and all are renamed into place
//! together, under the same lock the handler takes, so the handler sees either temporary files
//! to remove or finished outputs, never half of a file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use zimage::image_io::StagedFile;
use zimage::CancelHandle;

#[derive(Default)]
struct State {
    cancel: Option<CancelHandle>,
    /// The SDK is running a generation or an enhancement that the cancel handle stops.
    running: bool,
    interrupted: bool,
    /// Temporary files being written.
    pending: Vec<PathBuf>,
    /// Every output is complete and in place: nothing is left to cancel.
    committed: bool,
}

static STATE: Mutex<State> =
    Mutex::new(State { cancel: None, running: false, interrupted: false, pending: Vec::new(), committed: false });
static PRESSES: AtomicU32 = AtomicU32::new(0);

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Installs the Ctrl-C (SIGINT, console) handler.
pub fn install() {
    // Without a handler Ctrl-C keeps its default effect (the process ends), which is still
    // correct, only less tidy.
    let _ = ctrlc::set_handler(on_interrupt);
}

fn on_interrupt() {
    let first = PRESSES.fetch_add(1, Ordering::SeqCst) == 0;
    let mut st = state();
    // The outputs are written: the command is done but for its summary, and ends with 0 in a
    // moment (exit 130 would tell a script that nothing was written). A second press still
    // ends it at once, e.g. while the summary waits on a full pipe.
    if first && st.committed {
        return;
    }
    st.interrupted = true;
    if first && st.running {
        if let Some(handle) = &st.cancel {
            handle.cancel();
            return;
        }
    }
    for temp in &st.pending {
        let _ = std::fs::remove_file(temp);
    }
    // The lock stays held: no output is renamed into place after this point.
    exit_now(130)
}

/// The handle that cancels the SDK's runs (the loaded pipeline's, or the enhancer's).
pub fn set_cancel_handle(handle: CancelHandle) {
    state().cancel = Some(handle);
}

/// True once Ctrl-C was pressed.
pub fn interrupted() -> bool {
    state().interrupted
}

/// Runs SDK work that Ctrl-C cancels through the cancel handle. A Ctrl-C that arrives after
/// the work's last cancellation point still makes the result `Cancelled`.
pub fn run_cancellable<T>(work: impl FnOnce() -> zimage::Result<T>) -> zimage::Result<T> {
    {
        let mut st = state();
        if st.interrupted {
            return Err(zimage::Error::Cancelled);
        }
        st.running = true;
    }
    let result = work();
    let mut st = state();
    st.running = false;
    match result {
        Ok(_) if st.interrupted => Err(zimage::Error::Cancelled),
        other => other,
    }
}

/// Creates the temporary file for the output `dest` and registers it for removal on Ctrl-C.
pub fn stage(dest: &Path) -> zimage::Result<StagedFile> {
    let mut st = state();
    if st.interrupted {
        return Err(zimage::Error::Cancelled);
    }
    let staged = StagedFile::create(dest)?;
    st.pending.push(staged.temp_path().to_path_buf());
    Ok(staged)
}

/// Renames every staged output into place, all under the handler's lock. If one rename fails,
/// the outputs already renamed are removed again: all of them, or none.
pub fn commit_all(files: Vec<StagedFile>) -> zimage::Result<()> {
    let mut st = state();
    if st.interrupted {
        return Err(zimage::Error::Cancelled);
    }
    let mut done: Vec<PathBuf> = Vec::new();
    let mut failure = None;
    for file in files {
        let dest = file.dest().to_path_buf();
        if failure.is_some() {
            continue; // dropped: its temporary file is removed
        }
        match file.commit() {
            Ok(()) => done.push(dest),
            Err(e) => failure = Some(e),
        }
    }
    st.pending.clear();
    match failure {
        Some(e) => {
            for path in done {
                let _ = std::fs::remove_file(path);
            }
            Err(e)
        }
        None => {
            st.committed = true;
            Ok(())
        }
    }
}

/// Ends the process from the Ctrl-C handler's thread while the main thread may be inside ONNX
/// Runtime (loading, or after a second Ctrl-C): `std::process::exit` would run ONNX Runtime's
/// C++ static destructors while that thread still uses them.
fn exit_now(code: i32) -> ! {
    #[cfg(unix)]
    // SAFETY: _exit ends the process at once; nothing after it runs.
    unsafe {
        libc::_exit(code)
    }
    #[cfg(not(unix))]
    std::process::exit(code)
}
