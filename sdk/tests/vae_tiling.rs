//! Tiled VAE decoding and encoding (`LoadOptions::vae_tiling`) against diffusers with
//! `vae.enable_tiling()`, on the committed tiny packages: the goldens decode the final latents of
//! text-to-image goldens in tiles of several geometries, and run image-to-image and inpainting
//! (tiled encode of the input picture, tiled decode) through diffusers' pipelines
//! (tests/golden/*/vae_tiling, made by export-scripts/zimage_export/fixtures/goldens_vae_tiling.py).

mod common;

use std::path::PathBuf;

use common::*;
use serde_json::Value;
use zimage::{image_parameters, ErrorKind, InputNames, LoadOptions, Pipeline, VaeTiling};

const PACKAGES: [&str; 2] = ["tiny-zimage", "tiny-zimage-alt"];

fn file(package: &str, rel: &Value) -> PathBuf {
    golden(package).join(rel.as_str().unwrap())
}

fn load(package: &str, tiling: Option<VaeTiling>) -> Result<Pipeline, zimage::Error> {
    let mut options = LoadOptions::default();
    options.threads = Some(1);
    options.device = test_device();
    options.vae_tiling = tiling;
    Pipeline::load(repo().join("models").join(package), &options)
}

#[test]
fn tiled_images_match_diffusers_tiled_decode() {
    let mut checked = 0;
    for package in PACKAGES {
        let t2i = json(&golden(package).join("cases.json"))["text_to_image"].as_array().unwrap().clone();
        for case in json(&golden(package).join("vae_tiling/cases.json"))["decode"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let tiling = tiling_of(case);
            let source = t2i.iter().find(|c| c["name"] == case["text_to_image_case"]).unwrap();
            let pipeline = load(package, Some(tiling)).unwrap();
            let request = golden_request(source);
            let result = pipeline.generate(&request, None).unwrap_or_else(|e| panic!("{package}/{name}: {e}"));
            // Tiling changes the decode only.
            let want = npy_f32(&file(package, &source["latents_file"]));
            let latents = result.latents.as_ref().unwrap();
            let diff = max_abs_diff(latents.as_slice().unwrap(), want.as_slice().unwrap());
            assert!(diff <= tolerances().0, "{package}/{name}: final latents max abs diff {diff}");
            assert_eq!(result.vae_tiling, Some(tiling), "{package}/{name}");
            let images = case["image_files"].as_array().unwrap();
            let untiled = source["image_files"].as_array().unwrap();
            assert_eq!(result.images.len(), images.len(), "{package}/{name}");
            let moved = case["max_levels_from_untiled"].as_u64().unwrap();
            assert!(moved > 2 * tolerances().1 as u64, "{package}/{name}: the golden barely differs from untiled");
            let mut furthest = 0;
            for ((got, path), whole) in result.images.iter().zip(images).zip(untiled) {
                let d = max_pixel_diff(got, &png_rgb(&file(package, path)));
                assert!(d <= tolerances().1, "{package}/{name}: image differs from diffusers' tiled one by {d} levels");
                furthest = furthest.max(max_pixel_diff(got, &png_rgb(&file(package, whole))));
            }
            assert!(furthest as u64 + tolerances().1 as u64 >= moved, "{package}/{name}: not tiled like the golden");
            // The images record how they were decoded.
            let params = image_parameters(&request, &result, 0, &repo(), &[], &InputNames::default());
            let recorded = params.iter().find(|(k, _)| *k == "vae_tiling").map(|(_, v)| v.as_str());
            let expected = format!("tile {}, overlap {}", tiling.tile_size, tiling.overlap);
            assert_eq!(recorded, Some(expected.as_str()), "{package}/{name}");
            checked += 1;
        }
    }
    assert_eq!(checked, 6, "expected the six golden tiling cases");
}

fn tiling_of(case: &Value) -> VaeTiling {
    VaeTiling {
        tile_size: case["tile_size"].as_u64().unwrap() as u32,
        overlap: case["overlap"].as_u64().unwrap() as u32,
    }
}

#[test]
fn image_to_image_and_inpainting_encode_in_tiles_like_diffusers() {
    let mut checked = 0;
    for package in PACKAGES {
        for case in json(&golden(package).join("vae_tiling/cases.json"))["pipeline"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let pipeline = load(package, Some(tiling_of(case))).unwrap();
            let mut request = golden_request(case);
            request.init_image = Some(golden_init_image(case, &golden(package)));
            let result = pipeline.generate(&request, None).unwrap_or_else(|e| panic!("{package}/{name}: {e}"));
            // The tiled encode moves the final latents far beyond the tolerance (the golden
            // records how far): matching them means the picture was encoded in the same tiles.
            let moved = case["max_latent_change_from_untiled"].as_f64().unwrap() as f32;
            assert!(moved > 100.0 * tolerances().0, "{package}/{name}: the golden barely differs from untiled");
            let want = npy_f32(&file(package, &case["latents_file"]));
            let got = result.latents.as_ref().unwrap();
            let diff = max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap());
            assert!(diff <= tolerances().0, "{package}/{name}: final latents max abs diff {diff}");
            for (got, path) in result.images.iter().zip(case["image_files"].as_array().unwrap()) {
                let d = max_pixel_diff(got, &png_rgb(&file(package, path)));
                assert!(d <= tolerances().1, "{package}/{name}: image differs from diffusers' by {d} levels");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 3, "expected the three golden tiled image-to-image and inpainting cases");
}

#[test]
fn images_within_one_tile_decode_whole() {
    // tiny-zimage's turbo case is 64x64: a 64-pixel tile holds it, so tiling does nothing and
    // records nothing.
    let case = json(&golden("tiny-zimage").join("cases.json"))["text_to_image"][0].clone();
    assert_eq!(
        (case["name"].as_str(), case["width"].as_u64(), case["height"].as_u64()),
        (Some("turbo"), Some(64), Some(64))
    );
    let pipeline = load("tiny-zimage", Some(VaeTiling { tile_size: 64, overlap: 16 })).unwrap();
    let result = pipeline.generate(&golden_request(&case), None).unwrap();
    assert_eq!(result.vae_tiling, None);
    let d = max_pixel_diff(&result.images[0], &png_rgb(&file("tiny-zimage", &case["image_files"][0])));
    assert!(d <= tolerances().1, "untiled image differs by {d} levels");
}

#[test]
fn tile_sizes_that_do_not_fit_the_vae_are_refused_at_load() {
    // tiny-zimage's VAE scale factor is 8, tiny-zimage-alt's 4: 20 fits the second only.
    for (package, tile, overlap) in
        [("tiny-zimage", 20, 4), ("tiny-zimage", 32, 4), ("tiny-zimage", 32, 32), ("tiny-zimage-alt", 0, 0)]
    {
        let err = load(package, Some(VaeTiling { tile_size: tile, overlap })).err().expect("refused");
        assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{package} {tile}/{overlap}: {err}");
        assert!(err.to_string().contains("vae_tiling"), "{err}");
    }
    assert!(load("tiny-zimage-alt", Some(VaeTiling { tile_size: 20, overlap: 4 })).is_ok());
    // A TensorRT engine serves its profile's sizes, not the tiles': refused before anything
    // is built (no GPU needed to see it).
    let mut options = LoadOptions::default();
    options.device = zimage::Device::TensorRt { device_id: 0 };
    options.vae_tiling = Some(VaeTiling::new(512));
    let err = Pipeline::load(repo().join("models/tiny-zimage"), &options).err().expect("refused");
    assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{err}");
    assert!(err.to_string().contains("TensorRT"), "{err}");
}
