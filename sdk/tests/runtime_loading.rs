//! Finding ONNX Runtime, in a test binary of its own because a process loads it only once.

use std::path::Path;

use zimage::{ErrorKind, LoadOptions, Pipeline};

#[test]
fn a_bad_library_path_is_a_runtime_error_naming_the_fix_then_the_search_succeeds() {
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-zimage");
    let missing = {
        let mut o = LoadOptions::default();
        o.runtime_library = Some("/nonexistent/libonnxruntime.so".into());
        o
    };
    let err = Pipeline::load(&package, &missing).err().expect("no such library");
    assert_eq!(err.kind(), ErrorKind::Runtime);
    let message = err.to_string();
    assert!(message.contains("/nonexistent/libonnxruntime.so"), "{message}");
    assert!(message.contains("onnxruntime==1.31.1"), "{message}");

    // A file that is not ONNX Runtime is refused without crashing.
    let not_ort = {
        let mut o = LoadOptions::default();
        o.runtime_library = Some(package.join("manifest.json"));
        o
    };
    assert_eq!(Pipeline::load(&package, &not_ort).err().unwrap().kind(), ErrorKind::Runtime);

    // The default search (ORT_DYLIB_PATH, beside the executable, .runtime/lib) still works.
    let pipeline = Pipeline::load(&package, &LoadOptions::default()).unwrap();
    assert!(pipeline.runtime_library().to_string_lossy().contains("onnxruntime"));
}
