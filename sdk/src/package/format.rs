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
/// folder is not.
pub(crate) fn read_manifest_json(dir: &Path, what_it_is_not: &str) -> Result<String> {
    let path = dir.join("manifest.json");
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
