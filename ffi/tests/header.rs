//! The committed include/zimage.h must be what cbindgen generates from ffi/src today, so an
//! ABI change always shows up as a header diff in review.
//!
//! `ZIMAGE_UPDATE_HEADER=1 cargo test -p zimage-ffi --test header` rewrites it.

use std::path::Path;

#[test]
fn committed_header_is_up_to_date() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header_path = crate_dir.join("../include/zimage.h");
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("ffi/cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen failed on ffi/src")
        .write(&mut generated);
    let generated = String::from_utf8(generated).expect("UTF-8 header");

    if std::env::var_os("ZIMAGE_UPDATE_HEADER").is_some() {
        std::fs::write(&header_path, &generated).expect("writing include/zimage.h");
        return;
    }
    let committed = std::fs::read_to_string(&header_path).unwrap_or_default();
    if committed != generated {
        let first_difference = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()));
        panic!(
            "include/zimage.h is out of date (first difference at line {}).\n\
             Regenerate it with: ZIMAGE_UPDATE_HEADER=1 cargo test -p zimage-ffi --test header",
            first_difference + 1
        );
    }
}
