//! LoRA: parity with diffusers' `load_lora_weights` / `set_adapters` on the tiny packages (the
//! adapter files and goldens in tests/golden/<package>/lora.json), switching on a loaded
//! pipeline, and bad adapter files.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use serde_json::Value;
use zimage::{ErrorKind, LoadOptions, LoraAdapter, LoraSetting, Pipeline};

fn lora_cases(package: &str) -> Value {
    json(&golden(&format!("{package}/lora.json")))
}

fn adapter(package: &str, file: &str) -> Arc<LoraAdapter> {
    let path = golden(package).join(file);
    Arc::new(LoraAdapter::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn settings(package: &str, case: &Value) -> Vec<LoraSetting> {
    golden_loras(case, &golden(package))
}

fn options() -> LoadOptions {
    let mut o = LoadOptions::default();
    o.threads = Some(1);
    o.device = test_device();
    o
}

/// Latents within 1e-4 (NaN fails) and images within 1 level of the golden files.
fn check(pipeline: &Pipeline, package: &str, case: &Value, latents_file: &str, image_files: &[Value]) {
    let name = case["name"].as_str().unwrap();
    let result = pipeline.generate(&golden_request(case), None).unwrap_or_else(|e| panic!("{package}/{name}: {e}"));
    let want = npy_f32(&golden(package).join(latents_file));
    let got = result.latents.as_ref().unwrap();
    assert_eq!(got.shape(), want.shape(), "{package}/{name}");
    assert!(got.iter().all(|v| !v.is_nan()), "{package}/{name}: NaN in the latents");
    let diff = max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap());
    assert!(!diff.is_nan() && diff <= tolerances().0, "{package}/{name}: final latents max abs diff {diff}");
    assert_eq!(result.images.len(), image_files.len());
    for (got, path) in result.images.iter().zip(image_files) {
        let want = png_rgb(&golden(package).join(path.as_str().unwrap()));
        let d = max_pixel_diff(got, &want);
        assert!(d <= tolerances().1, "{package}/{name}: image differs by {d} levels");
    }
}

fn golden_case(case: &Value) -> (String, Vec<Value>) {
    (case["latents_file"].as_str().unwrap().to_string(), case["image_files"].as_array().unwrap().clone())
}

/// The base golden (no LoRA) the LoRA cases start from: the package's `turbo` case.
fn base_case(package: &str) -> Value {
    let cases = json(&golden(&format!("{package}/cases.json")));
    cases["text_to_image"].as_array().unwrap().iter().find(|c| c["name"] == "turbo").unwrap().clone()
}

#[test]
fn loaded_with_loras_matches_diffusers() {
    let mut n = 0;
    for package in ["tiny-zimage", "tiny-zimage-alt"] {
        for case in lora_cases(package)["cases"].as_array().unwrap() {
            let mut o = options();
            o.loras = settings(package, case);
            let pipeline = Pipeline::load(repo().join("models").join(package), &o).unwrap();
            let (latents, images) = golden_case(case);
            check(&pipeline, package, case, &latents, &images);
            n += 1;
        }
    }
    assert!(n >= 7, "expected the LoRA golden cases, found {n}");
}

#[test]
fn switching_on_a_loaded_pipeline_matches_fresh_loads_and_goes_back_to_the_base() {
    let package = "tiny-zimage";
    let pipeline = Pipeline::load(repo().join("models").join(package), &options()).unwrap();
    let cases = lora_cases(package);
    for case in cases["cases"].as_array().unwrap() {
        pipeline.set_loras(&settings(package, case)).unwrap();
        assert_eq!(pipeline.loras().len(), case["loras"].as_array().unwrap().len());
        let (latents, images) = golden_case(case);
        check(&pipeline, package, case, &latents, &images);
    }
    // No adapters: exactly the base pipeline's output.
    pipeline.set_loras(&[]).unwrap();
    assert!(pipeline.loras().is_empty());
    let base = base_case(package);
    let switched_back = pipeline.generate(&golden_request(&base), None).unwrap();
    let fresh = common::pipeline(package).generate(&golden_request(&base), None).unwrap();
    assert_eq!(switched_back.latents, fresh.latents, "removing every LoRA must give the base weights back exactly");
    assert_eq!(switched_back.images[0].pixels, fresh.images[0].pixels);
    let (latents, images) = golden_case(&base);
    check(&pipeline, package, &base, &latents, &images);
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zimage-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A safetensors file of float32 tensors (name, shape, values), written by hand.
fn safetensors(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        let start = data.len();
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut text = serde_json::to_string(&header).unwrap().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&data);
    out
}

fn pair(module: &str, rank: usize, out: usize, inn: usize) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    vec![
        (format!("transformer.{module}.lora_A.weight"), vec![rank, inn], vec![0.01; rank * inn]),
        (format!("transformer.{module}.lora_B.weight"), vec![out, rank], vec![0.02; out * rank]),
    ]
}

fn file_of(tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Vec<u8> {
    let refs: Vec<(&str, Vec<usize>, Vec<f32>)> =
        tensors.iter().map(|(n, s, v)| (n.as_str(), s.clone(), v.clone())).collect();
    safetensors(&refs)
}

#[test]
fn bad_adapters_are_typed_errors_and_the_pipeline_stays_usable() {
    let package = "tiny-zimage";
    let pipeline = Pipeline::load(repo().join("models").join(package), &options()).unwrap();
    let peft = adapter(package, "loras/peft.safetensors");
    pipeline.set_loras(&[LoraSetting::new(Arc::clone(&peft), 1.0)]).unwrap();

    // Truncated file.
    let good = std::fs::read(golden(package).join("loras/kohya.safetensors")).unwrap();
    let truncated = temp_file("truncated.safetensors", &good[..good.len() / 2]);
    let e = LoraAdapter::load(&truncated).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Lora, "{e}");

    // What cannot be a LoRA is refused before it is read: a device that never ends (it was
    // read whole, until memory ran out), a folder, a FIFO (opening it blocked), a first 8 bytes
    // that are no safetensors header length.
    for path in [Path::new("/dev/zero"), truncated.parent().unwrap()] {
        let e = LoraAdapter::load(path).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Lora, "{e}");
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }
    let fifo = truncated.with_file_name("fifo.safetensors");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    assert!(LoraAdapter::load(&fifo).unwrap_err().to_string().contains("not a regular file"));
    for header in [0u64, 1, 100_000_001, u64::MAX] {
        let mut bytes = header.to_le_bytes().to_vec();
        bytes.extend(b"{}");
        let e = LoraAdapter::load(temp_file("header.safetensors", &bytes)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Lora, "{e}");
        assert!(e.to_string().contains(&format!("header of {header} bytes")), "{e}");
    }

    // A NaN in a weight: the key is named.
    let mut tensors = pair("layers.0.attention.to_q", 2, 64, 64);
    tensors[1].2[5] = f32::NAN;
    let e = LoraAdapter::load(temp_file("nan.safetensors", &file_of(tensors))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Lora);
    assert!(e.to_string().contains("transformer.layers.0.attention.to_q.lora_B.weight"), "{e}");

    // Rank mismatch between A and B: both shapes are named.
    let mut tensors = pair("layers.0.attention.to_q", 2, 64, 64);
    tensors[1] = (tensors[1].0.clone(), vec![64, 3], vec![0.0; 192]);
    let e = LoraAdapter::load(temp_file("rank.safetensors", &file_of(tensors))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Lora);
    assert!(e.to_string().contains("[2, 64]") && e.to_string().contains("[64, 3]"), "{e}");

    // A LoRA for another model: the alt package's adapter (other widths) on this one names the
    // first bad key and both shapes; an unknown module is refused too.
    let other = adapter("tiny-zimage-alt", "loras/peft.safetensors");
    let e = pipeline.set_loras(&[LoraSetting::new(other, 1.0)]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Lora);
    assert!(e.to_string().contains("this model's") && e.to_string().contains("[64, 64]"), "{e}");
    let unknown = file_of(pair("single_transformer_blocks.0.attn.to_q", 2, 64, 64));
    let unknown = Arc::new(LoraAdapter::load(temp_file("flux.safetensors", &unknown)).unwrap());
    let e = pipeline.set_loras(&[LoraSetting::new(unknown, 1.0)]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Lora);
    assert!(e.to_string().contains("single_transformer_blocks.0.attn.to_q"), "{e}");

    // Nothing was half-applied: the pipeline still has the PEFT adapter and gives its golden.
    assert_eq!(pipeline.loras().len(), 1);
    assert_eq!(pipeline.loras()[0].adapter.sha256(), peft.sha256());
    let case =
        lora_cases(package)["cases"].as_array().unwrap().iter().find(|c| c["name"] == "peft_1.0").unwrap().clone();
    let (latents, images) = golden_case(&case);
    check(&pipeline, package, &case, &latents, &images);
    std::fs::remove_dir_all(truncated.parent().unwrap()).ok();
}

#[test]
fn a_package_without_the_lora_table_refuses_loras_clearly() {
    let package = "tiny-zimage";
    let dir = std::env::temp_dir().join(format!("zimage-lora-nolora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = repo().join("models").join(package);
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let mut manifest: Value = json(&dir.join("manifest.json"));
    manifest["transformer"].as_object_mut().unwrap().remove("lora_parameters");
    std::fs::write(dir.join("manifest.json"), serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    let pipeline = Pipeline::load(&dir, &options()).expect("a package without the table still loads");
    let e = pipeline.set_loras(&[LoraSetting::new(adapter(package, "loras/peft.safetensors"), 1.0)]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Lora);
    assert!(e.to_string().contains("lora_parameters"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A package whose LoRA table names initializers its graph lacks is a package error that names
/// the package's transformer graph, not the LoRA file (which is not at fault).
#[test]
fn a_broken_lora_table_blames_the_package() {
    let dir = edited_copy(&repo().join("models/tiny-zimage"), "broken-lora-table", |m, _| {
        for place in m["transformer"]["lora_parameters"].as_object_mut().unwrap().values_mut() {
            place["initializer"] = "nope".into();
        }
    });
    let lora = adapter("tiny-zimage", "loras/peft.safetensors");
    let pipeline = Pipeline::load(&dir, &options()).unwrap();
    let e = pipeline.set_loras(&[LoraSetting::new(Arc::clone(&lora), 1.0)]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Package, "{e}");
    let message = e.to_string();
    assert!(message.contains("transformer.onnx") && message.contains("initializer nope"), "{message}");
    assert!(!message.contains(&lora.path().display().to_string()), "{message}");
    std::fs::remove_dir_all(&dir).unwrap();
}
