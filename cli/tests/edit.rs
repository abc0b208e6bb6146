//! `zimage edit` end to end on the committed tiny Omni package: a golden edit (two references
//! of different sizes, CFG with normalization and truncation) within one level of diffusers,
//! the references' names and sha256 in the PNG parameters, the latents, an edit with LoRAs, and
//! the exit codes of bad edits (nothing written).

mod common;

use std::path::PathBuf;

use serde_json::Value;

use common::{read_png, root, stderr, zimage};
use sha2::Digest;

const PACKAGE: &str = "models/tiny-zimage-omni";
const GOLDEN: &str = "tests/golden/tiny-zimage-omni";

fn scratch(name: &str) -> PathBuf {
    common::scratch("cli-edit-tests", name)
}

/// Case `name` of the section `section` ("edit", "lora") of the Omni goldens.
fn golden_case(section: &str, name: &str) -> Value {
    let text = std::fs::read_to_string(root().join(GOLDEN).join("cases.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    cases[section].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone()
}

/// `zimage edit` arguments for golden case `c` (its LoRAs as --lora FILE:SCALE).
fn case_args(c: &Value) -> Vec<String> {
    let mut args: Vec<String> = vec!["edit".into(), "--model".into(), PACKAGE.into()];
    for image in c["image_files"].as_array().unwrap() {
        args.extend(["--image".into(), format!("{GOLDEN}/{}", image.as_str().unwrap())]);
    }
    for (flag, key) in [
        ("--prompt", "prompt"),
        ("--negative-prompt", "negative_prompt"),
        ("--steps", "num_inference_steps"),
        ("--guidance", "guidance_scale"),
        ("--cfg-normalization", "cfg_normalization"),
        ("--cfg-truncation", "cfg_truncation"),
        ("--seed", "seed"),
        ("--width", "width"),
        ("--height", "height"),
    ] {
        let value = match &c[key] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if !c[key].is_null() {
            args.extend([flag.into(), value]);
        }
    }
    for lora in c["loras"].as_array().into_iter().flatten() {
        args.extend(["--lora".into(), format!("{GOLDEN}/{}:{}", lora["file"].as_str().unwrap(), lora["scale"])]);
    }
    args
}

/// The edit's PNG within one level of the golden image, its latents within 1e-4.
fn check_against_golden(c: &Value, output: &std::path::Path, latents: &std::path::Path) {
    let png = read_png(output);
    let golden = read_png(&root().join(GOLDEN).join(c["output_files"][0].as_str().unwrap()));
    assert_eq!((png.width, png.height), (golden.width, golden.height));
    let diff = png.rgb.iter().zip(&golden.rgb).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(diff <= 1, "differs from diffusers by {diff} levels");
    let got = zimage::image_io::read_npy(latents).unwrap();
    let want = zimage::image_io::read_npy(&root().join(GOLDEN).join(c["latents_file"].as_str().unwrap())).unwrap();
    assert_eq!(got.shape(), want.shape());
    let worst = common::max_abs_diff(got.iter(), want.iter());
    assert!(worst <= 1e-4 && got.iter().all(|v| v.is_finite()), "latents differ by {worst}");
}

/// Runs `zimage edit` for golden case `c` (its PNG and latents in scratch folder `name`, a JSON
/// summary), checks both against the golden, and returns the summary and the PNG's path.
fn edit_like_golden(c: &Value, name: &str) -> (Value, PathBuf) {
    let dir = scratch(name);
    let (output, latents) = (dir.join("edit.png"), dir.join("latents.npy"));
    let mut args = case_args(c);
    args.extend(["-o".into(), output.display().to_string(), "--save-latents".into(), latents.display().to_string()]);
    args.extend(["--json".into(), "--progress".into(), "none".into()]);
    let out = zimage(args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    check_against_golden(c, &output, &latents);
    (serde_json::from_slice(&out.stdout).unwrap(), output)
}

#[test]
fn two_reference_edit_matches_the_golden_and_records_its_references() {
    let c = golden_case("edit", "two_refs_cfg");
    let (summary, output) = edit_like_golden(&c, "two_refs");
    assert_eq!((summary["width"].as_u64(), summary["height"].as_u64()), (Some(96), Some(64)));
    assert_eq!(summary["loras"], serde_json::json!([]));
    let png = read_png(&output);
    assert!(!png.text.contains_key("loras"));

    let refs: Value = serde_json::from_str(&png.text["reference_images"]).unwrap();
    let refs = refs.as_array().unwrap();
    assert_eq!(refs.len(), 2);
    for (record, file) in refs.iter().zip(c["image_files"].as_array().unwrap()) {
        let path = root().join(GOLDEN).join(file.as_str().unwrap());
        let sha: String =
            sha2::Sha256::digest(std::fs::read(&path).unwrap()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(record["sha256"], sha.as_str());
        assert_eq!(record["file"], path.file_name().unwrap().to_str().unwrap());
    }
    assert_eq!(png.text["prompt"], c["prompt"].as_str().unwrap());
    assert_eq!(png.text["seed"], "2");
    assert_eq!(png.text["steps"], "6");
    assert_eq!(png.text["guidance"], "4");
    assert_eq!(png.text["cfg_normalization"], "1.3");
    assert_eq!(png.text["cfg_truncation"], "0.7");
    assert_eq!(png.text["size"], "96x64");
}

/// Without `--image`, `zimage edit` is ZImageOmniPipeline's text-to-image (no reference: the
/// prompt's own template, no vision stream), within one level of diffusers' golden; the PNG
/// records no references.
#[test]
fn an_edit_without_references_is_the_omni_text_to_image() {
    let c = golden_case("edit", "text_only");
    let args = case_args(&c);
    assert!(!args.iter().any(|a| a == "--image") && args.iter().any(|a| a == "--width"));
    let (summary, output) = edit_like_golden(&c, "text_only");
    assert_eq!(summary["reference_images"], serde_json::json!([]));
    let png = read_png(&output);
    assert_eq!(png.text["reference_images"], "[]");
    assert_eq!(png.text["size"], "96x64");
}

/// `--lora` reaches edits: two adapters with CFG equal diffusers' edit with them loaded, and
/// the PNG and the JSON summary record them (file, sha256, scale).
#[test]
fn an_edit_with_loras_matches_the_golden_and_records_them() {
    let c = golden_case("lora", "lora_two_cfg");
    assert_eq!(case_args(&c).iter().filter(|a| *a == "--lora").count(), 2);
    let (summary, output) = edit_like_golden(&c, "loras");
    let png = read_png(&output);
    let recorded: Value = serde_json::from_str(&png.text["loras"]).unwrap();
    assert_eq!(recorded, summary["loras"]);
    let files: Vec<&str> = recorded.as_array().unwrap().iter().map(|l| l["file"].as_str().unwrap()).collect();
    assert_eq!(files, ["peft.safetensors", "kohya.safetensors"]);
    let scales: Vec<f64> = recorded.as_array().unwrap().iter().map(|l| l["scale"].as_f64().unwrap()).collect();
    assert_eq!(scales, [0.7, 1.3]);
    let peft = root().join("tests/golden/tiny-zimage/loras/peft.safetensors");
    let sha: String = sha2::Sha256::digest(std::fs::read(peft).unwrap()).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(recorded[0]["sha256"], sha.as_str());
}

#[test]
fn bad_edits_fail_with_their_exit_codes_and_write_nothing() {
    let dir = scratch("bad");
    let output = dir.join("x.png");
    let o = output.display().to_string();
    let reference = format!("{GOLDEN}/inputs/ref_96x64.png");
    // A text-to-image package: invalid request (6), before anything is loaded.
    let out = zimage(["edit", "--model", "models/tiny-zimage", "--image", &reference, "--prompt", "x", "-o", &o]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("does not support editing"), "{}", stderr(&out));
    // Nine references: more than the package takes.
    let mut args = vec!["edit", "--model", PACKAGE, "--prompt", "x", "-o", &o];
    for _ in 0..9 {
        args.extend(["--image", &reference]);
    }
    let out = zimage(&args);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    // A reference the model's rules refuse (sides under 64): named with its file.
    let small = dir.join("small.png");
    std::fs::write(
        &small,
        zimage::image_io::encode_png(&zimage::RgbImage { width: 80, height: 48, pixels: vec![9; 80 * 48 * 3] }, &[])
            .unwrap(),
    )
    .unwrap();
    let out = zimage(["edit", "--model", PACKAGE, "--image", small.to_str().unwrap(), "--prompt", "x", "-o", &o]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let says = format!("{}: reference image 1 is 80x48: both sides must be at least 64 pixels", small.display());
    assert!(stderr(&out).contains(&says), "{}", stderr(&out));
    std::fs::remove_file(&small).unwrap();
    // A missing reference file.
    let out = zimage(["edit", "--model", PACKAGE, "--image", "no/such.png", "--prompt", "x", "-o", &o]);
    assert_ne!(out.status.code(), Some(0));
    // --width without --height: a usage error (without --image too, where it would be the
    // text-to-image size).
    let out = zimage(["edit", "--model", PACKAGE, "--prompt", "x", "--width", "64", "-o", &o]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // -o and --save-latents naming one file (the latents were renamed over the PNG), an output
    // that would be a PNG named .jpg, and an enhancer option without --enhance: usage errors.
    let jpg = dir.join("x.gif").display().to_string();
    for (extra, message) in [
        (&["-o", &o, "--save-latents", &o][..], "name the same file"),
        (&["-o", &jpg], "writes PNG, JPEG (.jpg) or WebP"),
        (&["-o", &o, "--thinking"], "--enhance"),
    ] {
        let mut args = vec!["edit", "--model", PACKAGE, "--image", &reference, "--prompt", "x", "--steps", "1"];
        args.extend(extra);
        let out = zimage(&args);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(message), "{extra:?}: {}", stderr(&out));
    }
    assert!(std::fs::read_dir(&dir).unwrap().next().is_none(), "nothing may be written");

    // A bad request is refused before the model loads: a copy of the package whose graphs are
    // missing (a load would be a package error, 3) gives the request's error (6).
    let unloadable = scratch("unloadable");
    std::fs::copy(root().join(PACKAGE).join("manifest.json"), unloadable.join("manifest.json")).unwrap();
    let package = unloadable.display().to_string();
    for (extra, message) in [
        (&["--count", "0"][..], "count must be 1..=64"),
        (&["--steps", "0"], "steps must be 1..="),
        (&["--width", "17", "--height", "16"], "width 17 must be a positive multiple of 16"),
    ] {
        let mut args = vec!["edit", "--model", &package, "--image", &reference, "--prompt", "x", "-o", &o];
        args.extend(extra);
        let out = zimage(&args);
        assert_eq!(out.status.code(), Some(6), "{extra:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(message), "{extra:?}: {}", stderr(&out));
    }
}

/// An editing package quantized with its Omni transformer (`models/tiny-zimage-omni-int8`):
/// `zimage edit` records the weights in the JSON summary and the PNG, as `zimage generate` does
/// for text-to-image (sdk/tests/quantized.rs holds the edits to their distances from fp32).
#[test]
fn an_edit_on_a_quantized_package_records_its_weights() {
    let dir = scratch("quantized");
    let output = dir.join("edit.png");
    let reference = format!("{GOLDEN}/inputs/ref_96x64.png");
    let o = output.display().to_string();
    let out = zimage([
        "edit",
        "--model",
        "models/tiny-zimage-omni-int8",
        "--image",
        &reference,
        "--prompt",
        "x",
        "--steps",
        "2",
        "--guidance",
        "0",
        "--seed",
        "1",
        "-o",
        &o,
        "--json",
        "--progress",
        "none",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["precision"], "fp32");
    assert_eq!(summary["quantization"]["weights"], "int8");
    assert_eq!(summary["quantization"]["method"], "rtn");
    assert!(summary["quantization"]["activations"].is_null());
    assert_eq!(read_png(&output).text["quantization"], "int8 rtn, block 32");
    // A float package's edit says so.
    let float = zimage([
        "edit",
        "--model",
        PACKAGE,
        "--image",
        &reference,
        "--prompt",
        "x",
        "--steps",
        "1",
        "--guidance",
        "0",
        "-o",
        &o,
        "--json",
        "--progress",
        "none",
    ]);
    assert_eq!(float.status.code(), Some(0), "{}", stderr(&float));
    let summary: Value = serde_json::from_slice(&float.stdout).unwrap();
    assert!(summary["quantization"].is_null() && summary["precision"] == "fp32");
    assert!(!read_png(&output).text.contains_key("quantization"));
}

/// `zimage edit --previews 1`: one preview beside the output at the middle step, listed in the
/// summary; the edit itself is still the golden's.
#[test]
fn edit_previews_are_written_beside_the_output() {
    let c = golden_case("edit", "two_refs_cfg");
    let dir = scratch("edit-previews");
    let (output, latents) = (dir.join("edit.png"), dir.join("latents.npy"));
    let mut args = case_args(&c);
    args.extend(["-o".into(), output.display().to_string(), "--save-latents".into(), latents.display().to_string()]);
    args.extend(["--json".into(), "--previews".into(), "1".into()]);
    let out = zimage(args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    check_against_golden(&c, &output, &latents);
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    // 6 steps, one preview: after step 3.
    let preview = dir.join("edit.step3.png");
    assert_eq!(summary["previews"], serde_json::json!([preview.display().to_string()]));
    let (preview, result) = (read_png(&preview), read_png(&output));
    assert_eq!((preview.width, preview.height), (96, 64));
    assert_ne!(preview.rgb, result.rgb);
}

/// `-o` and `--save-latents` naming folders put `zimage-edit.png` and `latents.npy` in them, as
/// `zimage generate` does; the edit is still the golden's.
#[test]
fn an_edit_into_a_folder_names_its_files() {
    let c = golden_case("edit", "two_refs_cfg");
    let dir = scratch("edit-into-folder");
    let mut args = case_args(&c);
    let folder = format!("{}{}", dir.display(), std::path::MAIN_SEPARATOR);
    args.extend(["-o".into(), folder, "--save-latents".into(), dir.display().to_string()]);
    args.extend(["--json".into(), "--progress".into(), "none".into()]);
    let out = zimage(args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let (output, latents) = (dir.join("zimage-edit.png"), dir.join("latents.npy"));
    check_against_golden(&c, &output, &latents);
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["files"], serde_json::json!([output.display().to_string()]));
    assert_eq!(summary["latents_file"], latents.display().to_string());
}

/// An instruction longer than --max-sequence-length is cut, with the warning `zimage generate`
/// gives for prompts (its segment's tokens: full and kept).
#[test]
fn a_cut_instruction_is_warned_about() {
    let dir = scratch("edit-cut");
    let output = dir.join("cut.png");
    let image = format!("{GOLDEN}/inputs/ref_96x64.png");
    let edit = |prompt: &str, max_sequence_length: &str| {
        let out = zimage([
            "edit",
            "--model",
            PACKAGE,
            "--image",
            &image,
            "--prompt",
            prompt,
            "--steps",
            "1",
            "--guidance",
            "0",
            "--max-sequence-length",
            max_sequence_length,
            "-o",
            output.to_str().unwrap(),
            "--progress",
            "none",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        stderr(&out)
    };
    let err = edit(&"a red fox in the snow ".repeat(20), "16");
    assert!(err.contains("warning: the instruction has") && err.contains("only the first 16 are used"), "{err}");
    let err = edit("a fox", "512");
    assert!(!err.contains("warning"), "{err}");
}
