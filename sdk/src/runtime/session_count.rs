//! How many ONNX Runtime sessions this process has created from each graph file: a
//! diagnostic of what a load or a switch really built (e.g. that loading a pipeline with a
//! ControlNet never creates the plain transformer's session, so its weights are never in
//! memory twice). Files are keyed by their canonical path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

static CREATED: Mutex<BTreeMap<PathBuf, usize>> = Mutex::new(BTreeMap::new());

fn key(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

/// Counts one session created from `path` (called by the one function that builds sessions).
pub(crate) fn record(path: &Path) {
    let key = key(path);
    *CREATED.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_insert(0) += 1;
}

/// Sessions this process has created from the graph file `path` so far.
pub fn sessions_created(path: &Path) -> usize {
    CREATED.lock().unwrap_or_else(|p| p.into_inner()).get(&key(path)).copied().unwrap_or(0)
}
