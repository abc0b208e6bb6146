//! The files a manifest names: presence, size and sha256 checks, and path safety.

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Files at most this large are always checked against their sha256 at load time.
pub const ALWAYS_HASH_BELOW_BYTES: u64 = 64 * 1024 * 1024;

/// One file of a package.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// Absolute path of a file named in a manifest (already checked to stay inside `dir`).
pub fn resolve(dir: &Path, relative: &str) -> PathBuf {
    dir.join(relative)
}

/// Checks every file of a package: the tokenizer-like files and each graph's file and external
/// data, in order. A weights file shared by several graphs is listed once per graph with the
/// same entry; it is checked once, and two different entries for one path are an error.
pub(crate) fn check_package_files(
    dir: &Path,
    files: impl IntoIterator<Item = FileEntry>,
    verify_all: bool,
) -> Result<()> {
    let mut entries: Vec<FileEntry> = Vec::new();
    for file in files {
        match entries.iter().find(|e| e.path == file.path) {
            Some(seen) if seen.bytes == file.bytes && seen.sha256.eq_ignore_ascii_case(&file.sha256) => continue,
            Some(_) => {
                return Err(Error::package(
                    dir,
                    format!("{} is listed twice with different sizes or checksums", file.path),
                ))
            }
            None => entries.push(file),
        }
    }
    for entry in &entries {
        check_file(dir, entry, verify_all)?;
    }
    Ok(())
}

fn check_file(dir: &Path, entry: &FileEntry, verify_all: bool) -> Result<()> {
    let rel = Path::new(&entry.path);
    if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(Error::package(
            dir,
            format!("file path {:?} must be relative and stay inside the package", entry.path),
        ));
    }
    let path = dir.join(rel);
    let meta = std::fs::metadata(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::package(dir, format!("{} is missing", entry.path))
        } else {
            Error::io(&path, e)
        }
    })?;
    // A device or pipe (a link to /dev/zero) has no size to check and would be read forever.
    if !meta.is_file() {
        return Err(Error::package(dir, format!("{} is not a regular file", entry.path)));
    }
    if meta.len() != entry.bytes {
        return Err(Error::package(
            dir,
            format!(
                "{} has {} bytes, the manifest says {} (incomplete download or copy?)",
                entry.path,
                meta.len(),
                entry.bytes
            ),
        ));
    }
    if verify_all || entry.bytes < ALWAYS_HASH_BELOW_BYTES {
        let actual = sha256_file(&path)?;
        if !actual.eq_ignore_ascii_case(&entry.sha256) {
            return Err(Error::package(
                dir,
                format!("{} has sha256 {actual}, the manifest says {}", entry.path, entry.sha256),
            ));
        }
    }
    Ok(())
}

/// Lower-case hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lower-case hex sha256 of a byte string.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
