//! Shared helpers for the integration tests: paths, golden files, comparisons.
#![allow(dead_code)]

pub mod semantic;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ndarray::{Array4, ArrayD};
use serde_json::Value;
use zimage::{LoadOptions, Pipeline};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn golden(rel: &str) -> PathBuf {
    repo().join("tests/golden").join(rel)
}

pub fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn npy_f32(path: &Path) -> ArrayD<f32> {
    ndarray_npy::read_npy(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn png_rgb(path: &Path) -> zimage::RgbImage {
    zimage::image_io::load_rgb(path).unwrap()
}

/// The request a golden generation case describes (cases.json's diffusers call arguments), with
/// its final latents returned.
pub fn golden_request(case: &Value) -> zimage::GenerateRequest {
    let mut r = zimage::GenerateRequest::new(case["prompt"].as_str().unwrap());
    r.negative_prompt = case["negative_prompt"].as_str().map(|s| zimage::Prompt::Text(s.to_string()));
    r.width = case["width"].as_u64().unwrap() as u32;
    r.height = case["height"].as_u64().unwrap() as u32;
    r.steps = case["num_inference_steps"].as_u64().unwrap() as u32;
    r.guidance_scale = case["guidance_scale"].as_f64().unwrap() as f32;
    r.cfg_normalization = case["cfg_normalization"].as_f64().unwrap_or(0.0) as f32;
    r.cfg_truncation = case["cfg_truncation"].as_f64().unwrap_or(1.0) as f32;
    r.seed = Some(case["seed"].as_u64().unwrap());
    r.count = case["num_images_per_prompt"].as_u64().unwrap() as u32;
    r.max_sequence_length = case["max_sequence_length"].as_u64().map(|v| v as usize);
    r.return_latents = true;
    r
}

/// The input picture (and mask) of a golden image-to-image or inpainting case, its files
/// relative to `dir` (the folder holding the case's JSON).
pub fn golden_init_image(case: &Value, dir: &Path) -> zimage::InitImage {
    let file = |rel: &Value| dir.join(rel.as_str().expect("a file name"));
    zimage::InitImage {
        image: png_rgb(&file(&case["init_image_file"])),
        mask: case.get("mask_file").map(|m| zimage::image_io::load_gray(&file(m)).unwrap()),
        strength: case["strength"].as_f64().unwrap(),
    }
}

/// The LoRA set of a golden case with adapters ("loras": file and scale, lora.json and the
/// ControlNet goldens), its files relative to `dir`.
pub fn golden_loras(case: &Value, dir: &Path) -> Vec<zimage::LoraSetting> {
    let loras = case["loras"].as_array().expect("a LoRA case lists its LoRAs");
    loras
        .iter()
        .map(|l| {
            let path = dir.join(l["file"].as_str().expect("a file name"));
            let adapter = zimage::LoraAdapter::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            zimage::LoraSetting::new(std::sync::Arc::new(adapter), l["scale"].as_f64().unwrap() as f32)
        })
        .collect()
}

/// The request of a golden ControlNet case (goldens_controlnet.py): the generation, its control
/// picture and scale, and for inpainting its input picture and mask, files relative to `dir`.
pub fn golden_control_request(case: &Value, dir: &Path) -> zimage::GenerateRequest {
    let file = |rel: &Value| dir.join(rel.as_str().expect("a file name"));
    let control_image = png_rgb(&file(&case["control_image_file"]));
    let mut control = match case.get("init_image_file") {
        Some(init) => zimage::ControlCondition::inpaint(
            control_image,
            png_rgb(&file(init)),
            zimage::image_io::load_gray(&file(&case["mask_file"])).unwrap(),
        ),
        None => zimage::ControlCondition::new(control_image),
    };
    control.conditioning_scale = case["controlnet_conditioning_scale"].as_f64().unwrap() as f32;
    let mut request = golden_request(case);
    request.control = Some(control);
    request
}

/// The request of a golden edit case (goldens_omni.py), its pictures relative to `dir`. The case
/// named "defaults" leaves steps, guidance and truncation unset: it holds the pipeline's defaults,
/// which the package must give.
pub fn golden_edit_request(case: &Value, dir: &Path) -> zimage::EditRequest {
    let images = case["image_files"].as_array().unwrap().iter().map(|f| png_rgb(&dir.join(f.as_str().unwrap())));
    let mut r = zimage::EditRequest::new(case["prompt"].as_str().unwrap(), images.collect());
    r.negative_prompt = case["negative_prompt"].as_str().map(str::to_string);
    r.width = case["width"].as_u64().map(|v| v as u32);
    r.height = case["height"].as_u64().map(|v| v as u32);
    r.cfg_normalization = case["cfg_normalization"].as_f64().unwrap() as f32;
    r.seed = Some(case["seed"].as_u64().unwrap());
    r.max_sequence_length = case["max_sequence_length"].as_u64().map(|v| v as usize);
    r.count = case["num_images_per_prompt"].as_u64().map_or(1, |n| n as u32);
    r.return_latents = true;
    if case["name"] != "defaults" {
        r.steps = Some(case["num_inference_steps"].as_u64().unwrap() as usize);
        r.guidance_scale = Some(case["guidance_scale"].as_f64().unwrap() as f32);
        r.cfg_truncation = Some(case["cfg_truncation"].as_f64().unwrap() as f32);
    }
    r
}

/// One SigLIP2 processor golden row (goldens_omni.py) against `zimage::siglip_inputs` with the
/// row's settings: the max abs difference of the real patch rows, or what else differs (spatial
/// shape, attention mask, padding rows not zero).
pub fn siglip_row_diff(row: &Value, dir: &Path) -> Result<f32, String> {
    let floats3 = |v: &Value| {
        let a: Vec<f64> = v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        [a[0], a[1], a[2]]
    };
    let file = |rel: &Value| dir.join(rel.as_str().expect("a file name"));
    let mut settings = zimage::package::edit::SiglipProcessorSettings::transformers_defaults();
    settings.patch_size = row["patch_size"].as_u64().unwrap() as usize;
    settings.max_num_patches = row["max_num_patches"].as_u64().unwrap() as usize;
    settings.resample = row["resample"].as_str().unwrap().to_string();
    settings.image_mean = floats3(&row["image_mean"]);
    settings.image_std = floats3(&row["image_std"]);
    settings.rescale_factor = row["rescale_factor"].as_f64().unwrap();
    let got = zimage::siglip_inputs(&png_rgb(&file(&row["image_file"])), &settings).map_err(|e| e.to_string())?;
    let shape: Vec<usize> =
        row["spatial_shapes"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    if got.spatial_shapes != (shape[0], shape[1]) {
        return Err(format!("spatial shapes {:?}, want {shape:?}", got.spatial_shapes));
    }
    let want_mask: ndarray::Array1<i32> = ndarray_npy::read_npy(file(&row["pixel_attention_mask_file"])).unwrap();
    if got.pixel_attention_mask != want_mask.to_vec() {
        return Err("the pixel attention masks differ".into());
    }
    let want = npy_f32(&file(&row["pixel_values_file"]));
    let real = shape[0] * shape[1];
    if want.shape() != [real, got.pixel_values.ncols()] {
        return Err(format!("pixel values {:?}, want {:?}", got.pixel_values.shape(), want.shape()));
    }
    if !got.pixel_values.slice(ndarray::s![real.., ..]).iter().all(|&v| v == 0.0) {
        return Err("padding rows are not zero".into());
    }
    let head = got.pixel_values.slice(ndarray::s![..real, ..]).to_owned();
    Ok(max_abs_diff(head.as_slice().unwrap(), want.as_slice().unwrap()))
}

/// The greedy options of a golden enhancer case (make_enhancer_fixtures.py's cases.json).
pub fn golden_enhance_options(case: &Value) -> zimage::EnhanceOptions {
    let mut o = zimage::EnhanceOptions::default();
    o.system_prompt = case["system_prompt"].as_str().map(str::to_string);
    o.thinking = case["thinking"].as_bool().unwrap();
    o.max_new_tokens = case["max_new_tokens"].as_u64().unwrap() as usize;
    o.sampling = zimage::Sampling::Greedy;
    o
}

/// A golden enhancer case run by `enhancer` against transformers' greedy generation: the first
/// of prompt ids, generated ids, finish reason and text that differs, or the enhancement when
/// all are equal.
pub fn golden_enhancement(enhancer: &zimage::PromptEnhancer, case: &Value) -> Result<zimage::Enhancement, String> {
    let ids = |v: &Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    let options = golden_enhance_options(case);
    let prompt = case["prompt"].as_str().unwrap();
    let prompt_ids = enhancer.prompt_ids(prompt, &options).map_err(|e| e.to_string())?;
    if prompt_ids != ids(&case["prompt_ids"]) {
        return Err(format!("prompt ids {prompt_ids:?}, want {:?}", ids(&case["prompt_ids"])));
    }
    let result = enhancer.enhance(prompt, &options, None).map_err(|e| e.to_string())?;
    if result.token_ids != ids(&case["generated_ids"]) {
        return Err(format!("generated ids {:?}, want {:?}", result.token_ids, ids(&case["generated_ids"])));
    }
    let finish = if case["finish"] == "stop" { zimage::FinishReason::Stop } else { zimage::FinishReason::Length };
    if result.finish != finish {
        return Err(format!("finish {:?}, want {finish:?}", result.finish));
    }
    if result.raw_text != case["raw_text"].as_str().unwrap() {
        return Err(format!("text {:?}, want {}", result.raw_text, case["raw_text"]));
    }
    Ok(result)
}

/// One pipeline per package per test binary: loading is the slow part.
pub fn pipeline(package: &str) -> &'static Pipeline {
    static A: OnceLock<Pipeline> = OnceLock::new();
    static B: OnceLock<Pipeline> = OnceLock::new();
    static OMNI: OnceLock<Pipeline> = OnceLock::new();
    let cell = match package {
        "tiny-zimage" => &A,
        "tiny-zimage-alt" => &B,
        "tiny-zimage-omni" => &OMNI,
        other => panic!("unknown package {other}"),
    };
    cell.get_or_init(|| {
        let options = {
            let mut o = LoadOptions::default();
            o.threads = Some(1);
            o.device = test_device();
            o
        };
        Pipeline::load(repo().join("models").join(package), &options).expect("load package")
    })
}

/// `ZIMAGE_TEST_DEVICE=cuda|tensorrt[:N]` runs the parity tests on a GPU (scripts/gpu-check.sh).
pub fn test_device() -> zimage::Device {
    std::env::var("ZIMAGE_TEST_DEVICE").map_or(zimage::Device::Cpu, |d| d.parse().expect("ZIMAGE_TEST_DEVICE"))
}

/// Tolerances against the CPU goldens: (latents max abs, image levels, relative L2). On a GPU,
/// kernels sum in other orders (and TensorRT fuses them), so the bounds are wider there.
pub fn tolerances() -> (f32, u8, f64) {
    match test_device() {
        zimage::Device::Cpu => (1e-4, 1, 1e-5),
        _ => (2e-3, 2, 1e-3),
    }
}

/// Largest absolute difference; NaN as soon as either side holds one, so that a `<=` bound
/// fails on it (folding with `f32::max` would drop the NaN and pass).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        let d = (x - y).abs();
        if d.is_nan() {
            return f32::NAN;
        }
        worst = worst.max(d);
    }
    worst
}

pub fn rel_l2(a: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(a.len(), reference.len());
    let num: f64 = a.iter().zip(reference).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = reference.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

pub fn max_pixel_diff(a: &zimage::RgbImage, b: &zimage::RgbImage) -> u8 {
    assert_eq!((a.width, a.height), (b.width, b.height));
    a.pixels.iter().zip(&b.pixels).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

pub fn as4(a: ArrayD<f32>) -> Array4<f32> {
    a.into_dimensionality().unwrap()
}

/// A copy of `package` (links followed) in a fresh temporary folder named by `name`, so that
/// the sessions counted for its files (`session_count`) are the calling test's alone.
pub fn copy_package(package: &Path, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zimage-package-copy-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(package).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

/// [`copy_package`], then `edit` changes the copy's manifest (and may change its files).
pub fn edited_copy(package: &Path, name: &str, edit: impl FnOnce(&mut Value, &Path)) -> PathBuf {
    let dir = copy_package(package, name);
    let mut manifest = json(&dir.join("manifest.json"));
    edit(&mut manifest, &dir);
    std::fs::write(dir.join("manifest.json"), serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    dir
}
