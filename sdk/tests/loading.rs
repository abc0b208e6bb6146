//! How a pipeline loads: the VAE encoder's session is made by the first request that encodes
//! a picture (not at load), the other sessions are built concurrently, and either way errors
//! stay typed and results do not change.

mod common;

use std::error::Error as _;

use common::*;
use zimage::{Device, ErrorKind, GenerateRequest, InitImage, LoadOptions, MemoryMode, Pipeline};

fn options(mode: MemoryMode) -> LoadOptions {
    let mut o = LoadOptions::default();
    o.threads = Some(1);
    o.memory_mode = mode;
    o
}

fn request(prompt: &str) -> GenerateRequest {
    let mut r = GenerateRequest::new(prompt);
    r.width = 64;
    r.height = 64;
    r.steps = 2;
    r.seed = Some(7);
    r.return_latents = true;
    r
}

fn image_to_image(prompt: &str, picture: &zimage::RgbImage) -> GenerateRequest {
    let mut r = request(prompt);
    r.init_image = Some(InitImage::image_to_image(picture.clone()));
    r
}

/// A picture of the request's size with some structure (a gradient).
fn picture() -> zimage::RgbImage {
    let pixels = (0..64 * 64).flat_map(|i| [(i % 64 * 4) as u8, (i / 64 * 4) as u8, 128]).collect();
    zimage::RgbImage { width: 64, height: 64, pixels }
}

/// A temporary package: links to tiny-zimage's files, with the graph `graph` replaced by bytes
/// ONNX Runtime cannot parse (the manifest matches them, so only ONNX Runtime refuses them).
fn package_with_garbage(name: &str, graphs: &[&str]) -> std::path::PathBuf {
    let source = repo().join("models/tiny-zimage");
    let dir = std::env::temp_dir().join(format!("zimage-loading-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "manifest.json" {
            std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    let garbage = b"this is not an ONNX protobuf".to_vec();
    std::fs::write(dir.join("garbage.onnx"), &garbage).unwrap();
    let mut m = json(&source.join("manifest.json"));
    for graph in graphs {
        // Its prebuilt CPU layouts would be loaded instead (tests/cpu_layout.rs,
        // tests/cpu_prepacked.rs): gone too.
        m["graphs"][*graph].as_object_mut().unwrap().remove("cpu_layout");
        m["graphs"][*graph].as_object_mut().unwrap().remove("cpu_prepacked");
        m["graphs"][*graph]["path"] = "garbage.onnx".into();
        m["graphs"][*graph]["bytes"] = garbage.len().into();
        m["graphs"][*graph]["sha256"] = zimage::package::files::sha256_hex(&garbage).into();
    }
    std::fs::write(dir.join("manifest.json"), serde_json::to_string(&m).unwrap()).unwrap();
    dir
}

/// A broken VAE encoder does not stop text-to-image (its session is never made), and the first
/// request that needs it gets the package error load used to give, every time it is asked.
#[test]
fn the_vae_encoder_is_made_by_its_first_use_and_its_errors_stay_typed() {
    let dir = package_with_garbage("encoder", &["vae_encoder"]);
    for mode in [MemoryMode::Resident, MemoryMode::Sequential] {
        let broken = Pipeline::load(&dir, &options(mode)).expect("the encoder is not built at load");
        assert_eq!(broken.providers().vae_encoder, Device::Cpu);
        let text = broken.generate(&request("a lighthouse"), None).expect("text-to-image needs no encoder");
        let reference = pipeline("tiny-zimage").generate(&request("a lighthouse"), None).unwrap();
        assert_eq!(text.latents, reference.latents);
        assert_eq!(text.images, reference.images);
        for _ in 0..2 {
            let err = broken.generate(&image_to_image("a lighthouse", &picture()), None).expect_err("garbage");
            assert_eq!(err.kind(), ErrorKind::Package, "{err}");
            assert!(err.to_string().contains("vae_encoder"), "{err}");
            assert!(err.source().is_some(), "ONNX Runtime's error is kept: {err}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The first image-to-image requests of a fresh pipeline, made at once from several threads,
/// share one encoder session and give the images a pipeline that has used it before gives.
#[test]
fn concurrent_first_uses_of_the_vae_encoder_agree() {
    let warm = pipeline("tiny-zimage");
    let expected = warm.generate(&image_to_image("a red kite", &picture()), None).unwrap();
    for mode in [MemoryMode::Resident, MemoryMode::Sequential] {
        let fresh = Pipeline::load(repo().join("models/tiny-zimage"), &options(mode)).unwrap();
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|_| s.spawn(|| fresh.generate(&image_to_image("a red kite", &picture()), None).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for got in results {
            assert_eq!(got.latents, expected.latents, "{mode:?}");
            assert_eq!(got.images, expected.images, "{mode:?}");
        }
        // And it differs from text-to-image: the picture was really encoded.
        assert_ne!(expected.latents, warm.generate(&request("a red kite"), None).unwrap().latents);
    }
}

/// Sessions are built concurrently, but the error reported is the first in stage order (text
/// encoder, transformer, VAE decoder) whichever thread failed first.
#[test]
fn concurrent_loading_reports_errors_in_stage_order() {
    let cases: &[(&[&str], &str)] = &[
        (&["text_encoder", "transformer", "vae_decoder"], "text_encoder"),
        (&["transformer", "vae_decoder"], "transformer"),
        (&["vae_decoder"], "vae_decoder"),
    ];
    for (i, (graphs, named)) in cases.iter().enumerate() {
        let dir = package_with_garbage(&format!("order-{i}"), graphs);
        for _ in 0..3 {
            let err = Pipeline::load(&dir, &options(MemoryMode::Resident)).err().expect("garbage graphs");
            assert_eq!(err.kind(), ErrorKind::Package, "{err}");
            assert!(err.to_string().contains(&format!("could not load graph {named}:")), "{named}: {err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// What keeps a folder from being read as a package is a package error (exit 3 in the CLI)
/// that says what is wrong, never an I/O error about a path inside it or a hang; and a
/// manifest's format fields are quoted as JSON, not as Rust debug text.
#[test]
fn unreadable_manifests_are_package_errors_that_say_why() {
    let package = repo().join("models/tiny-zimage");
    let load = |dir: &std::path::Path| zimage::Manifest::read(dir).expect_err("not a package");
    // The package's manifest given instead of its folder.
    let e = load(&package.join("manifest.json"));
    assert_eq!(e.kind(), ErrorKind::Package, "{e}");
    assert!(e.to_string().contains("not a folder"), "{e}");

    let dir = copy_package(&package, "unreadable-manifest");
    let manifest = dir.join("manifest.json");
    let original = std::fs::read_to_string(&manifest).unwrap();
    std::fs::remove_file(&manifest).unwrap();
    // A folder, then a FIFO (opening it for reading would block), where the manifest should be.
    std::fs::create_dir(&manifest).unwrap();
    let e = load(&dir);
    assert!(e.kind() == ErrorKind::Package && e.to_string().contains("not a regular file"), "{e}");
    std::fs::remove_dir(&manifest).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(&manifest).status().unwrap().success());
    let e = load(&dir);
    assert!(e.kind() == ErrorKind::Package && e.to_string().contains("not a regular file"), "{e}");
    std::fs::remove_file(&manifest).unwrap();

    let head: serde_json::Value = serde_json::from_str(&original).unwrap();
    for (field, value, says) in [
        ("format_version", serde_json::json!("1"), "format_version \"1\" is not supported"),
        ("format_version", serde_json::json!(2), "format_version 2 is not supported"),
        ("format_version", serde_json::Value::Null, "format_version null is not supported"),
        ("format", serde_json::json!(7), "format is 7, expected"),
    ] {
        let mut edited = head.clone();
        edited[field] = value;
        std::fs::write(&manifest, edited.to_string()).unwrap();
        let e = load(&dir);
        assert!(e.kind() == ErrorKind::Package && e.to_string().contains(says), "{says}: {e}");
    }
    let mut edited = head.clone();
    edited.as_object_mut().unwrap().remove("format_version");
    std::fs::write(&manifest, edited.to_string()).unwrap();
    assert!(load(&dir).to_string().contains("format_version missing is not supported"));
    for (text, says) in [("null", "the manifest is null, not a JSON object"), ("[]", "is an array, not a JSON object")]
    {
        std::fs::write(&manifest, text).unwrap();
        let e = load(&dir);
        assert!(e.kind() == ErrorKind::Package && e.to_string().contains(says), "{e}");
    }
    // The enhancer's loader tells invalid JSON from another format.
    std::fs::write(&manifest, "").unwrap();
    let e = zimage::PromptEnhancer::load(&dir, &LoadOptions::default()).err().expect("an empty manifest");
    assert!(e.kind() == ErrorKind::Package && e.to_string().contains("invalid JSON"), "{e}");
    std::fs::write(&manifest, r#"{"format": "png"}"#).unwrap();
    let e = zimage::PromptEnhancer::load(&dir, &LoadOptions::default()).err().expect("another format");
    assert!(e.to_string().contains("format is \"png\", neither"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
