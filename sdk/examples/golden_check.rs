//! Parity of any package with a goldens folder written by the fixture writers
//! (`export-scripts/zimage_export/fixtures/goldens_pipeline.py`: diffusers' outputs for that
//! package's source), the same checks and bounds as `tests/parity.rs` on the committed
//! packages: token ids exact, text features and one transformer forward within 1e-5 relative
//! L2, every generation's final latents within 1e-4 max abs and images within 1 level, and
//! the same for the LoRA goldens (`lora.json`, goldens_lora.py) and the ControlNet goldens
//! (`controlnet/cases.json`, goldens_controlnet.py: the package must carry those ControlNets)
//! and the enhancer goldens of the package's text encoder as a causal LM (`enhancer/cases.json`,
//! make_enhancer_fixtures.py's format: the package must carry the enhancer) where the folder has
//! them. A folder of Omni goldens (goldens_omni.py: its cases.json has "edit") gets
//! tests/edit.rs's checks instead (SigLIP2 inputs, vision tokens, whole edits), and a folder of
//! enhancer goldens (cases.json has "eos_token_ids") tests/enhancer.rs's on a standalone
//! enhancer package (prompt and generated ids, finish reason and text equal).
//!
//!     cargo run --release -p zimage --example golden_check -- PACKAGE GOLDEN_DIR
//!
//! `export-scripts/random_config_parity.py` runs it on random-weight models of drawn configs
//! (docs/goldens.md, "Configs not in the repo"). Prints one line per check and exits 1 when
//! any is out of bounds.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};

use common::{
    as4, golden_control_request, golden_edit_request, golden_enhancement, golden_init_image, golden_loras,
    golden_request, json, max_abs_diff, max_pixel_diff, npy_f32, png_rgb, rel_l2, siglip_row_diff, tolerances,
};
use ndarray::{Array1, Array2, Array3};
use serde_json::Value;
use zimage::{GenerateRequest, Generation, LoadOptions, Pipeline, PromptEnhancer};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [package, golden] = &args[..] else {
        eprintln!("usage: golden_check PACKAGE GOLDEN_DIR");
        std::process::exit(2);
    };
    let (package, golden) = (Path::new(package), PathBuf::from(golden));
    let cases = json(&golden.join("cases.json"));
    let mut report = Report::default();
    if cases.get("edit").is_some() {
        check_omni(&load(package), &golden, &cases, &mut report);
    } else if cases.get("eos_token_ids").is_some() {
        let enhancer =
            PromptEnhancer::load(package, &options()).unwrap_or_else(|e| panic!("{}: {e}", package.display()));
        check_enhancer(&enhancer, &cases, &mut report);
    } else {
        check_pipeline(&load(package), &golden, &cases, &mut report);
    }
    println!("{}: {} failure(s)", package.display(), report.failures);
    std::process::exit(i32::from(report.failures > 0));
}

/// Prints one line per check and counts the failures.
#[derive(Default)]
struct Report {
    failures: usize,
}

impl Report {
    fn line(&mut self, what: String, ok: bool) {
        println!("{} {what}", if ok { "ok  " } else { "FAIL" });
        self.failures += usize::from(!ok);
    }
}

fn options() -> LoadOptions {
    let mut options = LoadOptions::default();
    options.threads = Some(1);
    options
}

fn load(package: &Path) -> Pipeline {
    Pipeline::load(package, &options()).unwrap_or_else(|e| panic!("{}: {e}", package.display()))
}

/// A Z-Image package against its goldens (goldens_pipeline.py) and, where the folder has them,
/// its LoRA, ControlNet and enhancer goldens.
fn check_pipeline(pipeline: &Pipeline, golden: &Path, cases: &Value, report: &mut Report) {
    let file = |rel: &Value| golden.join(rel.as_str().expect("a file name"));
    let rel_bound = tolerances().2;
    for case in cases["text_features"].as_array().unwrap() {
        let max = case["max_sequence_length"].as_u64().map(|m| m as usize);
        let embedding = pipeline.encode_prompt(case["prompt"].as_str().unwrap(), max).unwrap();
        let ids: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let want = npy_f32(&file(&case["features_file"]));
        let err = if embedding.features.shape() == want.shape() {
            rel_l2(embedding.features.as_slice().unwrap(), want.as_slice().unwrap())
        } else {
            f64::NAN
        };
        let ok = embedding.tokens.ids == ids && err <= rel_bound;
        let ids_equal = embedding.tokens.ids == ids;
        report.line(format!("text features {:?}: ids equal {ids_equal}, rel L2 {err:.2e}", case["prompt"]), ok);
    }

    let case = &cases["transformer_forward"];
    let latents = as4(npy_f32(&file(&case["latents_file"])));
    let timestep: Array1<f32> = npy_f32(&file(&case["timestep_file"])).into_dimensionality().unwrap();
    let cap_feats: Array3<f32> = npy_f32(&file(&case["cap_feats_file"])).into_dimensionality().unwrap();
    let cap_mask: Array2<bool> = ndarray_npy::read_npy(file(&case["cap_mask_file"])).unwrap();
    let got = pipeline.transformer_forward(&latents, &timestep, &cap_feats, &cap_mask).unwrap();
    let err = rel_l2(got.as_slice().unwrap(), npy_f32(&file(&case["output_file"])).as_slice().unwrap());
    report.line(format!("transformer forward: rel L2 {err:.2e}"), err <= rel_bound);

    for kind in ["text_to_image", "image_to_image", "inpaint"] {
        for case in cases[kind].as_array().into_iter().flatten() {
            let mut request = golden_request(case);
            if kind != "text_to_image" {
                request.init_image = Some(golden_init_image(case, golden));
            }
            let (line, ok) = check_generation(pipeline, &request, case, golden);
            report.line(format!("{kind}/{}: {line}", case["name"].as_str().unwrap()), ok);
        }
    }

    // LoRA goldens (goldens_lora.py), where the folder has them: each case's adapters set on the
    // loaded pipeline, as `Pipeline::set_loras` switches them.
    if golden.join("lora.json").exists() {
        for case in json(&golden.join("lora.json"))["cases"].as_array().unwrap() {
            let name = format!("lora/{}", case["name"].as_str().unwrap());
            match pipeline.set_loras(&golden_loras(case, golden)) {
                Ok(()) => {
                    let (line, ok) = check_generation(pipeline, &golden_request(case), case, golden);
                    report.line(format!("{name}: {line}"), ok);
                }
                Err(e) => report.line(format!("{name}: {e}"), false),
            }
        }
        pipeline.set_loras(&[]).expect("no LoRAs");
    }

    // ControlNet goldens (goldens_controlnet.py) in controlnet/, where the folder has them: each
    // ControlNet attached with `set_controlnet`, as tests/controlnet.rs does on the fixtures; the
    // text-to-image and inpainting cases, then those with LoRAs set as well.
    let controlnet_dir = golden.join("controlnet");
    if controlnet_dir.join("cases.json").exists() {
        for entry in json(&controlnet_dir.join("cases.json")).as_array().unwrap() {
            let controlnet = entry["controlnet"].as_str().unwrap();
            if let Err(e) = pipeline.set_controlnet(Some(controlnet)) {
                report.line(format!("controlnet {controlnet}: {e}"), false);
                continue;
            }
            for kind in ["text_to_image", "inpaint", "lora"] {
                for case in entry[kind].as_array().into_iter().flatten() {
                    let name = format!("controlnet {controlnet}/{kind}/{}", case["name"].as_str().unwrap());
                    let loras = if kind == "lora" { golden_loras(case, &controlnet_dir) } else { Vec::new() };
                    if let Err(e) = pipeline.set_loras(&loras) {
                        report.line(format!("{name}: {e}"), false);
                        continue;
                    }
                    let request = golden_control_request(case, &controlnet_dir);
                    let (line, ok) = check_generation(pipeline, &request, case, &controlnet_dir);
                    report.line(format!("{name}: {line}"), ok);
                }
            }
            pipeline.set_loras(&[]).expect("no LoRAs");
        }
        pipeline.set_controlnet(None).expect("detach");
    }

    // Enhancer goldens in enhancer/, where the folder has them: the package's enhancer attached
    // to the pipeline (`Pipeline::attach_enhancer`, sharing the text encoder's weights).
    let enhancer_cases = golden.join("enhancer/cases.json");
    if enhancer_cases.exists() {
        match pipeline.attach_enhancer(&options()) {
            Ok(enhancer) => check_enhancer(&enhancer, &json(&enhancer_cases), report),
            Err(e) => report.line(format!("attach_enhancer: {e}"), false),
        }
    }
}

/// Greedy generations against transformers' (make_enhancer_fixtures.py's cases.json), the
/// checks of tests/enhancer.rs: prompt and generated ids, finish reason and text equal.
fn check_enhancer(enhancer: &PromptEnhancer, cases: &Value, report: &mut Report) {
    for case in cases["cases"].as_array().unwrap() {
        let name = format!("enhancer/{}", case["name"].as_str().unwrap());
        match golden_enhancement(enhancer, case) {
            Ok(result) => {
                report.line(format!("{name}: {} tokens equal, {:?}", result.token_ids.len(), result.finish), true)
            }
            Err(e) => report.line(format!("{name}: {e}"), false),
        }
    }
}

/// An Omni (editing) package against its goldens (goldens_omni.py), the checks and bounds of
/// tests/edit.rs: the SigLIP2 processor's pixel rows within 1e-6, the vision tokens within 1e-5
/// relative L2, each edit's final latents within 1e-4 and its image within 1 level; the edits
/// with LoRAs ("lora", where the folder has them) with each case's adapters set.
fn check_omni(pipeline: &Pipeline, golden: &Path, cases: &Value, report: &mut Report) {
    let file = |rel: &Value| golden.join(rel.as_str().expect("a file name"));
    for row in cases["siglip_processor"].as_array().unwrap() {
        let name = format!("siglip inputs {} ({})", row["image_file"], row["settings"]);
        match siglip_row_diff(row, golden) {
            Ok(diff) => report.line(format!("{name}: max abs {diff:.2e}"), diff <= 1e-6),
            Err(e) => report.line(format!("{name}: {e}"), false),
        }
    }
    for row in cases["siglip_features"].as_array().unwrap() {
        let name = format!("vision tokens {}", row["image_file"]);
        let want = npy_f32(&file(&row["features_file"]));
        match pipeline.vision_tokens(&png_rgb(&file(&row["image_file"]))) {
            Ok(got) if got.shape() == want.shape() => {
                let err = rel_l2(got.as_slice().unwrap(), want.as_slice().unwrap());
                report.line(format!("{name}: rel L2 {err:.2e}"), err <= tolerances().2);
            }
            Ok(got) => report.line(format!("{name}: shape {:?}, want {:?}", got.shape(), want.shape()), false),
            Err(e) => report.line(format!("{name}: {e}"), false),
        }
    }
    for (section, case) in ["edit", "lora"]
        .into_iter()
        .flat_map(|section| cases[section].as_array().into_iter().flatten().map(move |case| (section, case)))
    {
        let name = format!("{section}/{}", case["name"].as_str().unwrap());
        // The plain edits run first, on the package's weights; each LoRA case sets its own.
        let set = if section == "lora" { pipeline.set_loras(&golden_loras(case, golden)) } else { Ok(()) };
        match set.and_then(|()| pipeline.edit(&golden_edit_request(case, golden), None)) {
            Ok(generation) => {
                let (line, ok) = compare(&generation, case, &case["output_files"], golden);
                report.line(format!("{name}: {line}"), ok);
            }
            Err(e) => report.line(format!("{name}: {e}"), false),
        }
    }
    pipeline.set_loras(&[]).expect("no LoRAs");
}

/// Generates `request` and compares its final latents and images with the golden `case`'s:
/// the report line and whether both are within the bounds.
fn check_generation(pipeline: &Pipeline, request: &GenerateRequest, case: &Value, golden: &Path) -> (String, bool) {
    match pipeline.generate(request, None) {
        Ok(generation) => compare(&generation, case, &case["image_files"], golden),
        Err(e) => (e.to_string(), false),
    }
}

/// A generation's final latents and images against the golden `case`'s latents file and
/// `images` (files relative to `golden`): the report line and whether both are within bounds.
fn compare(generation: &Generation, case: &Value, images: &Value, golden: &Path) -> (String, bool) {
    let (latent_bound, level_bound, _) = tolerances();
    let file = |rel: &Value| golden.join(rel.as_str().expect("a file name"));
    let want = npy_f32(&file(&case["latents_file"]));
    let got = generation.latents.as_ref().unwrap();
    let diff = if got.shape() == want.shape() {
        max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap())
    } else {
        f32::NAN
    };
    let images = images.as_array().unwrap();
    let levels = if generation.images.len() == images.len() {
        generation.images.iter().zip(images).map(|(got, path)| max_pixel_diff(got, &png_rgb(&file(path)))).max()
    } else {
        None
    };
    let ok = diff <= latent_bound && levels.is_some_and(|l| l <= level_bound);
    (format!("final latents max abs {diff:.2e}, images {levels:?} levels"), ok)
}
