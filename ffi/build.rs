//! Gives libzimage.so a SONAME. Without one (Rust's default) a program linked against it
//! records the bare path it was linked with, and library versions cannot sit side by side.
//! The number is the ABI major version: bump it when the C ABI breaks.

fn main() {
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os == "linux" || target_os == "android" || target_os.ends_with("bsd") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libzimage.so.2");
    }
}
