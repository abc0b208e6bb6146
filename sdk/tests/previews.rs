//! Previews (`GenerateRequest::previews`, `EditRequest::previews`): pictures of the model's
//! estimate of the finished latents, handed to the progress callback at evenly spaced steps.
//!
//! The estimate is checked against an independent route to the same value: every schedule
//! starts at noise level 1 (timestep 1000), so after the first step of an N-step run the
//! estimate is `x - 1 * v(x, 1000)`, exactly what a 1-step run from the same noise computes
//! and decodes as its result. `ZIMAGE_TEST_DEVICE=cuda` runs this on a GPU too.

mod common;

use common::{repo, test_device};
use zimage::{EditRequest, GenerateRequest, Generation, LoadOptions, Pipeline, Progress, RgbImage};

fn load(package: &str, host_loop: bool) -> Pipeline {
    let mut options = LoadOptions::default();
    options.threads = Some(1);
    options.device = test_device();
    options.host_denoise_loop = host_loop;
    Pipeline::load(repo().join(package), &options).expect("load package")
}

/// (step, total, previews) of every progress report.
type Reports = Vec<(usize, usize, Option<Vec<RgbImage>>)>;

fn generate(pipeline: &Pipeline, request: &GenerateRequest) -> (Generation, Reports) {
    let mut reports = Vec::new();
    let mut record = |p: &Progress| {
        reports.push((p.step, p.total_steps, p.preview.clone()));
        true
    };
    let generation = pipeline.generate(request, Some(&mut record)).expect("generate");
    (generation, reports)
}

fn request(seed: u64, steps: u32) -> GenerateRequest {
    let mut r = GenerateRequest::new("a lighthouse on a cliff at dusk");
    (r.width, r.height, r.steps, r.seed) = (64, 48, steps, Some(seed));
    r
}

/// The largest difference of two pictures' values, and how many differ.
fn difference(a: &RgbImage, b: &RgbImage) -> (u8, usize) {
    assert_eq!((a.width, a.height), (b.width, b.height));
    let diffs = a.pixels.iter().zip(&b.pixels).map(|(x, y)| x.abs_diff(*y));
    diffs.fold((0, 0), |(max, n), d| (max.max(d), n + usize::from(d > 0)))
}

fn mean_difference(a: &RgbImage, b: &RgbImage) -> f64 {
    let sum: u64 = a.pixels.iter().zip(&b.pixels).map(|(x, y)| u64::from(x.abs_diff(*y))).sum();
    sum as f64 / a.pixels.len() as f64
}

#[test]
fn previews_come_at_evenly_spaced_steps_and_leave_the_result_alone() {
    let pipeline = load("models/tiny-zimage", false);
    let mut plain = request(7, 8);
    plain.count = 2;
    let (without, reports) = generate(&pipeline, &plain);
    assert!(reports.iter().all(|(_, _, p)| p.is_none()), "no previews unless asked for");
    assert_eq!(without.timings.previews, std::time::Duration::ZERO);

    let mut asked = plain.clone();
    asked.previews = 2;
    let (with, reports) = generate(&pipeline, &asked);
    assert_eq!(with.images, without.images, "previews changed the result");
    let steps: Vec<usize> = reports.iter().map(|(step, _, _)| *step).collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
    let previewed: Vec<usize> = reports.iter().filter(|(_, _, p)| p.is_some()).map(|(s, _, _)| *s).collect();
    assert_eq!(previewed, [3, 6]);
    for (step, total, preview) in &reports {
        assert_eq!(*total, 8);
        let Some(pictures) = preview else { continue };
        assert_eq!(pictures.len(), 2, "one preview per image, step {step}");
        for (picture, result) in pictures.iter().zip(&with.images) {
            assert_eq!((picture.width, picture.height, picture.pixels.len()), (64, 48, 64 * 48 * 3));
            assert_ne!(picture, result, "a preview before the last step is not the result");
        }
    }
    assert!(with.timings.previews > std::time::Duration::ZERO);

    // More previews than steps before the last: one after each of them.
    asked.previews = 1000;
    asked.steps = 4;
    let (_, reports) = generate(&pipeline, &asked);
    let previewed: Vec<usize> = reports.iter().filter(|(_, _, p)| p.is_some()).map(|(s, _, _)| *s).collect();
    assert_eq!(previewed, [1, 2, 3]);

    // Without a progress callback nothing is decoded and the result is the same.
    asked.steps = 8;
    asked.previews = 2;
    let silent = pipeline.generate(&asked, None).expect("generate");
    assert_eq!(silent.images, without.images);
    assert_eq!(silent.timings.previews, std::time::Duration::ZERO);
}

/// The first step's estimate is the 1-step result, on the device loop, the host loop, and
/// under guidance (whose arithmetic is inside the step).
#[test]
fn the_first_preview_is_the_one_step_image() {
    for host_loop in [false, true] {
        let pipeline = load("models/tiny-zimage", host_loop);
        for guidance in [0.0, 3.0] {
            let mut long = request(11, 5);
            long.guidance_scale = guidance;
            long.negative_prompt = (guidance > 0.0).then(|| "blurry".into());
            long.previews = 4;
            let (_, reports) = generate(&pipeline, &long);
            let first = reports[0].2.as_ref().expect("a preview after step 1");
            let mut one = long.clone();
            one.steps = 1;
            one.previews = 0;
            let (single, _) = generate(&pipeline, &one);
            let (max, differing) = difference(&first[0], &single.images[0]);
            let name = format!("host loop {host_loop}, guidance {guidance}");
            // The same value by two float routes (the step's difference quotient against the
            // direct Euler jump): equal up to rounding, so at most one level apart.
            assert!(max <= 1, "{name}: the step-1 preview is {max} levels from the 1-step image");
            assert!(differing * 100 < first[0].pixels.len(), "{name}: {differing} values differ");
        }
    }
}

/// On the trained toy model the estimates converge on the result: each preview is closer to
/// the final image than the one before.
#[test]
fn previews_converge_on_the_result() {
    let pipeline = load("models/toy-zimage", false);
    let manifest = pipeline.manifest();
    let mut asked = GenerateRequest::for_package(manifest, "a red circle on a blue background");
    (asked.width, asked.height, asked.seed, asked.steps, asked.previews) = (64, 64, Some(3), 8, 7);
    let (result, reports) = generate(&pipeline, &asked);
    let distances: Vec<f64> = reports
        .iter()
        .filter_map(|(_, _, p)| p.as_ref())
        .map(|pictures| mean_difference(&pictures[0], &result.images[0]))
        .collect();
    assert_eq!(distances.len(), 7);
    assert!(distances.windows(2).all(|w| w[1] < w[0]), "previews do not converge: {distances:?}");
    assert!(distances[6] < distances[0] / 2.0, "{distances:?}");
}

/// Edits (their own host loop) preview the same way.
#[test]
fn edits_preview_too() {
    let pipeline = load("models/tiny-zimage-omni", false);
    let reference = RgbImage {
        width: 80,
        height: 64,
        pixels: (0..80 * 64 * 3).map(|i: u32| ((i * 29 + i / 5) % 256) as u8).collect(),
    };
    let mut long = EditRequest::new("make it brighter", vec![reference]);
    (long.steps, long.seed, long.previews) = (Some(4), Some(5), 3);
    let mut reports = Vec::new();
    let mut record = |p: &Progress| {
        reports.push((p.step, p.preview.clone()));
        true
    };
    let edited = pipeline.edit(&long, Some(&mut record)).expect("edit");
    let previewed: Vec<usize> = reports.iter().filter(|(_, p)| p.is_some()).map(|(s, _)| *s).collect();
    assert_eq!(previewed, [1, 2, 3]);
    let first = &reports[0].1.as_ref().unwrap()[0];
    assert_ne!(first, &edited.images[0]);
    let mut one = long.clone();
    (one.steps, one.previews) = (Some(1), 0);
    let single = pipeline.edit(&one, None).expect("edit");
    let (max, _) = difference(first, &single.images[0]);
    assert!(max <= 1, "the step-1 edit preview is {max} levels from the 1-step edit");
}
