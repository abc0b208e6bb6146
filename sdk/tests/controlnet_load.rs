//! A ControlNet chosen at load time (`LoadOptions::controlnet`): the combined graph is the only
//! transformer session created, the results are bit-identical to attaching it after loading
//! (`Pipeline::set_controlnet`), and what does not fit is a typed error at load, quantized
//! packages included.

mod common;

use std::fs;
use std::path::PathBuf;

use common::*;
use serde_json::Value;
use zimage::runtime::session_count::sessions_created;
use zimage::{ControlCondition, ErrorKind, GenerateRequest, LoadOptions, Pipeline};

fn options(controlnet: Option<&str>) -> LoadOptions {
    let mut options = LoadOptions::default();
    options.threads = Some(1);
    options.device = test_device();
    options.controlnet = controlnet.map(str::to_string);
    options
}

/// A private folder for one test, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zimage-controlnet-load-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A small request with a control map: a bright square on a dark ground.
fn control_request() -> GenerateRequest {
    let (width, height) = (64u32, 48u32);
    let mut pixels = vec![20u8; (width * height * 3) as usize];
    for y in 12..36 {
        for x in 16..48 {
            let i = ((y * width + x) * 3) as usize;
            pixels[i..i + 3].copy_from_slice(&[230, 230, 230]);
        }
    }
    let mut request = GenerateRequest::new("a lighthouse on a cliff");
    request.width = width;
    request.height = height;
    request.steps = 2;
    request.seed = Some(11);
    request.guidance_scale = 0.0;
    request.return_latents = true;
    let mut condition = ControlCondition::new(zimage::RgbImage { width, height, pixels });
    condition.conditioning_scale = 0.9;
    request.control = Some(condition);
    request
}

/// Sessions of the plain transformer: from its graph file or, where this CPU packs weights as
/// the package's layout does, from its prepacked layout (tests/cpu_prepacked.rs).
fn plain_transformer_sessions(dir: &std::path::Path) -> usize {
    sessions_created(&dir.join("transformer.onnx")) + sessions_created(&dir.join("transformer.prepacked.onnx"))
}

#[test]
fn controlnet_at_load_is_the_only_transformer_session_and_matches_set_controlnet() {
    let source = repo().join("models/tiny-zimage-control");
    for name in ["union-v1", "union-v2.1"] {
        let dir = copy_package(&source, name);
        let pipeline = Pipeline::load(&dir, &options(Some(name))).expect("load with a ControlNet");
        assert_eq!(pipeline.controlnet().as_deref(), Some(name));
        assert_eq!(plain_transformer_sessions(&dir), 0, "{name}: the plain transformer was loaded");
        assert_eq!(sessions_created(&dir.join(format!("controlnet_{name}.onnx"))), 1);
        // Clearing LoRAs (there are none with a ControlNet) keeps the ControlNet's graph.
        pipeline.set_loras(&[]).unwrap();
        assert_eq!(pipeline.controlnet().as_deref(), Some(name));
        assert_eq!(plain_transformer_sessions(&dir), 0);
        let request = control_request();
        let at_load = pipeline.generate(&request, None).unwrap();

        let attached = Pipeline::load(&source, &options(None)).unwrap();
        attached.set_controlnet(Some(name)).unwrap();
        let after = attached.generate(&request, None).unwrap();
        let (a, b) = (at_load.latents.unwrap(), after.latents.unwrap());
        assert!(a.iter().all(|v| v.is_finite()));
        assert_eq!(a, b, "{name}: loading with the ControlNet differs from set_controlnet");
        assert_eq!(at_load.images, after.images);

        // Detaching still gives the plain transformer (loaded only now).
        pipeline.set_controlnet(None).unwrap();
        assert_eq!(plain_transformer_sessions(&dir), 1);
        drop(pipeline);
        fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn a_controlnet_that_does_not_fit_is_a_typed_error_at_load() {
    let package = repo().join("models/tiny-zimage-control");
    let err = Pipeline::load(&package, &options(Some("no-such-controlnet"))).err().expect("unknown name");
    assert_eq!(err.kind(), ErrorKind::Package, "{err}");
    assert!(err.to_string().contains("union-v1, union-v2.1"), "{err}");
    // The other package's ControlNet (another transformer, another width).
    let err = Pipeline::load(&package, &options(Some("union-v2.0"))).err().expect("other package's name");
    assert_eq!(err.kind(), ErrorKind::Package, "{err}");
    // A package without ControlNets.
    let err = Pipeline::load(repo().join("models/tiny-zimage"), &options(Some("union-v1"))).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Package, "{err}");
}

/// LoRAs and a ControlNet together (parity with diffusers in controlnet.rs): every order of
/// getting there gives the same latents, and detaching the ControlNet keeps the LoRAs.
#[test]
fn loras_and_a_controlnet_combine_in_any_order() {
    let package = repo().join("models/tiny-zimage-control");
    let adapter = std::sync::Arc::new(
        zimage::LoraAdapter::load(golden("tiny-zimage/loras/peft.safetensors")).expect("committed LoRA fixture"),
    );
    let set = vec![zimage::LoraSetting::new(adapter, 0.9)];
    let request = control_request();
    let mut with_both = options(Some("union-v1"));
    with_both.loras = set.clone();
    let at_load = Pipeline::load(&package, &with_both).expect("LoRAs and a ControlNet at load");
    assert_eq!((at_load.loras().len(), at_load.controlnet().as_deref()), (1, Some("union-v1")));
    let want = at_load.generate(&request, None).unwrap().latents.unwrap();
    assert!(want.iter().all(|v| v.is_finite()));
    let without_loras = Pipeline::load(&package, &options(Some("union-v1"))).unwrap();
    let plain = without_loras.generate(&request, None).unwrap().latents.unwrap();
    assert_ne!(plain, want, "the LoRA changed nothing");

    let controlnet_first = Pipeline::load(&package, &options(None)).unwrap();
    controlnet_first.set_controlnet(Some("union-v1")).unwrap();
    controlnet_first.set_loras(&set).unwrap();
    assert_eq!(controlnet_first.generate(&request, None).unwrap().latents.unwrap(), want);

    let mut loras_only = options(None);
    loras_only.loras = set.clone();
    let loras_first = Pipeline::load(&package, &loras_only).unwrap();
    loras_first.set_controlnet(Some("union-v1")).unwrap();
    assert_eq!(loras_first.loras().len(), 1);
    assert_eq!(loras_first.generate(&request, None).unwrap().latents.unwrap(), want);

    // Detached: the plain transformer with the LoRAs, as loaded with the LoRAs alone.
    loras_first.set_controlnet(None).unwrap();
    assert_eq!(loras_first.loras().len(), 1);
    let mut no_control = request.clone();
    no_control.control = None;
    let reference = Pipeline::load(&package, &loras_only).unwrap();
    assert_eq!(
        loras_first.generate(&no_control, None).unwrap().latents.unwrap(),
        reference.generate(&no_control, None).unwrap().latents.unwrap()
    );
}

/// A quantized package carrying a `controlnets` section (copied in by hand: the exporter
/// refuses quantized packages) is refused at load, before any file of the entry is read.
#[test]
fn controlnet_on_a_quantized_package_is_refused_at_load() {
    let int8 = repo().join("models/tiny-zimage-int8");
    let control = repo().join("models/tiny-zimage-control");
    let dir = scratch("int8");
    for entry in fs::read_dir(&int8).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "manifest.json" {
            std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    for file in ["controlnet_union-v1.onnx", "controlnet_union-v1.onnx.data"] {
        std::os::unix::fs::symlink(control.join(file), dir.join(file)).unwrap();
    }
    let mut manifest: Value = json(&int8.join("manifest.json"));
    let control_manifest: Value = json(&control.join("manifest.json"));
    manifest["controlnets"] = control_manifest["controlnets"].clone();
    fs::write(dir.join("manifest.json"), serde_json::to_string_pretty(&manifest).unwrap()).unwrap();

    let err = Pipeline::load(&dir, &options(Some("union-v1"))).err().expect("quantized package");
    assert_eq!(err.kind(), ErrorKind::Package, "{err}");
    assert!(err.to_string().contains("quantized (int8"), "{err}");
    // Attaching later is refused the same way, and the pipeline keeps its transformer.
    let pipeline = Pipeline::load(&dir, &options(None)).expect("the quantized package itself loads");
    let err = pipeline.set_controlnet(Some("union-v1")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Package, "{err}");
    assert_eq!(pipeline.controlnet(), None);
    drop(pipeline);
    fs::remove_dir_all(&dir).unwrap();
}
