//! The prepacked CPU layout of the transformer (a graph entry's `cpu_prepacked`,
//! docs/package-format.md). tiny-zimage's transformer carries one, written on an x86-64 machine
//! with AVX-512 by export-scripts/zimage_export/prepacked.py, with its probe. On the CPU, where
//! the probe computes exactly, the layout is loaded instead of the portable graph and gives
//! exactly its images; a probe that does not compute exactly, a layout for another processor
//! architecture, or LoRA-merged weights (whose packed copies the file does not have) mean the
//! portable graph; a missing probe is a package error like any missing file.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;
use zimage::runtime::session_count::sessions_created;
use zimage::{Device, ErrorKind, GenerateRequest, LoadOptions, LoraAdapter, LoraSetting, Pipeline, RgbImage};

const LAYOUT: &str = "transformer.prepacked.onnx";
const PORTABLE: &str = "transformer.onnx";
const PROBE: &str = "transformer.prepack_probe.onnx";

fn options() -> LoadOptions {
    let mut options = LoadOptions::default();
    options.threads = Some(1);
    options.device = Device::Cpu;
    options
}

/// A copy of tiny-zimage (its own folder, so the sessions counted for its files are this
/// test's alone) whose manifest `edit` changes; `edit` may also change the copied files.
fn variant(name: &str, edit: impl FnOnce(&mut Value, &Path)) -> PathBuf {
    edited_copy(&repo().join("models/tiny-zimage"), &format!("cpu-prepacked-{name}"), edit)
}

/// tiny-zimage without its prepacked layout (the portable graph still reads the shared data
/// file, whose packed copies are then never read).
fn without_layout(name: &str) -> PathBuf {
    variant(name, |m, dir| {
        m["graphs"]["transformer"].as_object_mut().unwrap().remove("cpu_prepacked");
        for file in [LAYOUT, "transformer.prepacked.onnx.data", PROBE, "transformer.prepack_probe.onnx.data"] {
            fs::remove_file(dir.join(file)).unwrap();
        }
    })
}

/// Whether the probe should pass here: the committed layout was written on x86-64 with
/// AVX-512, where MLAS packs float GEMM weights this way.
fn layout_fits() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn requests() -> Vec<GenerateRequest> {
    (0..2)
        .map(|i| {
            let mut request = GenerateRequest::new(["a lighthouse on a cliff", "两只猫在雪地里"][i]);
            request.width = 64;
            request.height = 48;
            request.steps = 3;
            request.seed = Some(40 + i as u64);
            request
        })
        .collect()
}

fn images(package: &Path, options: &LoadOptions) -> Vec<RgbImage> {
    let pipeline = Pipeline::load(package, options).expect("load");
    let images: Vec<RgbImage> =
        requests().iter().flat_map(|request| pipeline.generate(request, None).expect("generate").images).collect();
    assert_eq!(images.len(), 2);
    for image in &images {
        assert!(image.pixels.iter().any(|&p| p != image.pixels[0]), "a flat picture");
    }
    images
}

fn sessions(dir: &Path) -> (usize, usize) {
    (sessions_created(&dir.join(LAYOUT)), sessions_created(&dir.join(PORTABLE)))
}

#[test]
fn the_layout_is_loaded_where_its_probe_passes_and_gives_the_portable_graphs_images() {
    let with = variant("with", |_, _| {});
    let without = without_layout("without");
    assert_eq!(images(&with, &options()), images(&without, &options()));
    let fits = layout_fits();
    assert_eq!(sessions(&with), if fits { (1, 0) } else { (0, 1) });
    assert_eq!(sessions_created(&with.join(PROBE)), usize::from(cfg!(target_arch = "x86_64")));
    assert_eq!(sessions(&without), (0, 1));

    // The layout's files are not weights (tiny-zimage's transformer keeps its weights inside
    // the .onnx, so its layout has a data file of its own; the Manifest unit tests cover packed
    // copies appended to a graph's data file).
    let weights = |dir: &Path| Pipeline::load(dir, &options()).expect("load").weight_bytes();
    assert_eq!(weights(&with), weights(&without));

    // The sequential mode reloads the transformer for every generation: from the layout each
    // time, and the probe ran once in this process.
    let mut sequential = options();
    sequential.memory_mode = zimage::MemoryMode::Sequential;
    let before = sessions(&with);
    assert_eq!(images(&with, &sequential), images(&without, &options()));
    let after = sessions(&with);
    let loads = requests().len() + 1; // the load itself, then one per generation
    if fits {
        assert!(after.0 > before.0 && after.1 == before.1, "{before:?} -> {after:?} ({loads} loads)");
    } else {
        assert!(after.0 == before.0 && after.1 > before.1, "{before:?} -> {after:?}");
    }
    assert_eq!(sessions_created(&with.join(PROBE)), usize::from(cfg!(target_arch = "x86_64")));
    for dir in [with, without] {
        fs::remove_dir_all(dir).unwrap();
    }
}

/// Adds 1 to the last float of the probe's data file (its manifest entry updated, so that the
/// package checks pass). The file ends with a tensor's own values, not padding or a packed
/// copy (prepacked.py writes an initializer's packed copies before it), so the probe's
/// |y - expected| is no longer 0.
fn tamper_probe(m: &mut Value, dir: &Path) {
    let path = dir.join("transformer.prepack_probe.onnx.data");
    let mut data = fs::read(&path).unwrap();
    let at = data.len() - 4;
    let value = f32::from_le_bytes(data[at..].try_into().unwrap()) + 1.0;
    data[at..].copy_from_slice(&value.to_le_bytes());
    fs::write(&path, &data).unwrap();
    let entry = &mut m["graphs"]["transformer"]["cpu_prepacked"]["probe"]["external_data"];
    entry["sha256"] = zimage::package::files::sha256_hex(&data).into();
}

#[test]
fn a_probe_that_is_not_exact_here_or_another_architecture_keeps_the_portable_graph() {
    let want = images(&without_layout("reference"), &options());

    let inexact = variant("inexact", tamper_probe);
    assert_eq!(images(&inexact, &options()), want);
    assert_eq!(sessions(&inexact), (0, 1));
    // The probe ran (where the architecture matches) and said no.
    assert_eq!(sessions_created(&inexact.join(PROBE)), usize::from(cfg!(target_arch = "x86_64")));

    // Written on another architecture: not even probed.
    let other = variant("other-arch", |m, _| {
        m["graphs"]["transformer"]["cpu_prepacked"]["arch"] = "riscv64".into();
    });
    assert_eq!(images(&other, &options()), want);
    assert_eq!(sessions(&other), (0, 1));
    assert_eq!(sessions_created(&other.join(PROBE)), 0);
    for dir in [inexact, other] {
        fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn lora_merged_weights_load_the_portable_graph() {
    // A LoRA replaces transformer weights: the file's packed copies are of the base weights.
    let with = variant("lora", |_, _| {});
    // (tests/lora.rs checks such images against diffusers' on this same package.)
    let lora = repo().join("tests/golden/tiny-zimage/loras/peft.safetensors");
    let adapter = std::sync::Arc::new(LoraAdapter::load(&lora).expect("the committed LoRA"));
    let mut options = options();
    options.loras = vec![LoraSetting { adapter, scale: 0.8 }];
    let pipeline = Pipeline::load(&with, &options).expect("load with a LoRA");
    assert_eq!(sessions(&with), (0, 1));
    let merged = pipeline.generate(&requests()[0], None).expect("generate").images;
    let base = Pipeline::load(&with, &self::options()).expect("load").generate(&requests()[0], None).unwrap().images;
    assert_ne!(merged, base, "the LoRA changed nothing");
    assert_eq!(sessions(&with).0, usize::from(layout_fits()));
    fs::remove_dir_all(with).unwrap();
}

#[test]
fn a_missing_probe_is_a_package_error() {
    let dir = variant("no-probe", |_, dir| fs::remove_file(dir.join(PROBE)).unwrap());
    let err = Pipeline::load(&dir, &options()).err().expect("a package without its probe file loads");
    assert_eq!(err.kind(), ErrorKind::Package);
    assert!(err.to_string().contains(PROBE), "{err}");
    fs::remove_dir_all(dir).unwrap();
}
