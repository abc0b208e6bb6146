//! Parity of the model-free stages with torch/diffusers goldens: noise and scheduler tables.

mod common;

use common::*;
use zimage::TorchGenerator;
use zimage::{Schedule, SchedulerConfig};

#[test]
fn noise_matches_torch_randn() {
    let cases = json(&golden("common/noise.json"));
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 4);
    for case in cases {
        let seed = case["seed"].as_u64().unwrap();
        let mut generator = TorchGenerator::new(seed);
        for draw in case["draws"].as_array().unwrap() {
            let shape: Vec<usize> =
                draw["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            let want = npy_f32(&golden("common").join(draw["file"].as_str().unwrap()));
            let got = generator.randn(&shape);
            assert_eq!(got.shape(), want.shape(), "{}", case["name"]);
            let diff = max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap());
            assert!(diff <= 1e-6, "{} seed {seed} shape {shape:?}: max abs diff {diff}", case["name"]);
        }
    }
}

#[test]
fn scheduler_tables_equal_diffusers() {
    let cases = json(&golden("common/scheduler.json"));
    for case in cases.as_array().unwrap() {
        let config: SchedulerConfig = serde_json::from_value(case["config"].clone()).unwrap();
        config.check().unwrap();
        let steps = case["num_inference_steps"].as_u64().unwrap() as usize;
        let seq = case["image_seq_len"].as_u64().unwrap() as usize;
        let schedule = Schedule::new(&config, steps, seq);
        let sigmas = npy_f32(&golden("common").join(case["sigmas_file"].as_str().unwrap()));
        let timesteps = npy_f32(&golden("common").join(case["timesteps_file"].as_str().unwrap()));
        assert_eq!(schedule.sigmas.as_slice(), sigmas.as_slice().unwrap(), "sigmas of {}", case["name"]);
        assert_eq!(schedule.timesteps.as_slice(), timesteps.as_slice().unwrap(), "timesteps of {}", case["name"]);
    }
}

/// `image_io::resize_rgb_with` (`pil_resize`) against Pillow 13.0.0's `Image.resize` (tests/golden/common/resize.json:
/// both pass orders, their boundary, one-axis and upscaling cases, three filters): the same
/// bytes.
#[test]
fn pil_resize_equals_pillow() {
    let doc = json(&golden("common/resize.json"));
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 48, "{} cases", cases.len());
    for case in cases {
        let input = png_rgb(&golden("common").join(case["input_file"].as_str().unwrap()));
        let want = png_rgb(&golden("common").join(case["output_file"].as_str().unwrap()));
        let filter = zimage::pil_resize::Filter::from_name(case["filter"].as_str().unwrap()).unwrap();
        let (width, height) = (case["width"].as_u64().unwrap() as u32, case["height"].as_u64().unwrap() as u32);
        let got = zimage::image_io::resize_rgb_with(&input, width, height, filter).unwrap();
        assert_eq!((got.width, got.height), (want.width, want.height), "{}", case["output_file"]);
        let differing = got.pixels.iter().zip(&want.pixels).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{}: {differing} bytes differ", case["output_file"]);
        if filter == zimage::pil_resize::Filter::Lanczos {
            // What the CLI, the server and ControlNet do to a picture of another size, as
            // diffusers' image processor does (PIL, Lanczos).
            let resized = zimage::image_io::resize_rgb(&input, width, height).unwrap();
            assert_eq!(resized, want, "resize_rgb to {}", case["output_file"]);
        }
    }
}
