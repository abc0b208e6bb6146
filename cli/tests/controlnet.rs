//! `zimage generate --controlnet` end to end on the tiny ControlNet packages: pixels and latents
//! equal to diffusers' ZImageControlNetPipeline / ZImageControlNetInpaintPipeline goldens, the
//! control settings in the PNG parameters, Canny preprocessing, and bad input.

mod common;

use std::path::PathBuf;

use serde_json::Value;

use common::{assert_code, assert_one_line_error as one_line_error, read_png, root, zimage, Png};

const GOLDEN: &str = "tests/golden/controlnet";

fn scratch(name: &str) -> PathBuf {
    common::scratch("cli-controlnet", name)
}

/// (package, ControlNet name, case) of a golden case.
fn case(controlnet: &str, section: &str, name: &str) -> (String, Value) {
    let text = std::fs::read_to_string(root().join(GOLDEN).join("cases.json")).unwrap();
    let all: Value = serde_json::from_str(&text).unwrap();
    let entry = all.as_array().unwrap().iter().find(|e| e["controlnet"] == controlnet).unwrap();
    let case = entry[section].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone();
    (entry["package"].as_str().unwrap().to_string(), case)
}

fn case_args(package: &str, controlnet: &str, c: &Value) -> Vec<String> {
    let mut args: Vec<String> = vec!["generate".into(), "--model".into(), package.into()];
    let mut push = |flag: &str, v: String| {
        args.push(flag.into());
        args.push(v);
    };
    push("--prompt", c["prompt"].as_str().unwrap().into());
    if let Some(neg) = c["negative_prompt"].as_str() {
        push("--negative-prompt", neg.into());
    }
    push("--width", c["width"].to_string());
    push("--height", c["height"].to_string());
    push("--steps", c["num_inference_steps"].to_string());
    push("--guidance", c["guidance_scale"].to_string());
    push("--seed", c["seed"].to_string());
    push("--controlnet", controlnet.into());
    push("--control-image", format!("{GOLDEN}/{}", c["control_image_file"].as_str().unwrap()));
    push("--control-scale", c["controlnet_conditioning_scale"].to_string());
    if let Some(init) = c["init_image_file"].as_str() {
        push("--init-image", format!("{GOLDEN}/{init}"));
        push("--mask", format!("{GOLDEN}/{}", c["mask_file"].as_str().unwrap()));
    }
    for lora in c["loras"].as_array().into_iter().flatten() {
        push("--lora", format!("{GOLDEN}/{}:{}", lora["file"].as_str().unwrap(), lora["scale"]));
    }
    args
}

/// Runs a golden case through the CLI: the image within 1 level and the latents within 1e-4
/// of diffusers', the control settings recorded.
fn check_case(controlnet: &str, section: &str, name: &str) -> Png {
    let (package, c) = case(controlnet, section, name);
    let dir = scratch(&format!("{controlnet}-{name}"));
    let mut args = case_args(&package, controlnet, &c);
    let latents = dir.join("latents.npy");
    args.extend(["-o".into(), dir.join("out.png").display().to_string()]);
    args.extend(["--save-latents".into(), latents.display().to_string()]);
    let out = zimage(&args);
    assert_code(&out, 0);
    let png = read_png(&dir.join("out.png"));
    let golden = read_png(&root().join(GOLDEN).join(c["image_files"][0].as_str().unwrap()));
    let diff = png.rgb.iter().zip(&golden.rgb).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(diff <= 1, "{controlnet}/{name}: {diff} levels from the golden");
    let got = zimage::image_io::read_npy(&latents).unwrap();
    let want = zimage::image_io::read_npy(&root().join(GOLDEN).join(c["latents_file"].as_str().unwrap())).unwrap();
    assert_eq!(got.shape(), want.shape());
    let worst = common::max_abs_diff(got.iter(), want.iter());
    assert!(worst <= 1e-4, "{controlnet}/{name}: latents max abs diff {worst}");
    assert_eq!(png.text["controlnet"], controlnet);
    assert_eq!(png.text["control_scale"], c["controlnet_conditioning_scale"].as_f64().unwrap().to_string());
    assert_eq!(png.text["control_preprocess"], "none");
    assert!(png.text["control_image"].ends_with(c["control_image_file"].as_str().unwrap()));
    png
}

#[test]
fn controlnet_text_to_image_matches_the_golden() {
    let png = check_case("union-v2.0", "text_to_image", "scale_1.0_cfg_nonsquare");
    assert!(!png.text.contains_key("mask"));
}

#[test]
fn controlnet_with_loras_matches_the_golden() {
    let png = check_case("union-v2.1", "lora", "peft_0.7_kohya_1.3_cfg_nonsquare");
    let loras = &png.text["loras"];
    assert!(loras.contains("peft.safetensors") && loras.contains("kohya.safetensors"), "{:?}", png.text);
}

#[test]
fn controlnet_inpainting_matches_the_golden() {
    let png = check_case("union-v2.1", "inpaint", "scale_1.0");
    assert!(png.text["mask"].ends_with("mask_64x64.png"), "{:?}", png.text);
    assert!(png.text["control_inpaint_image"].ends_with("init_64x64.png"));
    assert!(!png.text.contains_key("strength"), "ControlNet inpainting has no strength");
}

/// A photo through --control-preprocess canny: the edges are what the ControlNet sees (the
/// result differs from giving the photo itself as the map), recorded in the parameters; the
/// graph file's path names the ControlNet too.
#[test]
fn canny_preprocess_runs_end_to_end() {
    let dir = scratch("canny");
    let photo = format!("{GOLDEN}/inputs/init_64x64.png");
    let run = |preprocess: &str, controlnet: &str, out: &str| {
        let args: Vec<String> = [
            "generate",
            "--model",
            "models/tiny-zimage-control",
            "--prompt",
            "a lighthouse",
            "--steps",
            "2",
            "--seed",
            "7",
            "--controlnet",
            controlnet,
            "--control-image",
            &photo,
            "--control-preprocess",
            preprocess,
            "-o",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([dir.join(out).display().to_string()])
        .collect();
        let output = zimage(&args);
        assert_code(&output, 0);
        read_png(&dir.join(out))
    };
    let canny = run("canny", "union-v1", "canny.png");
    let graph = root().join("models/tiny-zimage-control/controlnet_union-v1.onnx");
    let plain = run("none", &graph.display().to_string(), "plain.png");
    assert_eq!(canny.text["control_preprocess"], "canny");
    assert_eq!(canny.text["controlnet"], "union-v1");
    assert_eq!(plain.text["controlnet"], "union-v1");
    assert_eq!(canny.text["size"], "64x64", "the size comes from the control image");
    assert_ne!(canny.rgb, plain.rgb, "the Canny map must change what the ControlNet sees");
}

#[test]
fn bad_controlnet_input_fails_with_one_line() {
    let dir = scratch("bad");
    let control = format!("{GOLDEN}/inputs/control_64x64.png");
    let base = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> =
            ["generate", "--model", "models/tiny-zimage-control", "--prompt", "x", "--steps", "1", "--seed", "1"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["-o".into(), dir.join("out.png").display().to_string()]);
        args
    };
    // Unknown ControlNet: a usage error before anything loads.
    let out = zimage(base(&["--controlnet", "nope", "--control-image", &control]));
    assert_code(&out, 2);
    assert!(one_line_error(&out).contains("union-v1"));
    // A non-finite scale, or one beyond any useful strength: an invalid request.
    for scale in ["NaN", "1e6"] {
        let out = zimage(base(&["--controlnet", "union-v1", "--control-image", &control, "--control-scale", scale]));
        assert_code(&out, 6);
        assert!(one_line_error(&out).contains("-100..=100"), "{scale}");
    }
    // ControlNet inpainting with a ControlNet that has no mask channels.
    let init = format!("{GOLDEN}/inputs/init_64x64.png");
    let mask = format!("{GOLDEN}/inputs/mask_64x64.png");
    let out = zimage(base(&[
        "--controlnet",
        "union-v1",
        "--control-image",
        &control,
        "--init-image",
        &init,
        "--mask",
        &mask,
    ]));
    assert_code(&out, 6);
    assert!(one_line_error(&out).contains("cannot inpaint"));
    // --init-image without --mask (no ControlNet image-to-image), and --strength.
    let out = zimage(base(&["--controlnet", "union-v2.1", "--control-image", &control, "--init-image", &init]));
    assert_code(&out, 2);
    one_line_error(&out);
    // A bad preprocess mode, and --control-image without --controlnet.
    let out = zimage(base(&["--controlnet", "union-v1", "--control-image", &control, "--control-preprocess", "sobel"]));
    assert_code(&out, 2);
    let out = zimage(base(&["--control-image", &control]));
    assert_code(&out, 2);
    // The package without the add-on has no ControlNet.
    let mut args = base(&["--controlnet", "union-v1", "--control-image", &control]);
    args[2] = "models/tiny-zimage".into();
    let out = zimage(&args);
    assert_code(&out, 2);
    assert!(one_line_error(&out).contains("none"));
    assert!(!dir.join("out.png").exists(), "nothing is written on failure");
    // A negative scale (within -100..=100) is a value, not the unknown flag "-0".
    let out = zimage(base(&["--controlnet", "union-v1", "--control-image", &control, "--control-scale", "-0.5"]));
    assert_code(&out, 0);
    assert_eq!(read_png(&dir.join("out.png")).text["control_scale"], "-0.5");
}
