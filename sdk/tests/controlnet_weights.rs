//! The committed ControlNet add-ons store every weight they share with the transformer once on
//! disk: as an external-data reference into transformer.onnx(.data), never again in
//! controlnet_<name>.onnx(.data). Reads the graphs' initializer tables (no ONNX Runtime) and
//! checks them against the ControlNet's own parameter bytes, counted from its config
//! (diffusers' ZImageControlNetModel layout), not from the graph.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use zimage::package::initializers::{read_initializers, Initializer};

/// Tensors below this many bytes stay embedded in the graph (export-scripts'
/// `controlnet.EMBED_BELOW`): shape constants and norm vectors.
const EMBED_BELOW: usize = 1024;

fn digest(init: &Initializer) -> [u8; 32] {
    Sha256::digest(init.read_bytes().expect("read tensor")).into()
}

fn file_name(init: &Initializer) -> String {
    let (path, _, _) = init.bytes.as_ref().expect("raw bytes");
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// Distinct indices `i` of `prefix.i.` in the transformer's LoRA parameter table: the layer
/// counts of the package's transformer.
fn layer_count(manifest: &Value, prefix: &str) -> usize {
    let table = manifest["transformer"]["lora_parameters"].as_object().expect("lora_parameters");
    let layers: HashSet<&str> = table.keys().filter_map(|k| k.strip_prefix(prefix)?.split('.').next()).collect();
    layers.len()
}

/// Bytes of the ControlNet's own parameters of at least EMBED_BELOW bytes, from its config.
/// A Z-Image block: attention q/k/v/out [dim, dim] (no bias), q/k RMS norms [head_dim],
/// SwiGLU w1/w3 [hidden, dim] and w2 [dim, hidden] with hidden = int(dim / 3 * 8), four norms
/// [dim], adaLN [4 dim, min(dim, 256)] + bias [4 dim]; a control block adds after_proj
/// [dim, dim] + bias and, the first one, before_proj likewise.
fn expected_own_bytes(manifest: &Value, cn: &Value) -> usize {
    let element = match manifest["precision"].as_str().unwrap() {
        "fp32" => 4,
        "fp16" => 2,
        other => panic!("precision {other}"),
    };
    let t = &manifest["transformer"];
    let dim = cn["dim"].as_u64().unwrap() as usize;
    assert_eq!(t["dim"].as_u64().unwrap() as usize, dim);
    let heads = t["num_heads"].as_u64().unwrap() as usize;
    let patch = t["patch_size"].as_u64().unwrap() as usize;
    let hidden = (dim as f64 / 3.0 * 8.0) as usize;
    let adaln_in = dim.min(256);
    let bytes = |shapes: &[&[usize]]| -> usize {
        shapes.iter().map(|s| s.iter().product::<usize>() * element).filter(|&b| b >= EMBED_BELOW).sum()
    };
    let block = bytes(&[
        &[dim, dim],
        &[dim, dim],
        &[dim, dim],
        &[dim, dim],
        &[dim / heads],
        &[dim / heads],
        &[hidden, dim],
        &[dim, hidden],
        &[hidden, dim],
        &[dim],
        &[dim],
        &[dim],
        &[dim],
        &[4 * dim, adaln_in],
        &[4 * dim],
    ]);
    let proj = bytes(&[&[dim, dim], &[dim]]);
    let control_blocks = |n: usize| if n == 0 { 0 } else { n * (block + proj) + proj };

    let in_dim = cn["control_in_dim"].as_u64().unwrap() as usize;
    let embedder = bytes(&[&[dim, patch * patch * in_dim], &[dim]]);
    let places: Vec<usize> =
        cn["control_layers_places"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let main_layers = layer_count(manifest, "layers.");
    let refiner_layers = layer_count(manifest, "noise_refiner.");
    assert!(main_layers > 0 && refiner_layers > 0);
    let mode = cn["add_control_noise_refiner"].as_str();
    // Control layers whose place is past the last main layer never run (diffusers drops their
    // hints); "control_layers" runs all of them on the image stream as well.
    let used_layers = match mode {
        Some("control_layers") => places.len(),
        _ => places.iter().enumerate().filter(|(_, &p)| p < main_layers).map(|(k, _)| k + 1).max().unwrap_or(0),
    };
    let refiner = match mode {
        None => refiner_layers * block,                                  // 1.0: plain blocks
        Some("control_layers") => 0,                                     // 2.0: none
        Some("control_noise_refiner") => control_blocks(refiner_layers), // 2.1: control blocks
        Some(other) => panic!("mode {other}"),
    };
    embedder + control_blocks(used_layers) + refiner
}

fn check_package(package: &Path) -> usize {
    let manifest = json(&package.join("manifest.json"));
    let transformer = read_initializers(&package.join("transformer.onnx")).expect("transformer initializers");
    let transformer_digests: HashSet<[u8; 32]> =
        transformer.values().filter(|i| i.bytes.is_some()).map(digest).collect();
    let controlnets = manifest["controlnets"].as_object().expect("controlnets section");
    for (name, cn) in controlnets {
        let graph = package.join(cn["graph"]["path"].as_str().unwrap());
        let own_file = format!("{}.data", graph.file_name().unwrap().to_string_lossy());
        let combined = read_initializers(&graph).expect("combined graph initializers");
        let mut seen: BTreeMap<[u8; 32], String> = BTreeMap::new();
        let (mut own, mut shared) = (0usize, 0usize);
        for (tensor, init) in &combined {
            let Some((_, _, length)) = init.bytes.as_ref() else { continue };
            let length = *length as usize;
            if init.element_type.is_none() || length < EMBED_BELOW {
                continue;
            }
            let hash = digest(init);
            if let Some(first) = seen.insert(hash, tensor.clone()) {
                panic!("{name}: {tensor} and {first} hold the same bytes: a weight stored twice");
            }
            let file = file_name(init);
            if transformer_digests.contains(&hash) {
                assert!(
                    file == "transformer.onnx" || file == "transformer.onnx.data",
                    "{name}: {tensor} ({length} bytes) equals a transformer weight but is stored in {file}"
                );
                shared += length;
            } else {
                assert_eq!(file, own_file, "{name}: the ControlNet's own {tensor} is stored in {file}");
                own += length;
            }
        }
        assert_eq!(own as u64, cn["own_weight_bytes"].as_u64().unwrap(), "{name}: own_weight_bytes");
        assert_eq!(shared as u64, cn["shared_weight_bytes"].as_u64().unwrap(), "{name}: shared_weight_bytes");
        assert_eq!(own, expected_own_bytes(&manifest, cn), "{name}: own bytes vs the ControlNet's parameters");
    }
    controlnets.len()
}

#[test]
fn controlnet_shares_every_transformer_weight_by_reference() {
    let checked: usize = ["tiny-zimage-control", "tiny-zimage-alt-control", "toy-zimage-control"]
        .iter()
        .map(|p| check_package(&repo().join("models").join(p)))
        .sum();
    // union-v1 (1.0), union-v2.1 (2.1), union-v2.0 (2.0), the trained toy's edges (2.1)
    assert_eq!(checked, 4);
}
