//! Prebuilt CPU layouts (a graph entry's `cpu_layout`, docs/package-format.md). tiny-zimage's
//! three VAE graphs carry them, made for NCHWc blocks of 16 (AVX-512). On the CPU, when ONNX
//! Runtime's block width is that one, they are loaded instead of the portable graphs and give
//! exactly their pixels; a layout for another width, or one ONNX Runtime refuses, is passed over
//! for the portable graph; a missing layout file is a package error like any missing file.
//! (Other tests that need the portable VAE graphs' sessions drop the layouts from a copy's
//! manifest: tests/behaviour.rs.)

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;
use zimage::runtime::session_count::sessions_created;
use zimage::{Device, ErrorKind, GenerateRequest, GrayImage, InitImage, LoadOptions, Pipeline, RgbImage};

const GRAPHS: [&str; 3] = ["vae_decoder", "vae_decoder_cpu", "vae_encoder"];
/// The width tiny-zimage's layouts were made for.
const COMMITTED_WIDTH: u32 = 16;

fn options(winograd_vae: bool) -> LoadOptions {
    let mut options = LoadOptions::default();
    options.threads = Some(1);
    options.device = Device::Cpu;
    options.winograd_vae = winograd_vae;
    options
}

/// Whether this machine's ONNX Runtime uses the committed layouts' block width.
fn layouts_fit() -> bool {
    let rt = zimage::runtime::runtime(None).expect("ONNX Runtime");
    zimage::runtime::nchwc::block_width(rt) == Some(COMMITTED_WIDTH)
}

/// A copy of tiny-zimage (its own folder, so the sessions counted for its files are this
/// test's alone) whose manifest `edit` changes; `edit` may also change the copied files.
fn variant(name: &str, edit: impl FnOnce(&mut Value, &Path)) -> PathBuf {
    edited_copy(&repo().join("models/tiny-zimage"), &format!("cpu-layout-{name}"), edit)
}

/// Text-to-image, image-to-image and inpainting: together they run all three VAE graphs.
fn requests() -> Vec<GenerateRequest> {
    let (width, height) = (64u32, 48u32);
    let picture = RgbImage { width, height, pixels: (0..width * height * 3).map(|i| ((i * 37) % 251) as u8).collect() };
    let mask = GrayImage {
        width,
        height,
        pixels: (0..width * height).map(|i| if (i % width) < width / 2 { 255 } else { 0 }).collect(),
    };
    let base = |seed| {
        let mut request = GenerateRequest::new("a lighthouse on a cliff");
        request.width = width;
        request.height = height;
        request.steps = 2;
        request.seed = Some(seed);
        request
    };
    let mut image_to_image = base(5);
    image_to_image.init_image = Some(InitImage::image_to_image(picture.clone()));
    let mut inpaint = base(6);
    inpaint.init_image = Some(InitImage::inpaint(picture, mask));
    vec![base(4), image_to_image, inpaint]
}

/// The images of `requests()` from `package`.
fn images(package: &Path, winograd_vae: bool) -> Vec<RgbImage> {
    let pipeline = Pipeline::load(package, &options(winograd_vae)).expect("load");
    let images: Vec<RgbImage> =
        requests().iter().flat_map(|request| pipeline.generate(request, None).expect("generate").images).collect();
    assert_eq!(images.len(), 3);
    for image in &images {
        // Not a flat picture: equal images below must mean equal decodes.
        assert!(image.pixels.iter().any(|&p| p != image.pixels[0]));
    }
    images
}

fn layout_file(graph: &str) -> String {
    format!("{graph}.nchwc{COMMITTED_WIDTH}.onnx")
}

fn without_layouts(name: &str) -> PathBuf {
    variant(name, |m, dir| {
        for graph in GRAPHS {
            m["graphs"][graph].as_object_mut().unwrap().remove("cpu_layout");
            fs::remove_file(dir.join(layout_file(graph))).unwrap();
        }
    })
}

#[test]
fn layouts_are_loaded_where_they_fit_and_give_the_portable_graphs_pixels() {
    let with = variant("with", |_, _| {});
    let without = without_layouts("without");
    let fits = layouts_fit();
    for winograd_vae in [false, true] {
        assert_eq!(images(&with, winograd_vae), images(&without, winograd_vae), "winograd_vae {winograd_vae}");
    }
    // Each graph's session was made once per load that used it (the encoder on first use):
    // from the layout where the width fits, from the portable file otherwise.
    for (graph, loads) in [("vae_decoder", 1), ("vae_decoder_cpu", 1), ("vae_encoder", 2)] {
        let (layout, portable) = (with.join(layout_file(graph)), with.join(format!("{graph}.onnx")));
        let expected = if fits { (loads, 0) } else { (0, loads) };
        assert_eq!((sessions_created(&layout), sessions_created(&portable)), expected, "{graph}");
        assert_eq!(sessions_created(&without.join(format!("{graph}.onnx"))), loads, "{graph}");
    }
    for dir in [with, without] {
        fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn a_layout_for_another_width_or_one_onnx_runtime_refuses_is_passed_over() {
    let want = images(&without_layouts("reference"), false);
    // No MLAS build uses 32-float blocks.
    let other_width = variant("other-width", |m, _| {
        for graph in GRAPHS {
            m["graphs"][graph]["cpu_layout"]["nchwc_block"] = 32.into();
        }
    });
    assert_eq!(images(&other_width, false), want);
    for graph in ["vae_decoder", "vae_encoder"] {
        assert_eq!(sessions_created(&other_width.join(layout_file(graph))), 0, "{graph}");
        assert_eq!(sessions_created(&other_width.join(format!("{graph}.onnx"))), 1, "{graph}");
    }
    // A layout file that is no ONNX model (its manifest entry matching, so the package checks
    // pass): where the width fits it is tried, refused, and the portable graph loads.
    let refused = variant("refused", |m, dir| {
        let garbage = b"not an ONNX model".repeat(64);
        for graph in GRAPHS {
            fs::write(dir.join(layout_file(graph)), &garbage).unwrap();
            let entry = &mut m["graphs"][graph]["cpu_layout"];
            entry["bytes"] = garbage.len().into();
            entry["sha256"] = zimage::package::files::sha256_hex(&garbage).into();
        }
    });
    assert_eq!(images(&refused, false), want);
    let tried = usize::from(layouts_fit());
    for graph in ["vae_decoder", "vae_encoder"] {
        assert_eq!(sessions_created(&refused.join(layout_file(graph))), tried, "{graph}");
        assert_eq!(sessions_created(&refused.join(format!("{graph}.onnx"))), 1, "{graph}");
    }
    for dir in [other_width, refused] {
        fs::remove_dir_all(dir).unwrap();
    }
}

/// `LoadOptions::optimized_model_cache` has nothing to keep for a graph whose layout is loaded
/// (the layout is what the cache would hold): only the transformer is cached then.
#[test]
fn the_optimized_model_cache_skips_graphs_loaded_from_their_layout() {
    // (Without the transformer's prepacked layout, which would be loaded instead of caching the
    // transformer: tests/cpu_prepacked.rs.)
    let dir = variant("cache", |m, _| {
        m["graphs"]["transformer"].as_object_mut().unwrap().remove("cpu_prepacked");
    });
    let cache = dir.join("cache");
    let mut options = options(false);
    options.optimized_model_cache = Some(cache.clone());
    let pipeline = Pipeline::load(&dir, &options).expect("load");
    pipeline.generate(&requests()[1], None).expect("image-to-image (the encoder too)");
    let mut cached: Vec<String> = fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().split('-').next().unwrap().to_string())
        .collect();
    cached.sort();
    let expected: &[&str] =
        if layouts_fit() { &["transformer"] } else { &["transformer", "vae_decoder", "vae_encoder"] };
    assert_eq!(cached, expected);
    drop(pipeline);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_missing_layout_file_is_a_package_error() {
    let dir = variant("missing", |_, dir| fs::remove_file(dir.join(layout_file("vae_decoder"))).unwrap());
    let err = Pipeline::load(&dir, &options(false)).err().expect("a listed file is missing");
    assert_eq!(err.kind(), ErrorKind::Package, "{err}");
    assert!(err.to_string().contains(&layout_file("vae_decoder")), "{err}");
    fs::remove_dir_all(dir).unwrap();
}
