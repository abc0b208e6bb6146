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
