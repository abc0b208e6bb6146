//! ControlNet: parity with diffusers' ZImageControlNetPipeline and
//! ZImageControlNetInpaintPipeline on the tiny ControlNets of every variant
//! (tests/golden/controlnet), the package without the add-on left as it was, and bad input.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;
use zimage::{ControlCondition, ErrorKind, GenerateRequest, InitImage, LoadOptions, LoraSetting, Pipeline};

fn cases() -> Value {
    json(&golden("controlnet/cases.json"))
}

fn file(rel: &Value) -> PathBuf {
    golden("controlnet").join(rel.as_str().unwrap())
}

fn load(package: &Path) -> Pipeline {
    let mut options = LoadOptions::default();
    options.threads = Some(1);
    options.device = test_device();
    Pipeline::load(package, &options).expect("load package")
}

fn request_from(case: &Value) -> GenerateRequest {
    golden_control_request(case, &golden("controlnet"))
}

/// The case's LoRA set (cases of kind "lora"), its files relative to tests/golden/controlnet.
fn lora_settings(case: &Value) -> Vec<LoraSetting> {
    golden_loras(case, &golden("controlnet"))
}

/// Final latents within 1e-4 of diffusers', images within 1 level.
fn check_result(label: &str, result: &zimage::Generation, case: &Value) {
    let want = npy_f32(&file(&case["latents_file"]));
    let got = result.latents.as_ref().unwrap();
    assert_eq!(got.shape(), want.shape(), "{label}");
    let diff = max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap());
    assert!(diff <= tolerances().0, "{label}: final latents max abs diff {diff}");
    eprintln!("{label}: final latents max abs diff {diff:e}");
    let images = case["image_files"].as_array().unwrap();
    assert_eq!(result.images.len(), images.len(), "{label}");
    for (got, path) in result.images.iter().zip(images) {
        let d = max_pixel_diff(got, &png_rgb(&file(path)));
        assert!(d <= tolerances().1, "{label}: image differs by {d} levels");
    }
}

/// Every case of every ControlNet, on a pipeline that attaches it with `set_controlnet` (and,
/// for "lora" cases, then sets the case's LoRAs with `set_loras`).
fn check_kind(kind: &str) -> usize {
    let mut n = 0;
    for entry in cases().as_array().unwrap() {
        let list = entry[kind].as_array().unwrap();
        if list.is_empty() {
            continue;
        }
        let name = entry["controlnet"].as_str().unwrap();
        let pipeline = load(&repo().join(entry["package"].as_str().unwrap()));
        pipeline.set_controlnet(Some(name)).unwrap();
        assert_eq!(pipeline.controlnet().as_deref(), Some(name));
        for case in list {
            let label = format!("{name}/{kind}/{}", case["name"].as_str().unwrap());
            if case.get("loras").is_some() {
                pipeline.set_loras(&lora_settings(case)).unwrap_or_else(|e| panic!("{label}: {e}"));
                assert_eq!(pipeline.controlnet().as_deref(), Some(name), "{label}: set_loras kept the ControlNet");
            }
            let result = pipeline.generate(&request_from(case), None).unwrap_or_else(|e| panic!("{label}: {e}"));
            check_result(&label, &result, case);
            n += 1;
        }
    }
    n
}

#[test]
fn controlnet_text_to_image_matches_diffusers() {
    let n = check_kind("text_to_image");
    assert!(n >= 7, "expected the golden ControlNet cases, found {n}");
}

/// LoRAs with a ControlNet, as diffusers' ZImageControlNetPipeline with `load_lora_weights`:
/// set on a pipeline with the ControlNet attached (check_kind), and both given at load. The
/// LoRAs change noise-refiner layers that the ControlNet shares with the transformer.
#[test]
fn controlnet_with_loras_matches_diffusers() {
    let n = check_kind("lora");
    assert!(n >= 3, "expected the golden ControlNet + LoRA cases, found {n}");
    let entry = &cases()[1];
    let case = &entry["lora"][0];
    let mut options = LoadOptions::default();
    options.threads = Some(1);
    options.device = test_device();
    options.controlnet = Some(entry["controlnet"].as_str().unwrap().to_string());
    options.loras = lora_settings(case);
    let pipeline = Pipeline::load(repo().join(entry["package"].as_str().unwrap()), &options).unwrap();
    assert_eq!(pipeline.loras().len(), 2);
    let result = pipeline.generate(&request_from(case), None).unwrap();
    check_result("both at load", &result, case);
    // The LoRAs at load, the ControlNet attached after: the merged set is reused, not merged
    // again (an editing package's Omni transformer keeps reading the same merged tensors).
    // (a copy of the package: the count is per transformer file, and other tests merge too)
    options.controlnet = None;
    let copy = copy_package(&repo().join(entry["package"].as_str().unwrap()), "controlnet-after-loras");
    let attached_later = Pipeline::load(&copy, &options).unwrap();
    let transformer = copy.join("transformer.onnx");
    assert_eq!(zimage::lora::sets_merged(&transformer), 1);
    attached_later.set_controlnet(Some(entry["controlnet"].as_str().unwrap())).unwrap();
    assert_eq!(zimage::lora::sets_merged(&transformer), 1, "set_controlnet merged the LoRA set again");
    let later = attached_later.generate(&request_from(case), None).unwrap();
    check_result("ControlNet attached after the LoRAs", &later, case);
    attached_later.set_loras(&lora_settings(case)).unwrap();
    assert_eq!(zimage::lora::sets_merged(&transformer), 2, "set_loras merges its set");
    drop(attached_later);
    std::fs::remove_dir_all(copy).unwrap();
    // Without the LoRAs the same request is the plain ControlNet's: the LoRAs did change it.
    pipeline.set_loras(&[]).unwrap();
    let plain = pipeline.generate(&request_from(case), None).unwrap();
    let (a, b) = (plain.latents.unwrap(), result.latents.unwrap());
    let moved = max_abs_diff(a.as_slice().unwrap(), b.as_slice().unwrap());
    assert!(moved > 1e-2, "the LoRAs moved the latents by only {moved}");
}

#[test]
fn controlnet_inpainting_matches_diffusers() {
    let n = check_kind("inpaint");
    assert!(n >= 3, "expected the golden ControlNet inpainting cases, found {n}");
}

/// The scale matters (a test that the hints reach the prediction), and a pipeline with a
/// ControlNet attached gives the plain transformer's result for a request without control.
#[test]
fn scale_changes_the_result_and_no_condition_is_the_plain_model() {
    let entry = &cases()[0];
    let case = &entry["text_to_image"][0];
    let pipeline = load(&repo().join(entry["package"].as_str().unwrap()));
    let mut request = request_from(case);
    let mut plain_request = request.clone();
    plain_request.control = None;
    let plain = pipeline.generate(&plain_request, None).unwrap().latents.unwrap();
    pipeline.set_controlnet(Some(entry["controlnet"].as_str().unwrap())).unwrap();
    let neutral = pipeline.generate(&plain_request, None).unwrap().latents.unwrap();
    let d = max_abs_diff(plain.as_slice().unwrap(), neutral.as_slice().unwrap());
    assert!(d <= 1e-5, "attached ControlNet without a condition changed the result by {d}");
    let with = pipeline.generate(&request, None).unwrap().latents.unwrap();
    request.control.as_mut().unwrap().conditioning_scale = 0.0;
    let zero = pipeline.generate(&request, None).unwrap().latents.unwrap();
    let d = max_abs_diff(plain.as_slice().unwrap(), zero.as_slice().unwrap());
    assert!(d <= 1e-5, "scale 0 differs from the plain model by {d}");
    let d = max_abs_diff(with.as_slice().unwrap(), plain.as_slice().unwrap());
    assert!(d > 1e-2, "the ControlNet had no effect ({d})");
    pipeline.set_controlnet(None).unwrap();
    assert_eq!(pipeline.controlnet(), None);
    let again = pipeline.generate(&plain_request, None).unwrap().latents.unwrap();
    assert_eq!(again, plain, "detaching must give back the plain transformer");
}

/// The packages without the add-on are byte-identical to the control packages' base files,
/// carry no ControlNet, and their graphs never name the ControlNet's files.
#[test]
fn packages_without_the_add_on_are_unchanged() {
    for (base, control) in [("tiny-zimage", "tiny-zimage-control"), ("tiny-zimage-alt", "tiny-zimage-alt-control")] {
        let base_dir = repo().join("models").join(base);
        let control_dir = repo().join("models").join(control);
        let base_manifest: Value = json(&base_dir.join("manifest.json"));
        let mut control_manifest: Value = json(&control_dir.join("manifest.json"));
        assert!(base_manifest.get("controlnets").is_none(), "{base} must not carry a ControlNet");
        assert!(!control_manifest["controlnets"].as_object().unwrap().is_empty(), "{control}");
        control_manifest.as_object_mut().unwrap().remove("controlnets");
        assert_eq!(control_manifest, base_manifest, "{control} is {base} plus the controlnets section");
        let transformer = std::fs::read(base_dir.join("transformer.onnx")).unwrap();
        assert_eq!(transformer, std::fs::read(control_dir.join("transformer.onnx")).unwrap());
        let text = String::from_utf8_lossy(&transformer);
        assert!(!text.contains("control_context") && !text.contains("controlnet_"), "{base}'s transformer");
        let pipeline = load(&base_dir);
        assert!(pipeline.controlnets().is_empty());
        assert_eq!(pipeline.controlnet(), None);
        let err = pipeline.set_controlnet(Some("union-v1")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Package, "{err}");
    }
}

fn small_request(case: &Value) -> GenerateRequest {
    let mut r = request_from(case);
    r.steps = 1;
    r
}

#[test]
fn bad_control_input_is_a_typed_error() {
    let entry = &cases()[0];
    let case = &entry["text_to_image"][0];
    let pipeline = load(&repo().join(entry["package"].as_str().unwrap()));
    // No ControlNet attached yet.
    let err = pipeline.generate(&small_request(case), None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{err}");
    pipeline.set_controlnet(Some(entry["controlnet"].as_str().unwrap())).unwrap();
    // Non-finite, or beyond any useful strength (10^6 drew a picture, 3e38 overflowed).
    for scale in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 3e38, 1e6, -1e4, 100.5] {
        let mut r = small_request(case);
        r.control.as_mut().unwrap().conditioning_scale = scale;
        let err = pipeline.generate(&r, None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidRequest, "scale {scale}: {err}");
        assert!(err.to_string().contains("-100..=100"), "{err}");
    }
    // A control picture longer than any input may be on one side is refused before resizing.
    let mut r = small_request(case);
    r.control.as_mut().unwrap().image = zimage::RgbImage { width: 1, height: 20_000, pixels: vec![0; 60_000] };
    let err = pipeline.generate(&r, None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Image, "{err}");
    assert!(err.to_string().contains("control image is 1x20000"), "{err}");
    // A control image of another size is resized to the request's (Pillow's Lanczos), then
    // preprocessed: the same images as a map made at the size first.
    let mut r = small_request(case);
    r.width += 16;
    let photo = r.control.as_ref().unwrap().image.clone();
    let canny = zimage::ControlPreprocess::CANNY_DEFAULT;
    r.control.as_mut().unwrap().preprocess = canny;
    let direct = pipeline.generate(&r, None).unwrap();
    let map = canny.apply(&zimage::image_io::resize_rgb(&photo, r.width, r.height).unwrap()).unwrap();
    r.control.as_mut().unwrap().image = map;
    r.control.as_mut().unwrap().preprocess = zimage::ControlPreprocess::None;
    let made_first = pipeline.generate(&r, None).unwrap();
    assert_eq!((direct.images[0].width, direct.images[0].height), (r.width, r.height));
    assert_eq!(direct.images, made_first.images);
    // A broken pixel buffer.
    let mut r = small_request(case);
    r.control.as_mut().unwrap().image.pixels.pop();
    assert_eq!(pipeline.generate(&r, None).unwrap_err().kind(), ErrorKind::Image);
    // Init image and control together.
    let mut r = small_request(case);
    let image = r.control.as_ref().unwrap().image.clone();
    r.init_image = Some(InitImage::image_to_image(image.clone()));
    assert_eq!(pipeline.generate(&r, None).unwrap_err().kind(), ErrorKind::InvalidRequest);
    // Inpainting with a ControlNet of control_in_dim 16 (union-v1 cannot inpaint).
    let mut r = small_request(case);
    let mask =
        zimage::GrayImage { width: image.width, height: image.height, pixels: vec![255; image.pixels.len() / 3] };
    r.control = Some(ControlCondition::inpaint(image.clone(), image, mask));
    let err = pipeline.generate(&r, None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{err}");
    assert!(err.to_string().contains("cannot inpaint"), "{err}");
    // An unknown name keeps the attached ControlNet.
    assert_eq!(pipeline.set_controlnet(Some("nope")).unwrap_err().kind(), ErrorKind::Package);
    assert_eq!(pipeline.controlnet().as_deref(), Some(entry["controlnet"].as_str().unwrap()));
}

/// A ControlNet entry made for another transformer (another width, another file) is refused
/// when it is attached; the package still loads and runs without it.
#[test]
fn controlnet_for_another_transformer_is_refused() {
    let dir = std::env::temp_dir().join(format!("zimage-controlnet-mismatch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let a = repo().join("models/tiny-zimage-control");
    let b = repo().join("models/tiny-zimage-alt-control");
    for f in std::fs::read_dir(&a).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    // B's ControlNet (48 wide, made for B's transformer) listed in A's manifest.
    let b_manifest = json(&b.join("manifest.json"));
    let (b_name, b_entry) = b_manifest["controlnets"].as_object().unwrap().iter().next().unwrap();
    for f in ["graph"] {
        let entry = &b_entry[f];
        for rel in [entry["path"].as_str(), entry["external_data"]["path"].as_str()].into_iter().flatten() {
            std::fs::copy(b.join(rel), dir.join(rel)).unwrap();
        }
    }
    let mut manifest = json(&dir.join("manifest.json"));
    manifest["controlnets"][b_name] = b_entry.clone();
    // And one entry of A's own ControlNet claiming another width.
    let (a_name, a_entry) = {
        let obj = manifest["controlnets"].as_object().unwrap();
        let (k, v) = obj.iter().next().unwrap();
        (k.clone(), v.clone())
    };
    let mut wide = a_entry.clone();
    wide["dim"] = Value::from(a_entry["dim"].as_u64().unwrap() * 2);
    manifest["controlnets"]["wide"] = wide;
    std::fs::write(dir.join("manifest.json"), serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    let pipeline = load(&dir);
    for name in [b_name.as_str(), "wide"] {
        let err = pipeline.set_controlnet(Some(name)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Package, "{name}: {err}");
        assert!(err.to_string().contains("transformer"), "{name}: {err}");
        assert_eq!(pipeline.controlnet(), None);
    }
    pipeline.set_controlnet(Some(&a_name)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Canny control maps: edges where the picture has a step, nothing in flat regions; the
/// preprocess names parse and bad thresholds are refused.
#[test]
fn canny_marks_the_step_edge_only() {
    use zimage::ControlPreprocess;
    let (w, h) = (40u32, 24u32);
    let mut pixels = Vec::new();
    for _y in 0..h {
        for x in 0..w {
            let v = if x < 20 { 10 } else { 240 };
            pixels.extend([v, v, v]);
        }
    }
    let image = zimage::RgbImage { width: w, height: h, pixels };
    let map = ControlPreprocess::CANNY_DEFAULT.apply(&image).unwrap();
    assert_eq!((map.width, map.height), (w, h));
    let at = |x: u32, y: u32| map.pixels[((y * w + x) * 3) as usize];
    for y in 4..h - 4 {
        assert!((18..=21).any(|x| at(x, y) == 255), "row {y}: no edge at the step");
        for x in (0..14).chain(26..w) {
            assert_eq!(at(x, y), 0, "edge at ({x}, {y}) in a flat region");
        }
    }
    assert!(map.pixels.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2] && (p[0] == 0 || p[0] == 255)));
    assert_eq!("canny".parse::<ControlPreprocess>().unwrap(), ControlPreprocess::CANNY_DEFAULT);
    assert_eq!("none".parse::<ControlPreprocess>().unwrap(), ControlPreprocess::None);
    assert_eq!("canny:50:80".parse::<ControlPreprocess>().unwrap(), ControlPreprocess::Canny { low: 50.0, high: 80.0 });
    assert_eq!("canny:50:80".parse::<ControlPreprocess>().unwrap().name(), "canny:50:80");
    for bad in ["canny:80:50", "canny:nan:1", "canny:-1:5", "sobel", "canny:1"] {
        let err = bad.parse::<ControlPreprocess>().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{bad}");
    }
    // A low threshold of 0 is allowed (0 <= low <= high): it panicked inside imageproc.
    for (low, high) in [(0.0, 0.0), (0.0, 100.0), (-0.0, 200.0)] {
        let zero = ControlPreprocess::Canny { low, high }.apply(&image).unwrap();
        let tiny = zimage::control_preprocess::canny(&image, f32::MIN_POSITIVE, high.max(f32::MIN_POSITIVE)).unwrap();
        assert_eq!(zero, tiny, "low {low}, high {high}");
        assert!((18..=21).any(|x| zero.pixels[((8 * w + x) * 3) as usize] == 255), "low {low}: the step is an edge");
    }
    let mut broken = image.clone();
    broken.pixels.pop();
    assert_eq!(ControlPreprocess::CANNY_DEFAULT.apply(&broken).unwrap_err().kind(), ErrorKind::Image);
}
