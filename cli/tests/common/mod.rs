//! Helpers shared by the CLI's integration tests: running the binary, scratch folders, exit
//! codes and one-line errors, reading PNGs with their text chunks, comparing with goldens.
//! Each test file uses a subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root: golden and package paths in the tests are relative to it.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The binary, run from the workspace root so that relative package paths work.
pub fn zimage<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zimage")).args(args).current_dir(root()).output().expect("run zimage")
}

/// A fresh, empty folder for one test's outputs (`group` keeps the test files apart).
pub fn scratch(group: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(group).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit code, with stderr in the message when it differs.
pub fn assert_code(out: &Output, code: i32) {
    assert_eq!(out.status.code(), Some(code), "stderr: {}", stderr(out));
}

/// Errors are exactly one line, `zimage: error: ...`, and nothing on stdout.
pub fn assert_one_line_error(out: &Output) -> String {
    let err = stderr(out);
    assert_eq!(err.lines().count(), 1, "expected one line, got: {err:?}");
    assert!(err.starts_with("zimage: error: "), "{err:?}");
    assert!(out.stdout.is_empty(), "stdout: {:?}", String::from_utf8_lossy(&out.stdout));
    err
}

/// An 8-bit RGB PNG and its text chunks (the generation parameters).
pub struct Png {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
    pub text: BTreeMap<String, String>,
}

pub fn read_png(path: &Path) -> Png {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file)).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).unwrap();
    assert_eq!((frame.color_type, frame.bit_depth), (png::ColorType::Rgb, png::BitDepth::Eight), "{}", path.display());
    buf.truncate(frame.buffer_size());
    let info = reader.info();
    let mut text = BTreeMap::new();
    for chunk in &info.utf8_text {
        text.insert(chunk.keyword.clone(), chunk.get_text().unwrap());
    }
    for chunk in &info.uncompressed_latin1_text {
        text.insert(chunk.keyword.clone(), chunk.text.clone());
    }
    Png { width: frame.width, height: frame.height, rgb: buf, text }
}

/// Largest per-channel difference between an output PNG and a golden one (same size required).
pub fn max_level_diff(out: &Png, golden: &Path) -> u8 {
    let want = read_png(golden);
    assert_eq!((out.width, out.height), (want.width, want.height), "size differs from {}", golden.display());
    out.rgb.iter().zip(&want.rgb).map(|(a, b)| a.abs_diff(*b)).max().unwrap()
}

/// Largest absolute difference; NaN as soon as either side holds one, so that a `<=` bound
/// fails on it (`f32::max` would drop the NaN and pass).
pub fn max_abs_diff<'a>(got: impl IntoIterator<Item = &'a f32>, want: impl IntoIterator<Item = &'a f32>) -> f32 {
    let mut worst = 0.0f32;
    for (a, b) in got.into_iter().zip(want) {
        let d = (a - b).abs();
        if d.is_nan() {
            return f32::NAN;
        }
        worst = worst.max(d);
    }
    worst
}
