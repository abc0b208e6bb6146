//! The base model (`Tongyi-MAI/Z-Image`, not distilled): a package exported with
//! `--variant base` records its recommended steps and guidance, and requests built for it
//! ([`Pipeline::request`]) generate with them, equal to diffusers' `ZImagePipeline` run with
//! those settings (`tests/golden/tiny-zimage-base`, written by export-scripts' `goldens_base.py`).

mod common;

use common::*;
use zimage::{GenerateRequest, LoadOptions, Pipeline, Prompt, Variant};

fn load(package: &str) -> Pipeline {
    let mut options = LoadOptions::default();
    options.threads = Some(1);
    options.device = test_device();
    Pipeline::load(repo().join("models").join(package), &options).expect("load package")
}

#[test]
fn base_package_generates_with_its_recommended_settings_like_diffusers() {
    let pipeline = load("tiny-zimage-base");
    let cases = json(&golden("tiny-zimage-base/cases.json"));
    let recorded = &cases["generation_defaults"];
    let defaults = pipeline.manifest().generation_defaults;
    assert_eq!(defaults.variant, Variant::Base);
    assert_eq!(defaults.steps as u64, recorded["steps"].as_u64().unwrap());
    assert_eq!(defaults.guidance_scale as f64, recorded["guidance_scale"].as_f64().unwrap());
    // The package's own scheduler: a shift neither Turbo's package nor the other fixture has.
    assert_eq!(pipeline.manifest().scheduler.shift, 6.0);

    let list = cases["text_to_image"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    for case in list {
        let name = case["name"].as_str().unwrap();
        // Only what a user would set: prompt, size, seed (and a negative prompt). Steps and
        // guidance come from the package, and must be the ones diffusers ran with.
        let mut request = pipeline.request(case["prompt"].as_str().unwrap());
        assert_eq!(request.steps as u64, case["num_inference_steps"].as_u64().unwrap(), "{name}");
        assert_eq!(request.guidance_scale as f64, case["guidance_scale"].as_f64().unwrap(), "{name}");
        assert_eq!(request.cfg_normalization as f64, case["cfg_normalization"].as_f64().unwrap(), "{name}");
        assert_eq!(request.cfg_truncation as f64, case["cfg_truncation"].as_f64().unwrap(), "{name}");
        request.negative_prompt = case["negative_prompt"].as_str().map(|s| Prompt::Text(s.to_string()));
        request.width = case["width"].as_u64().unwrap() as u32;
        request.height = case["height"].as_u64().unwrap() as u32;
        request.seed = Some(case["seed"].as_u64().unwrap());
        request.return_latents = true;
        let result = pipeline.generate(&request, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(result.timings.denoise_steps.len(), request.steps as usize, "{name}");
        let folder = golden("tiny-zimage-base");
        let want = npy_f32(&folder.join(case["latents_file"].as_str().unwrap()));
        let got = result.latents.as_ref().unwrap();
        assert_eq!(got.shape(), want.shape(), "{name}");
        let diff = max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap());
        assert!(diff <= tolerances().0, "{name}: final latents max abs diff {diff}");
        let want = png_rgb(&folder.join(case["image_files"][0].as_str().unwrap()));
        let d = max_pixel_diff(&result.images[0], &want);
        assert!(d <= tolerances().1, "{name}: image differs by {d} levels");
    }
}

#[test]
fn packages_without_recommendations_get_turbos_settings() {
    let manifest = zimage::Manifest::read(&repo().join("models/tiny-zimage")).unwrap();
    assert_eq!(manifest.generation_defaults.variant, Variant::Turbo);
    let request = GenerateRequest::for_package(&manifest, "x");
    let turbo = GenerateRequest::new("x");
    assert_eq!(
        (request.steps, request.guidance_scale, request.cfg_normalization, request.cfg_truncation),
        (turbo.steps, turbo.guidance_scale, turbo.cfg_normalization, turbo.cfg_truncation)
    );
    assert_eq!((request.steps, request.guidance_scale), (8, 0.0));
}

#[test]
fn a_manifest_recommending_what_a_request_may_not_ask_is_refused() {
    let text = std::fs::read_to_string(repo().join("models/tiny-zimage-base/manifest.json")).unwrap();
    for (field, bad) in [("\"steps\": 50", "\"steps\": 0"), ("\"guidance_scale\": 4.0", "\"guidance_scale\": -4.0")] {
        assert!(text.contains(field), "{field}");
        let broken = text.replace(field, bad);
        let e = zimage::Manifest::parse(&broken).expect_err(bad);
        assert!(e.contains("generation_defaults"), "{bad}: {e}");
    }
}
