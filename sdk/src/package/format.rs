//! The package formats' names and version, and reading a package's `manifest.json`.

use std::path::Path;

use crate::error::{Error, Result};
use crate::image_io::read_file_capped;
use crate::limits::MAX_MANIFEST_BYTES;

/// `format` of a Z-Image model package.
pub const FORMAT_NAME: &str = "zimage-model-package";
/// `format` of a standalone prompt-enhancer package.
pub const ENHANCER_FORMAT_NAME: &str = "zimage-enhancer-package";
/// The `format_version` this runtime reads (both formats).
pub const FORMAT_VERSION: u32 = 1;

/// Reads `dir/manifest.json` as text; a missing file is a package error that says what the
/// folder is not, and so is anything that keeps it from being read as a package (`dir` a
/// file, the manifest a folder, a FIFO, a device or a link loop).
pub(crate) fn read_manifest_json(dir: &Path, what_it_is_not: &str) -> Result<String> {
    let path = dir.join("manifest.json");
    // Checked before opening: opening a FIFO blocks until a writer comes.
    match std::fs::metadata(&path) {
        Ok(meta) if !meta.is_file() => return Err(Error::package(&path, "not a regular file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            return Err(Error::package(dir, "not a folder (give the package's folder)"))
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::package(&path, format!("cannot be read: {e}")))
        }
        _ => {}
    }
    let bytes = read_file_capped(&path, MAX_MANIFEST_BYTES).map_err(|e| match e {
        // (a mistyped path is the usual cause: say so rather than blame the folder's contents)
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound && !dir.exists() => {
            Error::package(dir, "no such folder")
        }
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Error::package(dir, format!("no manifest.json: {what_it_is_not}"))
        }
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::FileTooLarge => {
            Error::package(&path, format!("the file is {source}"))
        }
        other => other,
    })?;
    String::from_utf8(bytes).map_err(|_| Error::package(&path, "not UTF-8 text"))
}

/// What kind of JSON value `v` is, for messages.
pub(crate) fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A manifest field as its JSON text, for messages: `2`, `"1"`, `1.5`, or `missing`.
pub(crate) fn json_field(head: &serde_json::Value, key: &str) -> String {
    head.get(key).map_or_else(|| "missing".to_string(), |v| v.to_string())
}
