//! Meaning, not only numbers: the trained toy package (models/toy-zimage, made by
//! export-scripts/train_toy.py) draws what its prompt asks, measured from pixels
//! (tests/common/semantic.rs): background and shape colour, position, size and kind, for
//! English and Chinese prompts. The same measurement on the random-weight tiny package fails,
//! so the thresholds mean something. The green-circles LoRA turns circles green through
//! zimage's LoRA API, leaves squares alone, and unloading it gives the base pictures back.

mod common;

use std::sync::{Arc, OnceLock};

use common::semantic::{measure, mismatches, Scene};
use common::*;
use zimage::{GenerateRequest, LoadOptions, LoraAdapter, LoraSetting, Pipeline, RgbImage};

/// Prompts the tests ask for: every shape, colour, position and size, both languages, captions
/// written as the toy's grammar allows (not all of them seen verbatim in training: the
/// grammar's scenes are, in other word orders and templates).
const PROMPTS: [&str; 12] = [
    "a red circle on a blue background",
    "a large yellow square on the left on a black background",
    "a small white triangle at the top on a purple background",
    "a blue circle at the bottom, on a yellow background",
    "a large purple square on the right on a white background",
    "a green triangle in the centre on a red background",
    "a small black circle on the right, on a green background",
    "蓝色背景上有一个红色圆形",
    "黑色背景上右边有一个大绿色正方形",
    "白色背景上左边的一个小紫色三角形",
    "黄色背景上下方有一个蓝色圆形",
    "红色背景上上方有一个大白色正方形",
];
const SEEDS: [u64; 2] = [1, 2];

fn options() -> LoadOptions {
    let mut o = LoadOptions::default();
    o.threads = Some(1);
    o.device = test_device();
    o
}

fn load(package: &str) -> Pipeline {
    Pipeline::load(repo().join("models").join(package), &options()).expect("load package")
}

fn toy() -> &'static Pipeline {
    static TOY: OnceLock<Pipeline> = OnceLock::new();
    TOY.get_or_init(|| load("toy-zimage"))
}

/// The toy's own resolution, Z-Image-Turbo's 8 steps without guidance.
fn draw(pipeline: &Pipeline, prompt: &str, seed: u64) -> RgbImage {
    let mut request = GenerateRequest::new(prompt);
    request.width = 64;
    request.height = 64;
    request.seed = Some(seed);
    let mut generation = pipeline.generate(&request, None).unwrap_or_else(|e| panic!("{prompt}: {e}"));
    generation.images.remove(0)
}

/// Every (prompt, seed) whose picture does not show its caption, with what is wrong.
fn failures(pipeline: &Pipeline, prompts: &[&str], seeds: &[u64]) -> Vec<String> {
    let mut out = vec![];
    for prompt in prompts {
        let want = Scene::parse(prompt);
        for &seed in seeds {
            let wrong = mismatches(&measure(&draw(pipeline, prompt, seed)), &want);
            if !wrong.is_empty() {
                out.push(format!("{prompt:?} seed {seed}: {}", wrong.join("; ")));
            }
        }
    }
    out
}

#[test]
fn captions_parse_as_the_training_grammar_means_them() {
    let s = Scene::parse("a large yellow square on the left on a black background");
    assert_eq!((s.shape, s.colour, s.background, s.position, s.size), ("square", "yellow", "black", "left", "large"));
    let s = Scene::parse("黑色背景上右边有一个大绿色正方形");
    assert_eq!((s.shape, s.colour, s.background, s.position, s.size), ("square", "green", "black", "right", "large"));
    let s = Scene::parse("a red circle on a blue background");
    assert_eq!((s.shape, s.colour, s.background, s.position, s.size), ("circle", "red", "blue", "centre", "medium"));
}

#[test]
fn the_toy_model_draws_what_the_prompt_asks() {
    let wrong = failures(toy(), &PROMPTS, &SEEDS);
    assert!(wrong.is_empty(), "{} of {} pictures do not show their caption:\n{}", wrong.len(), PROMPTS.len() * SEEDS.len(), wrong.join("\n"));
}

#[test]
fn random_weights_fail_the_same_measurement() {
    // Guards the measurement: were it lenient enough to pass noise, the test above would mean nothing.
    let wrong = failures(&load("tiny-zimage"), &PROMPTS, &SEEDS[..1]);
    assert_eq!(wrong.len(), PROMPTS.len(), "random weights passed: the thresholds are too loose");
}

const GREEN_CIRCLES: &str = "models/toy-zimage-lora/green-circles.safetensors";

#[test]
fn the_green_circles_lora_turns_circles_green_and_unloading_restores_the_base() {
    let pipeline = load("toy-zimage");
    let circles = ["a red circle on a blue background", "黄色背景上下方有一个蓝色圆形", "a large purple circle on the left on a white background"];
    let square = "a large yellow square on the left on a black background";
    let base: Vec<RgbImage> = circles.iter().chain([&square]).map(|p| draw(&pipeline, p, 1)).collect();
    for (prompt, img) in circles.iter().zip(&base) {
        assert_eq!(measure(img).colour, Some(Scene::parse(prompt).colour), "{prompt}: base model");
    }

    let adapter = Arc::new(LoraAdapter::load(repo().join(GREEN_CIRCLES)).unwrap());
    pipeline.set_loras(&[LoraSetting::new(adapter, 1.0)]).unwrap();
    for prompt in circles {
        let mut want = Scene::parse(prompt);
        want.colour = "green";
        let wrong = mismatches(&measure(&draw(&pipeline, prompt, 1)), &want);
        assert!(wrong.is_empty(), "{prompt} with the LoRA: {}", wrong.join("; "));
    }
    let wrong = mismatches(&measure(&draw(&pipeline, square, 1)), &Scene::parse(square));
    assert!(wrong.is_empty(), "{square} with the LoRA (squares keep their colour): {}", wrong.join("; "));

    pipeline.set_loras(&[]).unwrap();
    for (prompt, img) in circles.iter().chain([&square]).zip(&base) {
        assert_eq!(max_pixel_diff(&draw(&pipeline, prompt, 1), img), 0, "{prompt}: after unloading");
    }
}
