//! Parity with diffusers on the committed tiny packages: token ids, text features, one
//! transformer forward, and whole generations (text-to-image, image-to-image, inpainting).

mod common;

use common::*;
use ndarray::{Array1, Array2, Array3};
use serde_json::Value;

const PACKAGES: [&str; 2] = ["tiny-zimage", "tiny-zimage-alt"];

fn cases(package: &str) -> Value {
    json(&golden(&format!("{package}/cases.json")))
}

fn file(package: &str, rel: &Value) -> std::path::PathBuf {
    golden(package).join(rel.as_str().unwrap())
}

#[test]
fn token_ids_are_exact() {
    let pipeline = pipeline("tiny-zimage");
    let cases = json(&golden("common/tokens.json"));
    assert!(cases.as_array().unwrap().len() >= 6);
    for case in cases.as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let max = case["max_sequence_length"].as_u64().unwrap() as usize;
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = pipeline.tokenize(prompt, Some(max)).unwrap();
        assert_eq!(got.ids, want, "token ids of case {}", case["name"]);
        // The untruncated length, and whether the prompt was cut, come from an independent
        // tokenization with room for everything: the golden ids are its prefix, and the prompt
        // was cut exactly when it is longer than the golden.
        let whole = pipeline.tokenize(prompt, Some(100_000)).unwrap();
        assert!(!whole.truncated(), "{}", case["name"]);
        assert_eq!(whole.ids[..want.len()], want[..], "{}", case["name"]);
        assert_eq!(got.full_length, whole.ids.len(), "{}", case["name"]);
        let cut = whole.ids.len() > want.len();
        assert_eq!(got.truncated(), cut, "{}", case["name"]);
        assert_eq!(cut, case["name"].as_str().unwrap().starts_with("long"), "{}", case["name"]);
    }
}

#[test]
fn text_features_match() {
    for package in PACKAGES {
        let pipeline = pipeline(package);
        for case in cases(package)["text_features"].as_array().unwrap() {
            let max = case["max_sequence_length"].as_u64().unwrap() as usize;
            let embedding = pipeline.encode_prompt(case["prompt"].as_str().unwrap(), Some(max)).unwrap();
            let ids: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            assert_eq!(embedding.tokens.ids, ids);
            let want = npy_f32(&file(package, &case["features_file"]));
            assert_eq!(embedding.features.shape(), want.shape());
            let err = rel_l2(embedding.features.as_slice().unwrap(), want.as_slice().unwrap());
            assert!(err <= tolerances().2, "{package}: text features rel err {err}");
        }
    }
}

#[test]
fn transformer_forward_matches_with_unequal_captions() {
    for package in PACKAGES {
        let pipeline = pipeline(package);
        let case = &cases(package)["transformer_forward"];
        let latents = as4(npy_f32(&file(package, &case["latents_file"])));
        let timestep: Array1<f32> = npy_f32(&file(package, &case["timestep_file"])).into_dimensionality().unwrap();
        let cap_feats: Array3<f32> = npy_f32(&file(package, &case["cap_feats_file"])).into_dimensionality().unwrap();
        let cap_mask: Array2<bool> = ndarray_npy::read_npy(file(package, &case["cap_mask_file"])).unwrap();
        let want = npy_f32(&file(package, &case["output_file"]));
        let got = pipeline.transformer_forward(&latents, &timestep, &cap_feats, &cap_mask).unwrap();
        assert_eq!(got.shape(), want.shape());
        let err = rel_l2(got.as_slice().unwrap(), want.as_slice().unwrap());
        assert!(err <= tolerances().2, "{package}: transformer rel err {err}");
    }
}

/// Runs every case of one kind and checks final latents (max abs <= 1e-4) and images
/// (max 1 level) on CPU; wider bounds on a GPU (`tolerances`).
fn check_generations(package: &str, kind: &str, with_init: bool) -> usize {
    let pipeline = pipeline(package);
    let all = cases(package);
    let Some(list) = all[kind].as_array() else { return 0 };
    for case in list {
        let name = case["name"].as_str().unwrap();
        let mut request = golden_request(case);
        if with_init {
            request.init_image = Some(golden_init_image(case, &golden(package)));
        }
        let result = pipeline.generate(&request, None).unwrap_or_else(|e| panic!("{package}/{name}: {e}"));
        let want = npy_f32(&file(package, &case["latents_file"]));
        let got = result.latents.as_ref().unwrap();
        assert_eq!(got.shape(), want.shape(), "{package}/{name}");
        let diff = max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap());
        assert!(diff <= tolerances().0, "{package}/{name}: final latents max abs diff {diff}");
        let images = case["image_files"].as_array().unwrap();
        assert_eq!(result.images.len(), images.len(), "{package}/{name}");
        for (got, path) in result.images.iter().zip(images) {
            let want = png_rgb(&file(package, path));
            let d = max_pixel_diff(got, &want);
            assert!(d <= tolerances().1, "{package}/{name}: image differs by {d} levels");
        }
    }
    list.len()
}

#[test]
fn text_to_image_matches_diffusers() {
    let mut n = 0;
    for package in PACKAGES {
        n += check_generations(package, "text_to_image", false);
    }
    assert!(n >= 12, "expected the golden text-to-image cases, found {n}");
}

#[test]
fn image_to_image_matches_diffusers() {
    let n: usize = PACKAGES.iter().map(|p| check_generations(p, "image_to_image", true)).sum();
    assert!(n >= 5, "expected the golden image-to-image cases, found {n}");
}

#[test]
fn inpainting_matches_diffusers() {
    let n: usize = PACKAGES.iter().map(|p| check_generations(p, "inpaint", true)).sum();
    assert!(n >= 3, "expected the golden inpainting cases, found {n}");
}

/// Image-to-image and inpainting from a 1000x750 picture (tests/golden/tiny-zimage/large.json:
/// diffusers floors it to 992x736), so that the picture's resize and the VAE encoder run at a
/// photo's size. The bound is looser than the small goldens': at this size diffusers' own
/// float32 VAE encoder is 4.6e-4 from its float64 result (the package's is 7e-6 since its group
/// norms are summed in two levels: export-scripts/tests/test_vae_group_norm.py), and inpainting
/// keeps the encoded picture outside the mask, so its final latents inherit that (measured 3.9e-5
/// image-to-image, 2.7e-4 inpainting). A wrong resize or mask is off by 1e-2 and more.
#[test]
fn photo_sized_pictures_match_diffusers() {
    let pipeline = pipeline("tiny-zimage");
    let cases = json(&golden("tiny-zimage/large.json"));
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let mut request = golden_request(case);
        request.init_image = Some(golden_init_image(case, &golden("tiny-zimage")));
        let picture = &request.init_image.as_ref().unwrap().image;
        assert_eq!((picture.width, picture.height), (1000, 750), "{name}");
        let result = pipeline.generate(&request, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = npy_f32(&file("tiny-zimage", &case["latents_file"]));
        let got = result.latents.as_ref().unwrap();
        assert_eq!(got.shape(), want.shape(), "{name}");
        let diff = max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap());
        let bound = tolerances().0.max(5e-4);
        assert!(diff <= bound, "{name}: final latents max abs diff {diff} (bound {bound})");
    }
}
