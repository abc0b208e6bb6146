//! `zimage edit` end to end on the committed tiny Omni package: a golden edit (two references
//! of different sizes, CFG with normalization and truncation) within one level of diffusers,
//! the references' names and sha256 in the PNG parameters, the latents, and the exit codes of
//! bad edits (nothing written).

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

fn golden_case(name: &str) -> Value {
    let text = std::fs::read_to_string(root().join(GOLDEN).join("cases.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    cases["edit"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone()
}

#[test]
fn two_reference_edit_matches_the_golden_and_records_its_references() {
    let c = golden_case("two_refs_cfg");
    let dir = scratch("two_refs");
    let output = dir.join("edit.png");
    let latents = dir.join("latents.npy");
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
    ] {
        let value = match &c[key] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        args.extend([flag.into(), value]);
    }
    args.extend(["-o".into(), output.display().to_string(), "--save-latents".into(), latents.display().to_string()]);
    args.extend(["--json".into(), "--progress".into(), "none".into()]);
    let out = zimage(args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((summary["width"].as_u64(), summary["height"].as_u64()), (Some(96), Some(64)));

    let png = read_png(&output);
    let golden = read_png(&root().join(GOLDEN).join(c["output_files"][0].as_str().unwrap()));
    assert_eq!((png.width, png.height), (golden.width, golden.height));
    let diff = png.rgb.iter().zip(&golden.rgb).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(diff <= 1, "differs from diffusers by {diff} levels");

    let got = zimage::image_io::read_npy(&latents).unwrap();
    let want = zimage::image_io::read_npy(&root().join(GOLDEN).join(c["latents_file"].as_str().unwrap())).unwrap();
    assert_eq!(got.shape(), want.shape());
    let worst = common::max_abs_diff(got.iter(), want.iter());
    assert!(worst <= 1e-4 && got.iter().all(|v| v.is_finite()), "latents differ by {worst}");

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
    // A missing reference file.
    let out = zimage(["edit", "--model", PACKAGE, "--image", "no/such.png", "--prompt", "x", "-o", &o]);
    assert_ne!(out.status.code(), Some(0));
    // No --image at all: a usage error.
    let out = zimage(["edit", "--model", PACKAGE, "--prompt", "x", "-o", &o]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(std::fs::read_dir(&dir).unwrap().next().is_none(), "nothing may be written");
}
