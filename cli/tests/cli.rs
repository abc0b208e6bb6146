//! The `zimage` binary end to end on the committed tiny package: exit codes, one-line errors,
//! PNG parameters, output naming, latents, and pixels equal to the diffusers goldens.
//!
//! ONNX Runtime is found the way the SDK always finds it (ORT_DYLIB_PATH or the copy that
//! scripts/setup.sh installs); nothing here names a path to it.

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use common::{assert_code, assert_one_line_error, max_abs_diff, max_level_diff, read_png, root, stderr, zimage, Png};

const PACKAGE: &str = "models/tiny-zimage";
const GOLDEN: &str = "tests/golden/tiny-zimage";

/// A fresh, empty folder for one test's outputs.
fn scratch(name: &str) -> std::path::PathBuf {
    common::scratch("cli-tests", name)
}

fn case(section: &str, name: &str) -> Value {
    let text = std::fs::read_to_string(root().join(GOLDEN).join("cases.json")).expect("golden cases.json");
    let cases: Value = serde_json::from_str(&text).unwrap();
    cases[section]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"))
        .clone()
}

/// The `generate` arguments that reproduce a golden case.
fn case_args(c: &Value) -> Vec<String> {
    let mut args: Vec<String> = vec!["generate".into(), "--model".into(), PACKAGE.into()];
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
    push("--cfg-normalization", c["cfg_normalization"].to_string());
    push("--cfg-truncation", c["cfg_truncation"].to_string());
    push("--seed", c["seed"].to_string());
    push("--count", c["num_images_per_prompt"].to_string());
    push("--max-sequence-length", c["max_sequence_length"].to_string());
    if let Some(init) = c["init_image_file"].as_str() {
        push("--init-image", format!("{GOLDEN}/{init}"));
        push("--strength", c["strength"].to_string());
    }
    if let Some(mask) = c["mask_file"].as_str() {
        push("--mask", format!("{GOLDEN}/{mask}"));
    }
    args
}

/// Runs a golden case through the CLI and checks every image against diffusers' (<= 1 level).
fn run_case(section: &str, name: &str, dir: &Path) -> (Value, Vec<Png>) {
    let c = case(section, name);
    let output = dir.join("out.png");
    let mut args = case_args(&c);
    args.extend(["--output".into(), output.display().to_string(), "--json".into()]);
    let out = zimage(args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_code(&out, 0);
    let summary: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    let mut images = Vec::new();
    for (file, golden) in summary["files"].as_array().unwrap().iter().zip(c["image_files"].as_array().unwrap()) {
        let png = read_png(Path::new(file.as_str().unwrap()));
        let diff = max_level_diff(&png, &root().join(GOLDEN).join(golden.as_str().unwrap()));
        assert!(diff <= 1, "{section}/{name}: {file} differs from the golden by {diff} levels");
        images.push(png);
    }
    assert_eq!(images.len(), c["image_files"].as_array().unwrap().len());
    (summary, images)
}

#[test]
fn argument_errors_exit_2_with_one_line() {
    let cases: &[&[&str]] = &[
        &["generate", "--prompt", "x"],
        &["generate", "--model", PACKAGE, "--prompt", "x", "--steps", "eight"],
        &["generate", "--model", PACKAGE, "--prompt", "x", "--device", "gpu"],
        &["generate", "--model", PACKAGE, "--prompt", "x", "--strength", "0.5"],
        &["generate", "--model", PACKAGE, "--promt", "x"],
        &["bench", "--model", PACKAGE, "--runs", "0"],
        &["paint"],
    ];
    for args in cases {
        let out = zimage(*args);
        assert_code(&out, 2);
        assert_one_line_error(&out);
    }
    let out = zimage(["generate", "--model", PACKAGE, "--promt", "x"]);
    assert!(stderr(&out).contains("'--prompt'"), "clap's suggestion is kept: {}", stderr(&out));
}

#[test]
fn help_documents_the_exit_codes() {
    for args in [&["--help"][..], &["generate", "--help"], &["bench", "--help"]] {
        let out = zimage(args);
        assert_code(&out, 0);
        let help = String::from_utf8(out.stdout).unwrap();
        for line in ["3    model package", "4    ONNX Runtime library", "6    invalid request", "130  cancelled"] {
            assert!(help.contains(line), "{args:?} --help lacks {line:?}");
        }
    }
}

#[test]
fn a_bad_model_folder_is_a_package_error() {
    let dir = scratch("bad-package");
    let out = zimage(["generate", "--model", dir.join("missing").to_str().unwrap(), "--prompt", "x"]);
    assert_code(&out, 3);
    assert!(assert_one_line_error(&out).trim_end().ends_with("no such folder"), "{out:?}");
    let out = zimage(["generate", "--model", dir.to_str().unwrap(), "--prompt", "x"]);
    assert_code(&out, 3);
    assert!(assert_one_line_error(&out).contains("no manifest.json"));

    std::fs::write(dir.join("manifest.json"), r#"{"format": "something-else"}"#).unwrap();
    let out = zimage(["generate", "--model", dir.to_str().unwrap(), "--prompt", "x"]);
    assert_code(&out, 3);
    assert_one_line_error(&out);
}

#[test]
fn request_and_file_errors_have_their_own_codes() {
    // Invalid request: the SDK refuses a size that is not a multiple of 16.
    let out = zimage(["generate", "--model", PACKAGE, "--prompt", "x", "--width", "63", "--height", "64"]);
    assert_code(&out, 6);
    assert!(assert_one_line_error(&out).contains("multiple of 16"));

    let dir = scratch("file-errors");
    // Io: the init image does not exist; Image: it is not an image.
    let missing = dir.join("missing.png");
    let out = zimage(["generate", "--model", PACKAGE, "--prompt", "x", "--init-image", missing.to_str().unwrap()]);
    assert_code(&out, 9);
    assert_one_line_error(&out);
    let not_image = dir.join("not-an-image.png");
    std::fs::write(&not_image, "plain text").unwrap();
    let out = zimage(["generate", "--model", PACKAGE, "--prompt", "x", "--init-image", not_image.to_str().unwrap()]);
    assert_code(&out, 7);
    assert_one_line_error(&out);
    // Io: the output folder does not exist (checked before generating).
    let out = zimage([
        "generate",
        "--model",
        PACKAGE,
        "--prompt",
        "x",
        "--width",
        "64",
        "--height",
        "64",
        "-o",
        dir.join("no/such/dir/x.png").to_str().unwrap(),
    ]);
    assert_code(&out, 9);
    assert_one_line_error(&out);
}

#[test]
fn turbo_case_matches_the_golden_and_records_its_parameters() {
    let dir = scratch("turbo");
    let c = case("text_to_image", "turbo");
    let (summary, images) = run_case("text_to_image", "turbo", &dir);

    let file = dir.join("out.png");
    assert_eq!(summary["files"], serde_json::json!([file.display().to_string()]));
    assert_eq!(summary["seed"], 42);
    assert_eq!(
        (summary["width"].as_u64(), summary["height"].as_u64(), summary["steps"].as_u64()),
        (Some(64), Some(64), Some(8))
    );
    assert_eq!(summary["providers"]["transformer"], "cpu");
    // The prompt's token count is the golden tokenizer's (chat template included), nothing cut.
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join(GOLDEN).join("cases.json")).unwrap()).unwrap();
    let features = cases["text_features"].as_array().unwrap().iter().find(|f| f["prompt"] == c["prompt"]).unwrap();
    assert_eq!(summary["prompt_tokens"]["used"].as_u64(), Some(features["ids"].as_array().unwrap().len() as u64));
    assert_eq!(summary["prompt_tokens"]["total"], summary["prompt_tokens"]["used"]);
    assert_eq!(summary["prompt_tokens"]["truncated"], false);
    assert!(summary["negative_prompt_tokens"].is_null(), "no guidance, no negative prompt encoded");
    let t = &summary["timings"];
    assert_eq!(t["denoise_steps_s"].as_array().unwrap().len(), 8);
    assert!(t["total_s"].as_f64().unwrap() >= t["onnx_runtime_s"].as_f64().unwrap());
    assert!(t["load_s"].as_f64().unwrap() > 0.0);

    let text = &images[0].text;
    let expect = [
        ("prompt", c["prompt"].as_str().unwrap()),
        ("negative_prompt", ""),
        ("seed", "42"),
        ("steps", "8"),
        ("size", "64x64"),
        ("guidance", "0"),
        ("cfg_normalization", "0"),
        ("cfg_truncation", "1"),
        ("count", "1"),
        ("batch_index", "0"),
        ("model", PACKAGE),
        ("max_sequence_length", "512"),
    ];
    for (key, value) in expect {
        assert_eq!(text.get(key).map(String::as_str), Some(value), "text chunk {key}");
    }
    assert!(text["software"].starts_with("zimage "));
}

/// Picture files as a user has them: sides that are not multiples of 16 and no --width/--height
/// (the size is the picture's floored to 16, the picture resized to it), and a mask of another
/// size than the picture (resized to the image's size), as diffusers' image and mask processors
/// do (tests/golden/tiny-zimage/unsized.json, diffusers' pipelines on `load_image` of the same
/// files): final latents within 1e-4, images within one level.
#[test]
fn pictures_of_any_size_and_masks_of_another_size_match_diffusers() {
    let text = std::fs::read_to_string(root().join(GOLDEN).join("unsized.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(cases.as_array().unwrap().len(), 2);
    for c in cases.as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let dir = scratch(&format!("unsized-{name}"));
        let golden = |key: &str| {
            let file = if key == "image_files" { &c[key][0] } else { &c[key] };
            root().join(GOLDEN).join(file.as_str().unwrap())
        };
        let mut args: Vec<std::ffi::OsString> =
            ["generate", "--model", PACKAGE, "--threads", "1", "--prompt"].iter().map(Into::into).collect();
        args.push(c["prompt"].as_str().unwrap().into());
        for (flag, key) in [("--seed", "seed"), ("--steps", "num_inference_steps"), ("--strength", "strength")] {
            args.extend([flag.into(), c[key].to_string().into()]);
        }
        args.extend(["--init-image".into(), golden("init_image_file").into_os_string()]);
        if c.get("mask_file").is_some() {
            args.extend(["--mask".into(), golden("mask_file").into_os_string()]);
        }
        args.extend(["--output".into(), dir.join("out.png").into_os_string()]);
        args.extend(["--save-latents".into(), dir.join("latents.npy").into_os_string()]);
        let out = zimage(&args);
        assert_code(&out, 0);
        let png = read_png(&dir.join("out.png"));
        assert_eq!(
            (png.width, png.height),
            (c["width"].as_u64().unwrap() as u32, c["height"].as_u64().unwrap() as u32)
        );
        let levels = max_level_diff(&png, &golden("image_files"));
        assert!(levels <= 1, "{name}: the image differs from diffusers' by {levels} levels");
        let got = zimage::image_io::read_npy(&dir.join("latents.npy")).unwrap();
        let want = zimage::image_io::read_npy(&golden("latents_file")).unwrap();
        assert_eq!(got.shape(), want.shape(), "{name}");
        let diff = max_abs_diff(got.iter(), want.iter());
        assert!(diff <= 1e-4, "{name}: final latents differ from diffusers' by {diff}");
    }
}

#[test]
fn vae_tiling_matches_diffusers_tiled_decode_and_is_recorded() {
    // The SDK's golden case grid_3x4: the nonsquare case's latents decoded in 32-pixel tiles
    // overlapping by 8 (tests/golden/tiny-zimage/vae_tiling).
    let tiled: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join(GOLDEN).join("vae_tiling/cases.json")).expect("tiling cases"),
    )
    .unwrap();
    let golden = tiled["decode"].as_array().unwrap().iter().find(|c| c["name"] == "grid_3x4").unwrap();
    let dir = scratch("vae-tiling");
    let output = dir.join("out.png");
    let mut args = case_args(&case("text_to_image", "nonsquare"));
    args.extend([
        "--vae-tiling".into(),
        "32:8".into(),
        "--output".into(),
        output.display().to_string(),
        "--json".into(),
    ]);
    let out = zimage(args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_code(&out, 0);
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["vae_tiling"], serde_json::json!({ "tile_size": 32, "overlap": 8 }));
    let png = read_png(&output);
    let diff = max_level_diff(&png, &root().join(GOLDEN).join(golden["image_files"][0].as_str().unwrap()));
    assert!(diff <= 1, "tiled image differs from diffusers' by {diff} levels");
    assert_eq!(png.text.get("vae_tiling").map(String::as_str), Some("tile 32, overlap 8"));

    // SIZE alone takes a quarter of it as the overlap; sizes the VAE cannot tile by are request
    // errors (exit 6) before anything is written.
    let mut args = case_args(&case("text_to_image", "nonsquare"));
    args.extend(["--vae-tiling".into(), "36".into(), "--output".into(), dir.join("bad.png").display().to_string()]);
    let out = zimage(args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_code(&out, 6);
    assert!(assert_one_line_error(&out).contains("vae_tiling (tile 36, overlap 8)"), "{}", stderr(&out));
    assert!(!dir.join("bad.png").exists());
    let out = zimage(["generate", "--model", PACKAGE, "--prompt", "x", "--vae-tiling", "big"]);
    assert_code(&out, 2);
    assert!(assert_one_line_error(&out).contains("is not SIZE or SIZE:OVERLAP"), "{}", stderr(&out));
}

#[test]
fn int8_vae_decodes_with_the_int8_decoder_and_is_recorded() {
    let dir = scratch("int8-vae");
    let output = dir.join("out.png");
    let generate = |model: &str, flags: &[&str], output: &Path| {
        let mut args = vec!["generate", "--model", model, "--prompt", "a red circle on a blue background"];
        args.extend(["--width", "64", "--height", "64", "--seed", "1", "--output", output.to_str().unwrap(), "--json"]);
        args.extend(flags);
        zimage(&args)
    };
    let out = generate("models/toy-zimage-int8", &["--int8-vae"], &output);
    assert_code(&out, 0);
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["vae_decoder"], "int8");
    assert_eq!(read_png(&output).text.get("vae_decoder").map(String::as_str), Some("int8"));
    // The exact decoder records nothing, and its picture differs (the int8 decoder is lossy).
    let exact = dir.join("exact.png");
    let out = generate("models/toy-zimage-int8", &[], &exact);
    assert_code(&out, 0);
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(summary["vae_decoder"].is_null());
    assert!(!read_png(&exact).text.contains_key("vae_decoder"));
    assert!(max_level_diff(&read_png(&output), &exact) > 0);
    // A package without one: a request error (exit 6), nothing written; with --winograd-vae: a usage error.
    let bad = dir.join("bad.png");
    let out = generate(PACKAGE, &["--int8-vae"], &bad);
    assert_code(&out, 6);
    assert!(assert_one_line_error(&out).contains("no vae_decoder_int8 graph"), "{}", stderr(&out));
    assert!(!bad.exists());
    let out = generate("models/toy-zimage-int8", &["--int8-vae", "--winograd-vae"], &bad);
    assert_code(&out, 2);
    assert!(!bad.exists());
}

/// A package's quantization is in `--json` and the PNG parameters: its method, its int8
/// activations, and a text encoder wider than its transformer.
#[test]
fn quantization_is_recorded_with_its_activations() {
    let dir = scratch("quantization");
    for (model, weights, activations, text_encoder, want) in [
        ("models/tiny-zimage-int8", "int8", Value::Null, "int8", "int8 rtn, block 32"),
        ("models/tiny-zimage-w8a8", "int8", "int8".into(), "int8", "int8 rtn, block 32, int8 activations"),
        ("models/tiny-zimage-w8a8x2", "int8", "int8x2".into(), "int8", "int8 rtn, block 32, int8x2 activations"),
        ("models/tiny-zimage-int4-gptq-te8", "int4", Value::Null, "int8", "int4 gptq, block 32, int8 text encoder"),
        ("models/tiny-zimage-int4-hqq", "int4", Value::Null, "int4", "int4 hqq, block 32"),
    ] {
        let output = dir.join("out.png");
        let args = ["generate", "--model", model, "--prompt", "a red cube", "--width", "32", "--height", "32"];
        let out = zimage([&args[..], &["--seed", "3", "--output", output.to_str().unwrap(), "--json"]].concat());
        assert_code(&out, 0);
        let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(summary["quantization"]["weights"], weights, "{model}");
        assert_eq!(summary["quantization"]["activations"], activations, "{model}");
        assert_eq!(summary["quantization"]["text_encoder_weights"], text_encoder, "{model}");
        let recorded = read_png(&output).text.get("quantization").cloned();
        assert_eq!(recorded.as_deref(), Some(want), "{model}");
    }
}

#[test]
fn guidance_flags_reach_the_sdk() {
    // Negative prompt, CFG scale, normalisation and truncation all change the image: matching
    // this golden means each flag was passed through.
    let dir = scratch("cfg");
    let (summary, images) = run_case("text_to_image", "cfg", &dir);
    assert!(summary["negative_prompt_tokens"]["used"].as_u64().unwrap() > 0);
    assert_eq!(images[0].text["negative_prompt"], "blurry, low quality, watermark");
    assert_eq!(images[0].text["guidance"], "4");
    assert_eq!(images[0].text["cfg_normalization"], "1.2");
    assert_eq!(images[0].text["cfg_truncation"], "0.6");
}

#[test]
fn a_truncated_prompt_is_reported_not_silent() {
    let dir = scratch("long-prompt");
    let c = case("text_to_image", "long_prompt");
    let mut args = case_args(&c);
    args.extend(["-o".into(), dir.join("out.png").display().to_string(), "--json".into()]);
    let out = zimage(args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_code(&out, 0);
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let tokens = &summary["prompt_tokens"];
    assert_eq!(tokens["truncated"], true);
    assert_eq!(tokens["used"], 512);
    assert!(tokens["total"].as_u64().unwrap() > 512);
    let err = stderr(&out);
    assert!(err.starts_with("zimage: warning: the prompt has ") && err.contains("only the first 512"), "{err:?}");
    // Truncated as diffusers truncates: same image.
    let diff = max_level_diff(
        &read_png(&dir.join("out.png")),
        &root().join(GOLDEN).join(c["image_files"][0].as_str().unwrap()),
    );
    assert!(diff <= 1, "differs from the golden by {diff} levels");
}

#[test]
fn count_2_writes_numbered_files_and_all_latents() {
    let dir = scratch("count2");
    let c = case("text_to_image", "two_images");
    let latents_path = dir.join("latents.npy");
    let mut args = case_args(&c);
    args.extend([
        "-o".into(),
        dir.join("out.png").display().to_string(),
        "--save-latents".into(),
        latents_path.display().to_string(),
    ]);
    let out = zimage(args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_code(&out, 0);

    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["latents.npy", "out-0.png", "out-1.png"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("out-0.png") && stdout.contains("out-1.png") && stdout.contains("seed 5"), "{stdout}");

    for (i, golden) in c["image_files"].as_array().unwrap().iter().enumerate() {
        let png = read_png(&dir.join(format!("out-{i}.png")));
        assert_eq!(png.text["batch_index"], i.to_string());
        assert_eq!(png.text["count"], "2");
        let diff = max_level_diff(&png, &root().join(GOLDEN).join(golden.as_str().unwrap()));
        assert!(diff <= 1, "out-{i}.png differs from the golden by {diff} levels");
    }

    // All K images' final latents, [K, C, H/8, W/8], as diffusers left them (<= 1e-4).
    let latents = zimage::image_io::read_npy(&latents_path).unwrap();
    assert_eq!(latents.shape(), [2, 16, 8, 8]);
    let golden = zimage::image_io::read_npy(&root().join(GOLDEN).join(c["latents_file"].as_str().unwrap())).unwrap();
    assert_eq!(latents.shape(), golden.shape());
    let mut max_abs = 0.0f32;
    for (a, b) in latents.iter().zip(golden.iter()) {
        let d = (a - b).abs();
        // NaN must fail: `f32::max` would drop it.
        if d.is_nan() || d > max_abs {
            max_abs = d;
        }
        if d.is_nan() {
            break;
        }
    }
    assert!(max_abs <= 1e-4, "latents differ from the golden by {max_abs}");
}

/// `--previews N`: N pictures beside the output, named after it and the step, one per image,
/// listed in the JSON summary; the outputs themselves are the golden's as without previews.
#[test]
fn previews_are_written_beside_the_output() {
    let dir = scratch("previews");
    let c = case("text_to_image", "two_images");
    let mut args = case_args(&c);
    args.extend([
        "-o".into(),
        dir.join("out.png").display().to_string(),
        "--previews".into(),
        "2".into(),
        "--json".into(),
    ]);
    let out = zimage(args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_code(&out, 0);
    let steps = c["num_inference_steps"].as_u64().unwrap() as usize;
    // k * steps / 3 rounded up, k = 1, 2 (the SDK's spacing).
    let at = [steps.div_ceil(3), (2 * steps).div_ceil(3)];
    let mut want: Vec<String> =
        at.iter().flat_map(|s| [format!("out.step{s}-0.png"), format!("out.step{s}-1.png")]).collect();
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: Vec<String> = summary["previews"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Path::new(p.as_str().unwrap()).file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, want);
    assert!(summary["timings"]["previews_s"].as_f64().unwrap() > 0.0);
    want.extend(["out-0.png".into(), "out-1.png".into()]);
    want.sort();
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, want);
    for (i, golden) in c["image_files"].as_array().unwrap().iter().enumerate() {
        let result = read_png(&dir.join(format!("out-{i}.png")));
        let diff = max_level_diff(&result, &root().join(GOLDEN).join(golden.as_str().unwrap()));
        assert!(diff <= 1, "out-{i}.png differs from the golden by {diff} levels");
        let preview = read_png(&dir.join(format!("out.step{}-{i}.png", at[0])));
        assert_eq!((preview.width, preview.height), (result.width, result.height));
        assert_eq!(preview.text["zimage-preview-step"], at[0].to_string());
        assert_ne!(preview.rgb, result.rgb, "a preview before the last step is not the result");
    }
}

#[test]
fn image_to_image_and_inpainting_flags_reach_the_sdk() {
    let dir = scratch("i2i");
    let (summary, images) = run_case("image_to_image", "strength_0.6", &dir);
    assert_eq!(summary["strength"], 0.6);
    assert_eq!(images[0].text["strength"], "0.6");
    assert_eq!(images[0].text["init_image"], format!("{GOLDEN}/inputs/init.png"));

    let dir = scratch("inpaint");
    let (_, images) = run_case("inpaint", "strength_0.7", &dir);
    assert_eq!(images[0].text["mask"], format!("{GOLDEN}/inputs/mask.png"));
}

#[test]
fn bench_reports_every_stage() {
    let out = zimage([
        "bench", "--model", PACKAGE, "--width", "64", "--height", "64", "--steps", "3", "--warmup", "0", "--runs", "2",
        "--json",
    ]);
    assert_code(&out, 0);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = report["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["tokenize", "text_encode", "step 1", "step 2", "step 3", "denoise", "vae_decode", "total", "onnx_runtime"]
    );
    for s in report["stages"].as_array().unwrap() {
        let (median, min, max) =
            (s["median"].as_f64().unwrap(), s["min"].as_f64().unwrap(), s["max"].as_f64().unwrap());
        assert!(0.0 <= min && min <= median && median <= max, "{s}");
    }
    assert_eq!(report["runs"].as_array().unwrap().len(), 2);
    assert!(
        report["total_over_onnx_runtime"]["min"].as_f64().unwrap() >= 1.0,
        "ONNX Runtime time is part of the total"
    );
    assert!(report["load_s"].as_f64().unwrap() > 0.0);
    assert!(report["weight_bytes"].as_u64().unwrap() > 0);
    assert_eq!(report["vae_decoder_graph"], "vae_decoder.onnx");
    if cfg!(target_os = "linux") {
        assert!(report["peak_rss_bytes"].as_u64().unwrap() >= report["peak_rss_after_load_bytes"].as_u64().unwrap());
        // CPU run: no GPU memory to report.
        assert!(report["peak_device_memory"].is_null());
    }

    // One quick run with a load flag more: the report says how the VAE decoded.
    let quick = |flag: &[&str]| -> Value {
        let mut args = vec!["bench", "--model", PACKAGE, "--width", "64", "--height", "64", "--steps", "1"];
        args.extend(["--warmup", "0", "--runs", "1", "--json"]);
        args.extend(flag);
        let out = zimage(&args);
        assert_code(&out, 0);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let report = quick(&["--winograd-vae"]);
    assert_eq!(report["vae_decoder_graph"], "vae_decoder_cpu.onnx");
    assert!(report["vae_tiling"].is_null());
    let report = quick(&["--vae-tiling", "32"]);
    assert_eq!(report["vae_tiling"], serde_json::json!({ "tile_size": 32, "overlap": 8 }));

    let out = zimage([
        "bench", "--model", PACKAGE, "--width", "64", "--height", "64", "--steps", "2", "--warmup", "0", "--runs", "1",
    ]);
    assert_code(&out, 0);
    let table = String::from_utf8(out.stdout).unwrap();
    for line in [
        "stage",
        "step 2",
        "vae_decode",
        "images/s",
        "total / ONNX Runtime time",
        "load (session creation)",
        "peak RSS",
    ] {
        assert!(table.contains(line), "table lacks {line:?}:\n{table}");
    }
}

/// Ctrl-C while a denoising step runs cancels through the SDK: the run is observed to be
/// denoising (progress lines) before the signal is sent, the CLI reports how far it got, which
/// it can only say when the SDK returned `Cancelled`, and nothing is left in the output folder.
#[cfg(unix)]
#[test]
fn ctrl_c_cancels_with_exit_130() {
    use std::io::BufRead;
    use std::time::{Duration, Instant};
    let dir = scratch("ctrl-c");
    let mut child = Command::new(env!("CARGO_BIN_EXE_zimage"))
        .args([
            "generate",
            "--model",
            PACKAGE,
            "--prompt",
            "x",
            "--width",
            "1024",
            "--height",
            "1024",
            "--steps",
            "200",
            "--progress",
            "lines",
            "--save-latents",
        ])
        .arg(dir.join("never.npy"))
        .arg("-o")
        .arg(dir.join("never.png"))
        .current_dir(root())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    // Wait until a step has completed: the pipeline is loaded and denoising.
    loop {
        let line = lines.next().expect("stderr ended before a step completed").unwrap();
        seen.push(line.clone());
        if line.starts_with("zimage: progress: step 1/200") {
            break;
        }
    }
    let sent = Instant::now();
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    seen.extend(lines.map(|l| l.unwrap()));
    let status = child.wait().unwrap();
    assert!(sent.elapsed() < Duration::from_secs(30), "cancellation took {:?}", sent.elapsed());
    assert_eq!(status.code(), Some(130), "stderr: {seen:?}");
    let last = seen.last().unwrap();
    let done: usize = last
        .strip_prefix("zimage: error: cancelled after ")
        .and_then(|rest| rest.strip_suffix(" of 200 denoising steps"))
        .unwrap_or_else(|| panic!("not the SDK's cancellation: {seen:?}"))
        .parse()
        .unwrap();
    assert!((1..200).contains(&done), "{seen:?}");
    assert!(seen[..seen.len() - 1].iter().all(|l| l.starts_with("zimage: progress: step ")), "{seen:?}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "files left behind");
}

/// Ctrl-C while the PNGs are being written (after the last denoising step, a temporary file is
/// seen in the output folder): exit 130 at once, the temporary files removed, no output left.
#[cfg(unix)]
#[test]
fn ctrl_c_while_writing_leaves_nothing() {
    use std::io::BufRead;
    use std::time::{Duration, Instant};
    // The signal lands while the outputs are written, or (on a busy machine) just after all of
    // them were renamed into place: then the command ends as it would have, exit 0 with every
    // output whole. Tried until it lands while writing.
    for attempt in 0..10 {
        let dir = scratch("ctrl-c-writing");
        let mut child = Command::new(env!("CARGO_BIN_EXE_zimage"))
            .args([
                "generate", "--model", PACKAGE, "--prompt", "x", "--width", "512", "--height", "512", "--steps", "1",
            ])
            .args(["--count", "6", "--seed", "2", "--progress", "lines"])
            .arg("-o")
            .arg(dir.join("out.png"))
            .current_dir(root())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The destinations' writability probes come before loading: wait for the last step, so
        // that the temporary file seen next is an output being written.
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let step = lines.next().expect("a progress line").unwrap();
        assert!(step.starts_with("zimage: progress: step 1/1 "), "{step}");
        let started = Instant::now();
        let temp_seen = loop {
            let temp = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .find(|n| n.ends_with(".zimage-tmp"));
            if let Some(name) = temp {
                break name;
            }
            assert!(child.try_wait().unwrap().is_none(), "finished before a temporary file was seen");
            assert!(started.elapsed() < Duration::from_secs(300));
            std::thread::sleep(Duration::from_millis(1));
        };
        // SAFETY: kill(2) on the child's pid, which has not been waited for yet.
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
        let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
        let status = child.wait().unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        if status.code() == Some(0) {
            let all: Vec<String> = (0..6).map(|i| format!("out-{i}.png")).collect();
            assert_eq!(left, all, "too late for attempt {attempt}: every output, whole");
            for name in &all {
                assert_eq!(read_png(&dir.join(name)).width, 512);
            }
            continue;
        }
        assert_eq!(status.code(), Some(130), "{temp_seen}: {rest:?}");
        assert!(left.is_empty(), "left behind after Ctrl-C during {temp_seen}: {left:?}");
        return;
    }
    panic!("Ctrl-C never arrived while the outputs were written");
}

/// Every hostile input of issue 21 and the others tried: exit code, one line, nothing left.
#[cfg(unix)]
#[test]
fn hostile_inputs_fail_with_one_line_and_leave_nothing() {
    let dir = scratch("hostile");
    let d = |name: &str| dir.join(name).display().to_string();
    let small = format!("{GOLDEN}/inputs/init.png");
    std::fs::create_dir(dir.join("sub")).unwrap();
    let g = |extra: &[&str]| {
        let mut args: Vec<String> = ["generate", "--model", PACKAGE, "--prompt", "x"].map(String::from).to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (g(&["--init-image", &small, "--width", "100000", "--height", "100000"]), 6, "width 100000 exceeds"),
        (g(&["--init-image", "/dev/zero"]), 7, "/dev/zero: the file is larger than the limit of 256 MiB"),
        (g(&["--init-image", &small, "--mask", "/dev/zero"]), 7, "/dev/zero: the file is larger than the limit"),
        (g(&["--init-image", &small, "--mask", "Cargo.toml"]), 7, "Cargo.toml: not a PNG, JPEG or WebP image"),
        (g(&["--init-image", &d("sub")]), 9, "is a folder"),
        (g(&["--width", "64", "--height", "64", "--guidance", "1e38"]), 6, "guidance_scale must be within [0, 100]"),
        (g(&["--width", "64", "--height", "64", "--guidance", "NaN"]), 6, "guidance_scale must be finite"),
        (g(&["--width", "64", "--height", "64", "--cfg-normalization", "1000"]), 6, "cfg_normalization"),
        (g(&["--width", "64", "--height", "64", "--cfg-truncation=-1"]), 6, "cfg_truncation"),
        (g(&["--width", "64", "--height", "64", "--count", "4294967295"]), 6, "count must be 1..=64"),
        (g(&["--width", "64", "--height", "64", "--steps", "4294967295"]), 6, "steps must be 1..=1000"),
        (g(&["--width", "4294967295", "--height", "64"]), 6, "must be a positive multiple of 16"),
        (g(&["--init-image", &small, "--strength", "NaN"]), 6, "strength must be within [0, 1]"),
        (g(&["--width", "64", "--height", "64", "-o", "/dev/full"]), 9, "/dev/full: is not a regular file"),
        (g(&["--width", "64", "--height", "64", "-o", &d("no/such/x.png")]), 9, "output folder does not exist"),
        (
            g(&["--width", "64", "--height", "64", "-o", &d("same.npy"), "--save-latents", &d("same.npy")]),
            2,
            "-o and --save-latents name the same file",
        ),
        (g(&["--width", "64", "--height", "64", "--threads", "0"]), 6, "threads must be 1..=1024"),
        (
            ["bench", "--model", PACKAGE, "--runs", "4294967295"].map(String::from).to_vec(),
            2,
            "4294967295 is not in 1..=1000",
        ),
        (
            ["bench", "--model", PACKAGE, "--warmup", "4294967295", "--runs", "1000"].map(String::from).to_vec(),
            2,
            "4294967295 is not in 0..=1000",
        ),
        (
            ["bench", "--model", PACKAGE, "--width", "100000", "--height", "100000"].map(String::from).to_vec(),
            6,
            "width 100000 exceeds",
        ),
        (
            ["enhance", "--model", "models/tiny-qwen3-enhancer", "--prompt", "x", "--max-new-tokens", "99999999"]
                .map(String::from)
                .to_vec(),
            6,
            "max_new_tokens",
        ),
        (
            ["enhance", "--model", "models/tiny-qwen3-enhancer", "--prompt", "a red fox", "--max-context-tokens", "5"]
                .map(String::from)
                .to_vec(),
            6,
            "the enhancer's context holds 5",
        ),
    ];
    for (args, code, message) in &cases {
        let out = zimage(args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {}", stderr(&out));
        let err = assert_one_line_error(&out);
        assert!(err.contains(message), "{args:?}: {err}");
    }
    let mut left: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    assert_eq!(left, ["sub"], "nothing written");
    assert_eq!(std::fs::read_dir(dir.join("sub")).unwrap().count(), 0);
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata("/dev/full").unwrap().file_type().is_char_device());

    // A folder given as the output gets proper file names inside it.
    let out = zimage(
        g(&["--width", "16", "--height", "16", "--seed", "1", "-o", &d("sub"), "--save-latents", &d("sub")])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_code(&out, 0);
    let mut names: Vec<String> =
        std::fs::read_dir(dir.join("sub")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["latents.npy", "zimage.png"]);
    assert_eq!(read_png(&dir.join("sub/zimage.png")).width, 16);
}

/// The output's extension picks its format: `.jpg` a JPEG (at --quality), `.webp` a lossless
/// WebP with the PNG's pixels exactly, and the previews beside it take the same format.
#[test]
fn outputs_are_written_in_the_format_their_extension_names() {
    let dir = scratch("formats");
    let d = |name: &str| dir.join(name).display().to_string();
    let run = |output: &str, extra: &[&str]| {
        let mut args = vec!["generate", "--model", PACKAGE, "--prompt", "a harbour", "--width", "64", "--height", "48"];
        args.extend(["--steps", "2", "--seed", "5", "-o", output]);
        args.extend(extra);
        assert_code(&zimage(&args), 0);
    };
    run(&d("a.png"), &[]);
    run(&d("a.webp"), &["--previews", "1"]);
    run(&d("a.jpg"), &[]);
    run(&d("low.jpeg"), &["--quality", "10"]);
    let png = read_png(&dir.join("a.png"));
    let bytes = |name: &str| std::fs::read(dir.join(name)).unwrap();
    assert_eq!(&bytes("a.webp")[..4], b"RIFF");
    assert_eq!(&bytes("a.webp")[8..12], b"WEBP");
    assert_eq!(&bytes("a.step1.webp")[8..12], b"WEBP", "the preview takes the output's format");
    assert_eq!(zimage::image_io::decode_rgb(&bytes("a.webp")).unwrap().pixels, png.rgb, "lossless");
    for name in ["a.jpg", "low.jpeg"] {
        assert_eq!(&bytes(name)[..3], [0xFF, 0xD8, 0xFF], "{name}");
    }
    let error = |name: &str| {
        let jpeg = zimage::image_io::decode_rgb(&bytes(name)).unwrap();
        assert_eq!((jpeg.width, jpeg.height), (64, 48));
        jpeg.pixels.iter().zip(&png.rgb).map(|(a, b)| (*a as f64 - *b as f64).abs()).sum::<f64>() / png.rgb.len() as f64
    };
    let (high, low) = (error("a.jpg"), error("low.jpeg"));
    assert!(high < low && high < 8.0, "mean errors: quality 95 {high}, quality 10 {low}");
    assert!(bytes("low.jpeg").len() < bytes("a.jpg").len());
}

/// Inputs the command used to misread without a word: the extension of a format it cannot
/// write or `-` as the output (PNG bytes in `x.gif`, a file named `-`), --save-latents through a symbolic link to the PNG
/// (the latents replaced the picture), enhancer options without --enhance (ignored), a
/// negative number as a value (`unexpected argument '-1'`), a negative prompt without guidance
/// (ignored), and a size the init picture set named as if the user had given it.
#[test]
fn options_the_command_would_misread_are_refused_or_reported() {
    let dir = scratch("misread");
    let d = |name: &str| dir.join(name).display().to_string();
    let g = |extra: &[&str]| {
        let mut args: Vec<String> =
            ["generate", "--model", PACKAGE, "--prompt", "x", "--steps", "1"].map(String::from).to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    std::fs::write(dir.join("a.png"), b"old").unwrap();
    std::os::unix::fs::symlink(dir.join("a.png"), dir.join("link.npy")).unwrap();
    let tiny = dir.join("tiny.png");
    let mut encoder = png::Encoder::new(std::fs::File::create(&tiny).unwrap(), 1, 1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.write_header().unwrap().write_image_data(&[255, 0, 0]).unwrap();
    let t = tiny.display().to_string();
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (g(&["--width", "16", "--height", "16", "-o", &d("x.gif")]), 2, "writes PNG, JPEG (.jpg) or WebP"),
        (g(&["--width", "16", "--height", "16", "-o", &d("x.tiff")]), 2, "writes PNG, JPEG (.jpg) or WebP"),
        (g(&["--width", "16", "--height", "16", "-o", &d("x.png"), "--quality", "80"]), 2, "--quality is the JPEG"),
        (g(&["--width", "16", "--height", "16", "-o", &d("x.jpg"), "--quality", "0"]), 2, "not in 1..=100"),
        (g(&["--width", "16", "--height", "16", "-o", "-"]), 2, "standard output is not supported"),
        (g(&["--width", "16", "--height", "16", "-o", &d("y.png"), "--save-latents", "-"]), 2, "standard output"),
        (
            g(&["--width", "16", "--height", "16", "-o", &d("a.png"), "--save-latents", &d("link.npy")]),
            2,
            "-o and --save-latents name the same file",
        ),
        (g(&["--width", "16", "--height", "16", "-o", &d("y.png"), "--thinking"]), 2, "--enhance"),
        (g(&["--width", "16", "--height", "16", "-o", &d("y.png"), "--max-new-tokens", "5"]), 2, "--enhance"),
        (g(&["--width", "16", "--height", "16", "-o", &d("y.png"), "--guidance", "-1"]), 6, "within [0, 100]"),
        (g(&["--width", "16", "--height", "16", "-o", &d("y.png"), "--seed", "-1"]), 2, "invalid value '-1'"),
        (g(&["--init-image", &t, "-o", &d("y.png")]), 6, "width 1 must be a positive multiple of 16 (the size of "),
        (
            // The preview of step 1 would be tiny.png itself.
            g(&["--init-image", &d("tiny.step1.png"), "--width", "16", "--height", "16", "-o", &t, "--previews", "1"]),
            2,
            "--previews would write",
        ),
    ];
    std::fs::copy(&tiny, dir.join("tiny.step1.png")).unwrap();
    for (args, code, message) in &cases {
        let out = zimage(args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {}", stderr(&out));
        let err = assert_one_line_error(&out);
        assert!(err.contains(message), "{args:?}: {err}");
    }
    assert_eq!(std::fs::read(dir.join("a.png")).unwrap(), b"old", "the linked PNG is untouched");
    // A size the user gave is the user's, not the picture's.
    let out = zimage(g(&["--init-image", &t, "--width", "17", "--height", "16", "-o", &d("y.png")]));
    assert_code(&out, 6);
    let err = assert_one_line_error(&out);
    assert!(err.contains("width 17") && !err.contains("the size of"), "{err}");
    let mut left: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    assert_eq!(left, ["a.png", "link.npy", "tiny.png", "tiny.step1.png"], "nothing written");
    assert_eq!(std::fs::read(dir.join("tiny.step1.png")).unwrap(), std::fs::read(&tiny).unwrap());

    // A prompt that starts with a dash is a prompt, not a flag.
    let args = ["generate", "--model", PACKAGE, "--prompt", "-a cat", "--negative-prompt", "--blurry", "--steps", "1"];
    let out =
        zimage([&args[..], &["--width", "16", "--height", "16", "--guidance", "1", "-o", &d("dash.png")]].concat());
    assert_code(&out, 0);
    let png = read_png(&dir.join("dash.png"));
    assert!(png.text.values().any(|v| v.contains("-a cat")), "{:?}", png.text);
    std::fs::remove_file(dir.join("dash.png")).unwrap();

    // A negative prompt without guidance still generates, with a warning that it is unused.
    let out = zimage(g(&["--width", "16", "--height", "16", "-o", &d("y.png"), "--negative-prompt", "blurry"]));
    assert_code(&out, 0);
    assert!(
        stderr(&out).contains("zimage: warning: --negative-prompt is not used without guidance"),
        "{}",
        stderr(&out)
    );
    let out = zimage(g(&[
        "--width",
        "16",
        "--height",
        "16",
        "-o",
        &d("y.png"),
        "--negative-prompt",
        "blurry",
        "--guidance",
        "1",
    ]));
    assert_code(&out, 0);
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
}

/// Standard output closed by its reader (`| head`, `| true`): the command ends quietly with
/// 141, without a panic message, for every kind of output.
#[cfg(unix)]
#[test]
fn a_closed_stdout_ends_quietly() {
    let dir = scratch("closed-stdout");
    let png = dir.join("x.png").display().to_string();
    let cases: Vec<Vec<&str>> = vec![
        vec!["generate", "--model", PACKAGE, "--prompt", "x", "--width", "16", "--height", "16", "-o", &png, "--json"],
        vec!["enhance", "--model", "models/tiny-qwen3-enhancer", "--prompt", "a cat", "--stream"],
        vec![
            "bench", "--model", PACKAGE, "--width", "16", "--height", "16", "--steps", "1", "--warmup", "0", "--runs",
            "1",
        ],
    ];
    for args in cases {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_zimage"))
            .args(&args)
            .current_dir(root())
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(141), "{args:?}: {}", stderr(&out));
        assert!(out.stderr.is_empty(), "{args:?}: {}", stderr(&out));
    }
}

/// A write that fails part-way (here the file size limit, as a full disk would) is an I/O
/// error, exit 9, and leaves no output and no temporary file; with --save-latents failing,
/// the PNGs already encoded are not left either.
#[cfg(unix)]
#[test]
fn a_failed_write_is_an_io_error_and_leaves_nothing() {
    use std::os::unix::process::CommandExt;
    let limited = |args: &[&str], max_file_bytes: u64| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_zimage"));
        command.args(args).current_dir(root());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // Ignored, SIGXFSZ no longer kills the process: the write fails with EFBIG.
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let limit = libc::rlimit { rlim_cur: max_file_bytes, rlim_max: max_file_bytes };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command.output().unwrap()
    };
    let dir = scratch("write-fails");
    let png = dir.join("x.png").display().to_string();
    let out = limited(
        &["generate", "--model", PACKAGE, "--prompt", "x", "--width", "64", "--height", "64", "-o", &png],
        2000,
    );
    assert_code(&out, 9);
    assert!(assert_one_line_error(&out).contains("File too large"), "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "nothing left");

    // 64 PNGs of about 1.2 kB each fit under 8 kB; their 16.5 kB of latents do not.
    let npy = dir.join("l.npy").display().to_string();
    let args = [
        "generate",
        "--model",
        PACKAGE,
        "--prompt",
        "x",
        "--width",
        "16",
        "--height",
        "16",
        "--count",
        "64",
        "-o",
        &png,
        "--save-latents",
        &npy,
    ];
    let out = limited(&args, 8192);
    assert_code(&out, 9);
    assert!(assert_one_line_error(&out).contains("l.npy"), "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "no PNG without its latents");
    // Unlimited, the same command writes all 65 files.
    let out = zimage(args);
    assert_code(&out, 0);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 65);
}

/// ONNX Runtime's own log lines come through the CLI's logger: one `zimage: ...` line each,
/// never ONNX Runtime's colour-coded format.
#[test]
fn onnx_runtime_logs_are_one_line_each() {
    let dir = scratch("logs");
    let png = dir.join("x.png").display().to_string();
    let out = zimage([
        "generate",
        "--model",
        PACKAGE,
        "--prompt",
        "x",
        "--width",
        "16",
        "--height",
        "16",
        "-o",
        &png,
        "--verbose",
    ]);
    assert_code(&out, 0);
    let err = stderr(&out);
    assert!(err.lines().any(|l| l.starts_with("zimage: info: onnxruntime: ")), "{err}");
    for line in err.lines() {
        assert!(line.starts_with("zimage: "), "{line:?}");
        assert!(!line.contains('\u{1b}'), "colour codes: {line:?}");
    }
    // Without --verbose a successful run prints nothing on stderr.
    let out = zimage(["generate", "--model", PACKAGE, "--prompt", "x", "--width", "16", "--height", "16", "-o", &png]);
    assert_code(&out, 0);
    assert!(out.stderr.is_empty(), "{}", stderr(&out));
}

/// `zimage enhance` greedy output is transformers' greedy output for the golden cases that use
/// the built-in system prompt, and `generate --enhance` stores what it used.
#[test]
fn enhance_matches_the_golden_greedy_text_and_generate_records_it() {
    let goldens: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/golden/enhancer/cases.json")).unwrap())
            .unwrap();
    let mut checked = 0;
    for c in goldens["cases"].as_array().unwrap() {
        if !c["system_prompt"].is_null() {
            continue;
        }
        let max = c["max_new_tokens"].as_u64().unwrap().to_string();
        let mut args = vec![
            "enhance",
            "--model",
            "models/tiny-qwen3-enhancer",
            "--prompt",
            c["prompt"].as_str().unwrap(),
            "--max-new-tokens",
            &max,
            "--json",
        ];
        if c["thinking"].as_bool().unwrap() {
            args.push("--thinking");
        }
        let out = zimage(&args);
        assert_code(&out, 0);
        let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            summary["new_tokens"].as_u64().unwrap() as usize,
            c["generated_ids"].as_array().unwrap().len(),
            "{}",
            c["name"]
        );
        assert_eq!(summary["finish"].as_str().unwrap().to_lowercase(), c["finish"].as_str().unwrap(), "{}", c["name"]);
        // A speed once there was a decode step after the prompt's; none (null, not 0) for one token.
        match summary["new_tokens"].as_u64().unwrap() {
            1 => assert!(summary["tokens_per_second"].is_null(), "{summary}"),
            _ => assert!(summary["tokens_per_second"].as_f64().is_some_and(|v| v > 0.0), "{summary}"),
        }
        if !c["thinking"].as_bool().unwrap() {
            assert_eq!(
                summary["text"].as_str().unwrap().trim(),
                c["raw_text"].as_str().unwrap().trim(),
                "{}",
                c["name"]
            );
        }
        checked += 1;
    }
    assert!(checked >= 3, "golden cases with the default system prompt: {checked}");

    let dir = scratch("enhance");
    let png = dir.join("e.png");
    let out = zimage([
        "generate",
        "--model",
        PACKAGE,
        "--prompt",
        "a cat",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "1",
        "--enhance",
        "--enhancer",
        "models/tiny-qwen3-enhancer",
        "--max-new-tokens",
        "12",
        "--json",
        "-o",
        png.to_str().unwrap(),
    ]);
    assert_code(&out, 0);
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let enhanced = summary["enhanced_prompt"].as_str().expect("enhanced prompt reported");
    let again =
        zimage(["enhance", "--model", "models/tiny-qwen3-enhancer", "--prompt", "a cat", "--max-new-tokens", "12"]);
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim_end_matches('\n'), enhanced);

    let no_decoder = zimage(["enhance", "--model", PACKAGE, "--prompt", "a cat"]);
    assert_code(&no_decoder, 3);
}

#[test]
fn lora_flags_match_the_golden_and_are_recorded() {
    let dir = scratch("lora");
    let lora: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join(GOLDEN).join("lora.json")).unwrap()).unwrap();
    let c = lora["cases"].as_array().unwrap().iter().find(|c| c["name"] == "peft_0.7_kohya_1.3").unwrap().clone();
    let output = dir.join("out.png");
    let mut args = case_args(&c);
    for l in c["loras"].as_array().unwrap() {
        args.push("--lora".into());
        args.push(format!("{GOLDEN}/{}:{}", l["file"].as_str().unwrap(), l["scale"]));
    }
    args.extend(["--output".into(), output.display().to_string(), "--json".into()]);
    let out = zimage(args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_code(&out, 0);
    let png = read_png(&output);
    let golden = root().join(GOLDEN).join(c["image_files"][0].as_str().unwrap());
    let diff = max_level_diff(&png, &golden);
    assert!(diff <= 1, "LoRA image differs from diffusers' by {diff} levels");
    let recorded: Value = serde_json::from_str(&png.text["loras"]).unwrap();
    let sha = |file: &str| {
        use sha2::Digest;
        let bytes = std::fs::read(root().join(GOLDEN).join(file)).unwrap();
        format!("{:x}", sha2::Sha256::digest(&bytes))
    };
    let want: Vec<Value> = c["loras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let file = l["file"].as_str().unwrap();
            serde_json::json!({"file": Path::new(file).file_name().unwrap().to_str().unwrap(),
                               "sha256": sha(file), "scale": l["scale"]})
        })
        .collect();
    assert_eq!(recorded, Value::Array(want.clone()));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["loras"], Value::Array(want));

    // A LoRA for another model: exit code 10, one line naming the key.
    let mut args = case_args(&c);
    args.extend(["--lora".into(), "tests/golden/tiny-zimage-alt/loras/peft.safetensors".into()]);
    args.extend(["--output".into(), dir.join("bad.png").display().to_string()]);
    let out = zimage(args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_code(&out, 10);
    let err = assert_one_line_error(&out);
    assert!(err.contains("lora_A.weight") && err.contains("[64, 64]"), "{err}");
    assert!(!dir.join("bad.png").exists());
}

#[test]
fn a_base_model_package_generates_with_its_recommended_steps_and_guidance() {
    // Only prompt, negative prompt, size and seed given: steps 50 and guidance 4 come from the
    // package's manifest, and the image is diffusers' with those settings.
    let base = "models/tiny-zimage-base";
    let golden = root().join("tests/golden/tiny-zimage-base");
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(golden.join("cases.json")).unwrap()).unwrap();
    let c = cases["text_to_image"].as_array().unwrap().iter().find(|c| c["name"] == "recommended").unwrap();
    let dir = scratch("base-model");
    let output = dir.join("out.png");
    let (width, height, seed) = (c["width"].to_string(), c["height"].to_string(), c["seed"].to_string());
    let out = zimage([
        "generate",
        "--model",
        base,
        "--prompt",
        c["prompt"].as_str().unwrap(),
        "--negative-prompt",
        c["negative_prompt"].as_str().unwrap(),
        "--width",
        &width,
        "--height",
        &height,
        "--seed",
        &seed,
        "--output",
        output.to_str().unwrap(),
        "--json",
    ]);
    assert_code(&out, 0);
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["steps"].as_u64(), Some(50));
    let png = read_png(&output);
    let diff = max_level_diff(&png, &golden.join(c["image_files"][0].as_str().unwrap()));
    assert!(diff <= 1, "differs from diffusers by {diff} levels");
    assert_eq!((png.text["steps"].as_str(), png.text["guidance"].as_str()), ("50", "4"));

    // What the user gives wins over the recommendation.
    let out = zimage([
        "generate",
        "--model",
        base,
        "--prompt",
        "x",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "1",
        "--steps",
        "2",
        "--guidance",
        "0",
        "--output",
        dir.join("given.png").to_str().unwrap(),
        "--json",
    ]);
    assert_code(&out, 0);
    let png = read_png(&dir.join("given.png"));
    assert_eq!((png.text["steps"].as_str(), png.text["guidance"].as_str()), ("2", "0"));
}
