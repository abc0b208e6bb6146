//! Editing (Omni) against diffusers' ZImageOmniPipeline and transformers' Siglip2ImageProcessor
//! on the committed tiny Omni package (tests/golden/tiny-zimage-omni, docs/goldens.md): the
//! SigLIP2 pixel inputs within 1e-6, the vision tokens, whole edits (final latents within
//! 1e-4, images within 1 level), edits with LoRA adapters, and the typed errors of bad edit
//! requests.

mod common;

use common::*;
use serde_json::Value;
use zimage::{EditRequest, ErrorKind, RgbImage};

const PACKAGE: &str = "tiny-zimage-omni";

fn cases() -> Value {
    json(&golden(&format!("{PACKAGE}/cases.json")))
}

fn file(rel: &Value) -> std::path::PathBuf {
    golden(PACKAGE).join(rel.as_str().unwrap())
}

#[test]
fn siglip_inputs_equal_transformers_processor() {
    let rows = cases()["siglip_processor"].as_array().unwrap().clone();
    assert!(rows.len() >= 14, "expected every picture with two settings, found {}", rows.len());
    for row in rows {
        let name = format!("{} ({})", row["image_file"], row["settings"]);
        let diff = siglip_row_diff(&row, &golden(PACKAGE)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(diff <= 1e-6, "{name}: pixel values differ by {diff}");
    }
}

#[test]
fn vision_tokens_match_transformers() {
    let pipeline = pipeline(PACKAGE);
    for row in cases()["siglip_features"].as_array().unwrap() {
        let image = png_rgb(&file(&row["image_file"]));
        let got = pipeline.vision_tokens(&image).unwrap();
        let want = npy_f32(&file(&row["features_file"]));
        assert_eq!(got.shape(), want.shape(), "{}", row["image_file"]);
        let err = rel_l2(got.as_slice().unwrap(), want.as_slice().unwrap());
        assert!(err <= tolerances().2, "{}: vision tokens rel err {err}", row["image_file"]);
    }
}

fn edit_request(case: &Value) -> EditRequest {
    golden_edit_request(case, &golden(PACKAGE))
}

#[test]
fn edits_match_diffusers() {
    let pipeline = pipeline(PACKAGE);
    let all = cases();
    let list = all["edit"].as_array().unwrap();
    assert!(list.len() >= 6);
    // Two images from one noise draw, with guidance (the batch shares the references).
    assert!(list.iter().any(|c| c["num_images_per_prompt"] == 2 && c["guidance_scale"].as_f64() > Some(0.0)));
    for case in list {
        let name = case["name"].as_str().unwrap();
        let request = edit_request(case);
        if name == "defaults" {
            // The package's defaults are the pipeline's: edit_request leaves them unset.
            assert_eq!(case["num_inference_steps"], 50);
            assert_eq!(case["guidance_scale"], 5.0);
            assert_eq!((request.steps, request.guidance_scale, request.cfg_truncation), (None, None, None));
        }
        let result = pipeline.edit(&request, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        check_edit(name, &result, case);
    }
}

fn picture(width: u32, height: u32) -> RgbImage {
    let pixels = (0..width * height * 3).map(|i| (i * 7 % 251) as u8).collect();
    RgbImage { width, height, pixels }
}

fn edit_error(package: &str, request: &EditRequest) -> zimage::Error {
    match pipeline(package).edit(request, None) {
        Ok(_) => panic!("the edit should have been refused"),
        Err(e) => e,
    }
}

#[test]
fn bad_edit_requests_are_typed_errors() {
    let mut r = EditRequest::new("x", vec![picture(64, 64); 9]);
    r.steps = Some(1);
    let e = edit_error(PACKAGE, &r);
    assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
    assert!(e.to_string().contains("at most 8"), "{e}");

    // No reference is Omni-mode text-to-image (edits_match_diffusers' text_only cases): both
    // sides or neither, a multiple of 16 (neither: diffusers' 1024x1024).
    r.images = vec![];
    r.width = Some(64);
    assert_eq!(edit_error(PACKAGE, &r).kind(), ErrorKind::InvalidRequest);
    r.height = Some(72);
    let e = edit_error(PACKAGE, &r);
    assert!(e.to_string().contains("height 72 must be a positive multiple of 16"), "{e}");
    (r.width, r.height) = (None, None);
    let default_size = pipeline(PACKAGE).edit(&r, None).unwrap();
    assert_eq!((default_size.images[0].width, default_size.images[0].height), (1024, 1024));

    r.images = vec![RgbImage { width: 0, height: 0, pixels: vec![] }];
    assert_eq!(edit_error(PACKAGE, &r).kind(), ErrorKind::Image);

    // 16384 x 4097 is past 64 megapixels: refused from its size alone (no pixel buffer).
    r.images = vec![RgbImage { width: 16384, height: 4097, pixels: vec![] }];
    let e = edit_error(PACKAGE, &r);
    assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
    assert!(e.to_string().contains("pixels"), "{e}");

    r.images = vec![picture(63, 80)];
    let e = edit_error(PACKAGE, &r);
    assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
    assert!(e.to_string().contains("at least 64"), "{e}");

    r.images = vec![picture(64, 600)];
    assert_eq!(edit_error(PACKAGE, &r).kind(), ErrorKind::InvalidRequest);

    // A requested size scales a reference past 1 MP to its area: 16x16 leaves 2400x480 no
    // 16x16 block, and the refusal names the reference, its own size and what it became.
    r.images = vec![picture(64, 64), picture(2400, 480)];
    (r.width, r.height) = (Some(16), Some(16));
    let e = edit_error(PACKAGE, &r);
    assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
    let want = "reference image 2 is 2400x480 once scaled to 35x7 (to the area of 16x16): no 16x16 block to keep";
    assert!(e.to_string().contains(want), "{e}");
    (r.width, r.height) = (None, None);
    // Without a size, the output is the last reference as the model prepares it: scaled to
    // about 1 MP (2289x457) and cropped to 2288x448; edit_output_size says so beforehand.
    let dir = repo().join("models").join(PACKAGE);
    let manifest = zimage::Manifest::read(&dir).unwrap();
    assert_eq!(zimage::pipeline::edit::edit_output_size(&manifest, &dir, (2400, 480), 2).unwrap(), (2288, 448));
    assert_eq!(zimage::pipeline::edit::edit_output_size(&manifest, &dir, (96, 70), 1).unwrap(), (96, 64));

    // An instruction past the RoPE table (1024 caption positions in this package).
    r.images = vec![picture(64, 64)];
    r.prompt = "word ".repeat(1100);
    r.max_sequence_length = Some(4096);
    let e = edit_error(PACKAGE, &r);
    assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
    assert!(e.to_string().contains("the prompt and its 1 reference(s) need caption position"), "{e}");
    // check_edit does not tokenize; check_edit_prompts gives edit's refusal.
    pipeline(PACKAGE).check_edit(&r).unwrap();
    assert_eq!(pipeline(PACKAGE).check_edit_prompts(&r).unwrap_err().to_string(), e.to_string());
    // The negative prompt's segments too, under guidance only (a scale above 0, as diffusers).
    r.negative_prompt = Some(std::mem::replace(&mut r.prompt, "x".into()));
    r.guidance_scale = Some(0.0);
    pipeline(PACKAGE).check_edit_prompts(&r).unwrap();
    r.guidance_scale = Some(2.0);
    let e = pipeline(PACKAGE).check_edit_prompts(&r).unwrap_err();
    assert!(e.to_string().contains("the negative prompt and its 1 reference(s) need caption position"), "{e}");
    assert_eq!(edit_error(PACKAGE, &r).to_string(), e.to_string());
    (r.negative_prompt, r.guidance_scale) = (None, None);
    r.max_sequence_length = None;

    // 64 images of 2048x1024 are twice the pixels one request may have (refused before the
    // references are encoded).
    r.count = 64;
    (r.width, r.height) = (Some(2048), Some(1024));
    let e = edit_error(PACKAGE, &r);
    assert!(e.to_string().contains("64 images of 2048x1024 are 134217728 pixels"), "{e}");
    pipeline(PACKAGE).check_edit(&r).unwrap_err();
    (r.width, r.height) = (None, None);
    r.count = 1;

    // The guidance settings have generate's bounds (a negative cfg_truncation was taken).
    for truncation in [-2.0, -1e30, f32::NAN] {
        r.cfg_truncation = Some(truncation);
        let e = edit_error(PACKAGE, &r);
        assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
        assert!(e.to_string().contains("cfg_truncation"), "{e}");
    }
    r.cfg_truncation = None;

    r.width = Some(64);
    assert_eq!(edit_error(PACKAGE, &r).kind(), ErrorKind::InvalidRequest);
    r.height = Some(72);
    assert_eq!(edit_error(PACKAGE, &r).kind(), ErrorKind::InvalidRequest);

    // A text-to-image package cannot edit.
    let r = EditRequest::new("x", vec![picture(64, 64)]);
    let e = edit_error("tiny-zimage", &r);
    assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
    assert!(e.to_string().contains("does not support editing"), "{e}");
    assert!(!pipeline("tiny-zimage").manifest().supports("edit"));
    assert!(pipeline(PACKAGE).manifest().supports("edit") && pipeline(PACKAGE).manifest().supports("text_to_image"));
}

#[test]
fn an_enhanced_edit_is_the_edit_of_the_rewritten_instruction() {
    let pipeline = pipeline(PACKAGE);
    let mut options = zimage::LoadOptions::default();
    options.threads = Some(1);
    let enhancer = zimage::PromptEnhancer::load(repo().join("models/tiny-qwen3-enhancer"), &options).unwrap();
    let mut enhance = zimage::EnhanceOptions::default();
    enhance.max_new_tokens = 24;
    let mut request =
        EditRequest::new("make the sky pink", vec![png_rgb(&golden(&format!("{PACKAGE}/inputs/ref_96x64.png")))]);
    request.steps = Some(2);
    request.guidance_scale = Some(0.0);
    request.seed = Some(7);
    request.return_latents = true;
    let enhanced = pipeline.edit_enhanced(&enhancer, &enhance, &request, None).unwrap();
    let rewritten = enhanced.enhanced_prompt.clone().expect("the rewritten instruction is reported");
    let want = enhancer.enhance("make the sky pink", &enhance, None).unwrap();
    assert_eq!(rewritten, want.text);
    let mut direct = request.clone();
    direct.prompt = rewritten;
    let plain = pipeline.edit(&direct, None).unwrap();
    assert_eq!(enhanced.latents, plain.latents);
    assert_eq!(enhanced.images, plain.images);
    // A request the pipeline refuses is refused before the enhancer runs.
    request.images = vec![picture(64, 64); 9];
    assert_eq!(
        pipeline.edit_enhanced(&enhancer, &enhance, &request, None).unwrap_err().kind(),
        ErrorKind::InvalidRequest
    );
}

/// With max_sequence_length above the caption positions, a short instruction fits but the
/// enhancer's rewrite of "a cat" (1100 tokens: tiny-zimage-enhanced's decoder writes them all,
/// and they stay over a thousand when tokenized again) does not:
/// the refusal names the enhanced instruction and the enhancer's setting.
#[test]
fn an_enhanced_instruction_past_the_caption_positions_is_named() {
    let pipeline = pipeline(PACKAGE);
    let mut options = zimage::LoadOptions::default();
    options.threads = Some(1);
    let enhancer = zimage::PromptEnhancer::load(repo().join("models/tiny-zimage-enhanced"), &options).unwrap();
    let mut enhance = zimage::EnhanceOptions::default();
    enhance.max_new_tokens = 1100;
    let mut request = EditRequest::new("a cat", vec![png_rgb(&golden(&format!("{PACKAGE}/inputs/ref_96x64.png")))]);
    (request.steps, request.guidance_scale, request.max_sequence_length) = (Some(1), Some(0.0), Some(4096));
    let e = pipeline.edit_enhanced(&enhancer, &enhance, &request, None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
    let message = e.to_string();
    assert!(message.contains("the enhanced instruction and its 1 reference(s) need caption position"), "{message}");
    assert!(message.contains("up to 1100 new tokens"), "{message}");
}

/// A pipeline on the Omni package with `loras` set at load.
fn pipeline_with(package: &std::path::Path, loras: Vec<zimage::LoraSetting>) -> zimage::Pipeline {
    let mut options = zimage::LoadOptions::default();
    options.threads = Some(1);
    options.device = test_device();
    options.loras = loras;
    zimage::Pipeline::load(package, &options).unwrap()
}

/// `result` against a golden case's final latents and image; the latents' max abs difference.
fn check_edit(name: &str, result: &zimage::Generation, case: &Value) -> f32 {
    let want = npy_f32(&file(&case["latents_file"]));
    let got = result.latents.as_ref().unwrap();
    assert_eq!(got.shape(), want.shape(), "{name}");
    let diff = max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap());
    eprintln!("{name}: final latents max abs diff {diff:e}");
    assert!(diff <= tolerances().0, "{name}: final latents max abs diff {diff}");
    let files = case["output_files"].as_array().unwrap();
    assert_eq!(result.images.len(), files.len(), "{name}");
    for (image, path) in result.images.iter().zip(files) {
        let d = max_pixel_diff(image, &png_rgb(&file(path)));
        assert!(d <= tolerances().1, "{name}: {path} differs by {d} levels");
    }
    diff
}

/// LoRAs reach edits: the Omni graph reads the transformer's weights from transformer.onnx
/// (export.py's last step), so the merged weights are re-addressed to it. The first case with
/// the set given at load, the second through `set_loras`; each equals diffusers' edit with the
/// adapters loaded, which differs from the edit without them; removing the set gives back the
/// plain edit's golden.
#[test]
fn edits_with_loras_match_diffusers() {
    let all = cases();
    let lora_cases = all["lora"].as_array().expect("the lora section");
    assert_eq!(lora_cases.len(), 4);
    let package = repo().join("models").join(PACKAGE);
    let manifest = json(&package.join("manifest.json"));
    assert!(manifest["edit"]["transformer_weights"]["shared_bytes"].as_u64().unwrap() > 1_000_000);

    let first = &lora_cases[0];
    let with_lora = pipeline_with(&package, golden_loras(first, &golden(PACKAGE)));
    let result = with_lora.edit(&edit_request(first), None).unwrap();
    check_edit("lora_peft", &result, first);
    let plain = pipeline(PACKAGE).edit(&edit_request(first), None).unwrap();
    let changed = max_abs_diff(
        plain.latents.as_ref().unwrap().as_slice().unwrap(),
        result.latents.as_ref().unwrap().as_slice().unwrap(),
    );
    eprintln!("lora_peft: the LoRA moved the final latents by {changed}");
    assert!(changed > 100.0 * tolerances().0, "the LoRA changed the edit by only {changed}");

    with_lora.set_loras(&golden_loras(&lora_cases[1], &golden(PACKAGE))).unwrap();
    assert_eq!(with_lora.loras().len(), 2);
    check_edit("lora_two_cfg", &with_lora.edit(&edit_request(&lora_cases[1]), None).unwrap(), &lora_cases[1]);

    with_lora.set_loras(&[]).unwrap();
    let one_ref = &all["edit"][0];
    assert_eq!(one_ref["name"], "one_ref");
    check_edit("one_ref after removing the LoRAs", &with_lora.edit(&edit_request(one_ref), None).unwrap(), one_ref);
}

/// An adapter on the modules only the Omni transformer has (its SigLIP embedder and refiner,
/// named through `edit.omni_parameters`), as diffusers' loader applies it: alone and beside a
/// text-to-image adapter, edits equal diffusers' (and differ from the plain edit); text-to-image
/// never runs those modules, so it is unchanged by them, as in diffusers; and a package without
/// an Omni transformer refuses the adapter by key.
#[test]
fn loras_on_omni_only_modules_match_diffusers() {
    let all = cases();
    let find = |name: &str| all["lora"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone();
    let (alone, mixed) = (find("lora_siglip"), find("lora_siglip_mixed"));
    let package = repo().join("models").join(PACKAGE);
    let loras = golden_loras(&alone, &golden(PACKAGE));
    assert!(loras[0].adapter.modules().all(|m| m.starts_with("siglip_")), "an adapter on the Omni-only modules");
    let with_lora = pipeline_with(&package, loras);
    let result = with_lora.edit(&edit_request(&alone), None).unwrap();
    check_edit("lora_siglip", &result, &alone);
    let plain = pipeline(PACKAGE).edit(&edit_request(&alone), None).unwrap();
    let changed = max_abs_diff(
        plain.latents.as_ref().unwrap().as_slice().unwrap(),
        result.latents.as_ref().unwrap().as_slice().unwrap(),
    );
    eprintln!("lora_siglip: the adapter moved the final latents by {changed}");
    assert!(changed > 100.0 * tolerances().0, "the Omni-only adapter changed the edit by only {changed}");

    let mut generate = with_lora.request("a lighthouse");
    (generate.width, generate.height, generate.steps, generate.seed) = (64, 64, 2, Some(3));
    let with_adapter = with_lora.generate(&generate, None).unwrap();
    with_lora.set_loras(&[]).unwrap();
    let without = with_lora.generate(&generate, None).unwrap();
    assert_eq!(with_adapter.latents, without.latents, "text-to-image does not run the SigLIP modules");

    with_lora.set_loras(&golden_loras(&mixed, &golden(PACKAGE))).unwrap();
    check_edit("lora_siglip_mixed", &with_lora.edit(&edit_request(&mixed), None).unwrap(), &mixed);

    let adapter =
        std::sync::Arc::new(zimage::LoraAdapter::load(golden(PACKAGE).join("loras/siglip.safetensors")).unwrap());
    let e = pipeline("tiny-zimage").check_lora(&adapter).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Lora, "{e}");
    assert!(e.to_string().contains("no Linear weight siglip_"), "{e}");
}

/// A package whose Omni graph keeps its own copy of the weights (exported before they were
/// shared: no `edit.transformer_weights`) takes LoRAs for text-to-image, but an edit with them
/// is refused, not run silently without them; and an Omni graph recorded for another
/// transformer.onnx is a package error at load.
#[test]
fn loras_that_cannot_reach_an_edit_are_refused() {
    let package = repo().join("models").join(PACKAGE);
    let own_copy = edited_copy(&package, "omni-own-weights", |m, _| {
        m["edit"].as_object_mut().unwrap().remove("transformer_weights");
    });
    let adapter = zimage::LoraAdapter::load(golden("tiny-zimage/loras/peft.safetensors")).unwrap();
    let loras = vec![zimage::LoraSetting::new(std::sync::Arc::new(adapter), 1.0)];
    let pipeline = pipeline_with(&own_copy, loras.clone());
    let mut request = EditRequest::new("x", vec![picture(64, 64)]);
    request.steps = Some(1);
    let e = pipeline.edit(&request, None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
    assert!(e.to_string().contains("re-export it with export.py"), "{e}");
    let mut generate = pipeline.request("x");
    (generate.width, generate.height, generate.steps) = (64, 64, 1);
    pipeline.generate(&generate, None).unwrap();
    pipeline.set_loras(&[]).unwrap();
    pipeline.edit(&request, None).unwrap();

    let moved = edited_copy(&package, "omni-other-transformer", |m, _| {
        m["edit"]["transformer_weights"]["sha256"] = Value::String("0".repeat(64));
    });
    let e = zimage::Pipeline::load(&moved, &zimage::LoadOptions::default()).err().expect("refused");
    assert_eq!(e.kind(), ErrorKind::Package, "{e}");
    assert!(e.to_string().contains("another transformer.onnx"), "{e}");
    for dir in [own_copy, moved] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// The editing graphs' sessions are made by the first edit: a pipeline on an editing package
/// that only generates never holds the second transformer; later edits reuse them, and a LoRA
/// switch makes the Omni transformer's again (with the set merged).
#[test]
fn editing_sessions_are_made_by_the_first_edit() {
    use zimage::runtime::session_count::sessions_created;
    let dir = copy_package(&repo().join("models").join(PACKAGE), "omni-deferred");
    let (omni, siglip) = (dir.join("transformer_omni.onnx"), dir.join("siglip.onnx"));
    let pipeline = pipeline_with(&dir, Vec::new());
    let mut generate = pipeline.request("a lighthouse");
    (generate.width, generate.height, generate.steps) = (64, 64, 1);
    pipeline.generate(&generate, None).unwrap();
    assert_eq!((sessions_created(&omni), sessions_created(&siglip)), (0, 0));
    let mut request = EditRequest::new("make it night", vec![picture(64, 64)]);
    request.steps = Some(1);
    pipeline.edit(&request, None).unwrap();
    pipeline.edit(&request, None).unwrap();
    assert_eq!((sessions_created(&omni), sessions_created(&siglip)), (1, 1));
    let adapter = zimage::LoraAdapter::load(golden("tiny-zimage/loras/peft.safetensors")).unwrap();
    pipeline.set_loras(&[zimage::LoraSetting::new(std::sync::Arc::new(adapter), 0.5)]).unwrap();
    assert_eq!(sessions_created(&omni), 1, "made again by the next edit, not by set_loras");
    pipeline.edit(&request, None).unwrap();
    assert_eq!((sessions_created(&omni), sessions_created(&siglip)), (2, 1));
    drop(pipeline);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A PNG file's first bytes: the signature, an IHDR chunk declaring `width` x `height` (8-bit
/// RGB) and an empty IDAT chunk (where a decoder stops reading the header): no pixel data.
fn png_header(width: u32, height: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
            }
        }
        !crc
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    for chunk in [ihdr, b"IDAT".to_vec()] {
        bytes.extend((chunk.len() as u32 - 4).to_be_bytes());
        bytes.extend(&chunk);
        bytes.extend(crc32(&chunk).to_be_bytes());
    }
    bytes
}

#[test]
fn reference_files_are_refused_by_size_before_decoding() {
    use zimage::pipeline::edit::decode_reference;
    let dir = repo().join("models").join(PACKAGE);
    let manifest = zimage::Manifest::read(&dir).unwrap();
    // Header-only files: a size the rules refuse is an InvalidRequest (from the header: a
    // decode would fail on the missing pixels with an Image error, or cost 16384 x 16384).
    for (w, h, says) in [(16384, 16384, "pixels"), (63, 80, "at least 64"), (64, 600, "aspect ratio")] {
        let e = decode_reference(&manifest, &dir, &png_header(w, h), 2).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{w}x{h}: {e}");
        assert!(e.to_string().contains("reference image 2") && e.to_string().contains(says), "{e}");
    }
    // A size the rules take goes on to the decoder, which finds no pixels.
    let e = decode_reference(&manifest, &dir, &png_header(64, 64), 1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Image, "{e}");
    assert!(e.to_string().contains("reference image 1: "), "{e}");
    // So does a file that is no picture at all, named by its place.
    let e = decode_reference(&manifest, &dir, b"not a picture", 3).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Image, "{e}");
    assert!(e.to_string().starts_with("image: reference image 3: "), "{e}");
    // A real picture decodes to its pixels.
    let image = picture(64, 80);
    let png = zimage::image_io::encode_png(&image, &[]).unwrap();
    assert_eq!(decode_reference(&manifest, &dir, &png, 1).unwrap(), image);
    // A package that does not edit says so first.
    let plain = repo().join("models/tiny-zimage");
    let e = decode_reference(&zimage::Manifest::read(&plain).unwrap(), &plain, &png, 1).unwrap_err();
    assert!(e.to_string().contains("does not support editing"), "{e}");
}

/// Reference rules no picture could meet are refused at load, not at every request: a minimum
/// side above the largest input, a crop multiple the latents cannot be made of.
#[test]
fn reference_rules_no_picture_could_meet_are_package_errors() {
    let cases: [(&str, serde_json::Value, &str); 4] = [
        ("min_side", 1_000_000_000u64.into(), "above the largest input side, 16384"),
        ("multiple", 7.into(), "edit.reference.multiple 7 must be a multiple of 16"),
        ("multiple", 24.into(), "edit.reference.multiple 24 must be a multiple of 16"),
        ("multiple", 8.into(), "edit.reference.multiple 8 must be a multiple of 16"),
    ];
    for (i, (key, value, says)) in cases.into_iter().enumerate() {
        let dir = edited_copy(&repo().join("models").join(PACKAGE), &format!("edit-reference-{i}"), |m, _| {
            m["edit"]["reference"][key] = value.clone();
        });
        let e = zimage::Pipeline::load(&dir, &zimage::LoadOptions::default()).err().expect("bad rules load");
        assert_eq!(e.kind(), ErrorKind::Package, "{key} {value}: {e}");
        assert!(e.to_string().contains(says), "{key} {value}: {e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // A multiple of 16 other than 16 is a legitimate rule.
    let dir = edited_copy(&repo().join("models").join(PACKAGE), "edit-reference-32", |m, _| {
        m["edit"]["reference"]["multiple"] = 32.into();
    });
    zimage::Pipeline::load(&dir, &zimage::LoadOptions::default()).expect("multiple 32 loads");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The package's edit defaults meet the bounds a request meets: refused at load (a package
/// cannot recommend what it would refuse), not at every request.
#[test]
fn edit_defaults_out_of_bounds_are_package_errors() {
    let cases: [(&str, serde_json::Value, &str); 4] = [
        ("num_inference_steps", 1_000_000_000u64.into(), "num_inference_steps"),
        ("guidance_scale", (-1.0).into(), "guidance_scale"),
        ("cfg_truncation", (-1.0).into(), "cfg_truncation"),
        ("guidance_scale", 1e9.into(), "guidance_scale"),
    ];
    for (i, (key, value, says)) in cases.into_iter().enumerate() {
        let dir = edited_copy(&repo().join("models").join(PACKAGE), &format!("edit-defaults-{i}"), |m, _| {
            m["edit"]["defaults"][key] = value.clone();
        });
        let e = zimage::Pipeline::load(&dir, &zimage::LoadOptions::default()).err().expect("a bad default loads");
        assert_eq!(e.kind(), ErrorKind::Package, "{key} {value}: {e}");
        assert!(e.to_string().contains("edit.defaults") && e.to_string().contains(says), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The instruction is held to `MAX_PROMPT_BYTES` without the package's markup (as a
/// generation's prompt is without its chat template): a prompt of exactly the limit is
/// tokenized, one byte more is refused naming its own size. Markup longer than any chat
/// template is a package error.
#[test]
fn the_instruction_byte_limit_is_the_prompts() {
    let p = pipeline(PACKAGE);
    let mut r = EditRequest::new("ab".repeat(zimage::MAX_PROMPT_BYTES / 2), vec![picture(64, 64)]);
    p.check_edit_prompts(&r).expect("an instruction of exactly the limit");
    r.prompt.push('!');
    let e = p.check_edit_prompts(&r).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
    assert!(e.to_string().contains("the prompt is 1048577 bytes"), "{e}");

    let dir = edited_copy(&repo().join("models").join(PACKAGE), "edit-markup", |m, _| {
        m["edit"]["prompt_segments"]["between"] = "x".repeat(65537).into();
    });
    let e = zimage::Pipeline::load(&dir, &zimage::LoadOptions::default()).err().expect("huge markup loads");
    assert_eq!(e.kind(), ErrorKind::Package, "{e}");
    assert!(e.to_string().contains("edit.prompt_segments.between is 65537 bytes"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SigLIP processor settings whose output per reference would be huge are refused at load:
/// patch size 1024 with 65536 patches (each within its own bound) asked 824 GB of the first
/// edit, which aborted the process.
#[test]
fn siglip_settings_that_need_huge_buffers_are_package_errors() {
    let dir = edited_copy(&repo().join("models").join(PACKAGE), "edit-siglip-huge", |m, _| {
        m["edit"]["image_processor"]["patch_size"] = 1024.into();
        m["edit"]["siglip"]["patch_size"] = 1024.into();
        m["edit"]["image_processor"]["max_num_patches"] = 65536.into();
    });
    let e = zimage::Pipeline::load(&dir, &zimage::LoadOptions::default()).err().expect("huge settings load");
    assert_eq!(e.kind(), ErrorKind::Package, "{e}");
    assert!(e.to_string().contains("max_num_patches x patch_size^2 x 3 is 206158430208 values"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
