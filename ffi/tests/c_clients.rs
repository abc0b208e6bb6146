//! Builds the C (tests/c) and C++ (tests/cpp) clients against include/zimage.h, links each once
//! to libzimage.so and once to libzimage.a, and runs them on the tiny model package against
//! the diffusers goldens and the prompt enhancer on the transformers goldens.
//!
//! The clients cannot decode PNG, so this harness turns the goldens into raw files first and
//! describes the cases in a tab-separated file (format in tests/c/zimage_test.c). The C ABI
//! itself stays free of test helpers.
//!
//! Environment:
//! - `CC` / `CXX`: the compilers (default `cc` / `c++`);
//! - `ZIMAGE_VALGRIND=1`: run the clients under valgrind memcheck (zero errors, no definite
//!   leaks) with fewer golden cases, as scripts/test-c.sh does;
//! - `ORT_DYLIB_PATH`: the ONNX Runtime library, when not in `.runtime/lib` (scripts/setup.sh).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

/// What rustc says a C program linking libzimage.a also needs (`--print native-static-libs`).
const STATIC_LINK_LIBS: &[&str] = &["-ldl", "-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-lc"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// target/<profile>, where libzimage.so and libzimage.a are (this executable is
/// target/<profile>/deps/c_clients-<hash>).
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target/<profile>").to_path_buf()
}

/// Builds libzimage.so and libzimage.a in this test's profile. Cargo does not build them for
/// an integration test (it only links rlibs into tests, and this crate has none; see
/// ffi/Cargo.toml), so without this the clients could run against stale libraries.
fn build_libraries() {
    let cargo = std::env::var("CARGO").unwrap_or("cargo".into());
    let mut command = Command::new(&cargo);
    command.args(["build", "--quiet", "-p", "zimage-ffi", "--lib"]).current_dir(root());
    match library_dir().file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            command.arg("--release");
        }
        other => panic!("unexpected target folder {other:?}: run with the dev or release profile"),
    }
    let status = command.status().unwrap_or_else(|e| panic!("running {cargo}: {e}"));
    assert!(status.success(), "{command:?} failed");
}

fn valgrind() -> bool {
    std::env::var_os("ZIMAGE_VALGRIND").is_some_and(|v| v == "1")
}

/// Everything the clients need, made once per test process.
struct Prepared {
    work: PathBuf,
    cases_file: PathBuf,
    enhancer_cases_file: PathBuf,
    lora_cases_file: PathBuf,
    edit_cases_file: PathBuf,
    edit_lora_cases_file: PathBuf,
    controlnet_cases_file: PathBuf,
    tiling_case_file: PathBuf,
    folder_manifest: PathBuf,
    mismatched_package: PathBuf,
    shared_lib_dir: PathBuf,
}

fn prepared() -> &'static Prepared {
    static PREPARED: OnceLock<Prepared> = OnceLock::new();
    PREPARED.get_or_init(|| {
        build_libraries();
        let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("c_clients");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).unwrap();
        let cases_file = write_cases_file(&work);
        let enhancer_cases_file = write_enhancer_cases_file(&work);
        let lora_cases_file = write_lora_cases_file(&work);
        let edit_cases_file = write_edit_cases_file(&work, "edit");
        let edit_lora_cases_file = write_edit_cases_file(&work, "lora");
        let controlnet_cases_file = write_controlnet_cases_file(&work);
        let tiling_case_file = write_tiling_case_file(&work);

        // A package folder whose manifest.json is a folder: ZIMAGE_RESULT_PACKAGE.
        let folder_manifest = work.join("folder-manifest-package");
        std::fs::create_dir_all(folder_manifest.join("manifest.json")).unwrap();
        let mismatched_package = write_mismatched_package(&work);

        // libzimage.so carries the SONAME libzimage.so.2: the loader looks for that name, the
        // linker for libzimage.so, as in an installed tree (scripts/install-c.sh).
        let shared_lib_dir = work.join("lib");
        std::fs::create_dir_all(&shared_lib_dir).unwrap();
        std::os::unix::fs::symlink(library_dir().join("libzimage.so"), shared_lib_dir.join("libzimage.so.2")).unwrap();
        std::os::unix::fs::symlink("libzimage.so.2", shared_lib_dir.join("libzimage.so")).unwrap();
        Prepared {
            work,
            cases_file,
            enhancer_cases_file,
            lora_cases_file,
            edit_cases_file,
            edit_lora_cases_file,
            controlnet_cases_file,
            tiling_case_file,
            folder_manifest,
            mismatched_package,
            shared_lib_dir,
        }
    })
}

/// The LoRA goldens (`tests/golden/tiny-zimage/lora.json`) for the C client's `test_lora`, one
/// case per line, tab-separated: name, prompt, seed, width, height, steps, expected raw RGB,
/// then adapter file and scale pairs.
fn write_lora_cases_file(work: &Path) -> PathBuf {
    let golden_dir = root().join("tests/golden/tiny-zimage");
    let goldens: Value =
        serde_json::from_str(&std::fs::read_to_string(golden_dir.join("lora.json")).expect("lora.json")).unwrap();
    let raw_dir = work.join("raw-lora");
    std::fs::create_dir_all(&raw_dir).unwrap();
    let mut lines = String::new();
    for case in goldens["cases"].as_array().expect("lora.json has cases") {
        let name = case["name"].as_str().unwrap();
        let images = case["image_files"].as_array().unwrap();
        assert_eq!(images.len(), 1, "{name}: the C test takes one image per case");
        assert_eq!(case["num_images_per_prompt"], 1, "{name}");
        assert!(case["negative_prompt"].is_null() && case["guidance_scale"] == 0.0, "{name}: no guidance");
        let (pixels, channels) = decode_png(&golden_dir.join(images[0].as_str().unwrap()));
        assert_eq!(channels, 3);
        let raw = raw_dir.join(format!("{name}.rgb"));
        std::fs::write(&raw, pixels).unwrap();
        let prompt = case["prompt"].as_str().unwrap();
        assert!(!prompt.contains(['\t', '\n']), "{name}: the cases file cannot carry tabs or newlines");
        let mut fields: Vec<String> = vec![
            name.into(),
            prompt.into(),
            case["seed"].to_string(),
            case["width"].to_string(),
            case["height"].to_string(),
            case["num_inference_steps"].to_string(),
            raw.display().to_string(),
        ];
        for lora in case["loras"].as_array().unwrap() {
            fields.push(golden_dir.join(lora["file"].as_str().unwrap()).display().to_string());
            fields.push(lora["scale"].to_string());
        }
        lines.push_str(&fields.join("\t"));
        lines.push('\n');
    }
    let path = work.join("lora-cases.tsv");
    std::fs::write(&path, lines).unwrap();
    path
}

/// The VAE tiling golden `grid_3x4` (`tests/golden/tiny-zimage/vae_tiling`) for the C client's
/// `test_vae_tiling`, one line, tab-separated: name, prompt, seed, width, height, steps, tile
/// size, overlap, expected raw RGB.
fn write_tiling_case_file(work: &Path) -> PathBuf {
    let golden_dir = root().join("tests/golden/tiny-zimage");
    let read = |rel: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(golden_dir.join(rel)).expect(rel)).unwrap()
    };
    let tiling = read("vae_tiling/cases.json");
    let case = tiling["decode"].as_array().unwrap().iter().find(|c| c["name"] == "grid_3x4").expect("grid_3x4");
    let cases = read("cases.json");
    let source =
        cases["text_to_image"].as_array().unwrap().iter().find(|c| c["name"] == case["text_to_image_case"]).unwrap();
    assert!(source["negative_prompt"].is_null() && source["guidance_scale"] == 0.0, "the C test sets no guidance");
    assert_eq!(source["num_images_per_prompt"], 1);
    let (pixels, channels) = decode_png(&golden_dir.join(case["image_files"][0].as_str().unwrap()));
    assert_eq!(channels, 3);
    let raw = work.join("tiling-grid_3x4.rgb");
    std::fs::write(&raw, pixels).unwrap();
    let prompt = source["prompt"].as_str().unwrap();
    assert!(!prompt.contains(['\t', '\n']));
    let fields = [
        "grid_3x4".to_string(),
        prompt.to_string(),
        source["seed"].to_string(),
        source["width"].to_string(),
        source["height"].to_string(),
        source["num_inference_steps"].to_string(),
        case["tile_size"].to_string(),
        case["overlap"].to_string(),
        raw.display().to_string(),
    ];
    let path = work.join("tiling-case.tsv");
    std::fs::write(&path, fields.join("\t") + "\n").unwrap();
    path
}

/// The ControlNet goldens (`tests/golden/controlnet/cases.json`) for the C client's
/// `test_controlnet`, one case per line, tab-separated: name, package, controlnet, prompt,
/// negative prompt, seed, width, height, steps, guidance, scale, control RGB, expected RGB, and
/// for inpainting the picture's RGB and the mask (raw files).
fn write_controlnet_cases_file(work: &Path) -> PathBuf {
    let golden_dir = root().join("tests/golden/controlnet");
    let goldens: Value =
        serde_json::from_str(&std::fs::read_to_string(golden_dir.join("cases.json")).expect("cases.json")).unwrap();
    let raw_dir = work.join("raw-controlnet");
    std::fs::create_dir_all(&raw_dir).unwrap();
    let raw = |rel: &Value, channels: usize, name: String| -> String {
        let (pixels, got) = decode_png(&golden_dir.join(rel.as_str().unwrap()));
        assert_eq!(got, channels, "{rel}");
        let path = raw_dir.join(name);
        std::fs::write(&path, pixels).unwrap();
        path.display().to_string()
    };
    let mut lines = String::new();
    for entry in goldens.as_array().unwrap() {
        let controlnet = entry["controlnet"].as_str().unwrap();
        let lists = ["text_to_image", "inpaint", "lora"].map(|kind| entry[kind].as_array().unwrap().iter());
        for case in lists.into_iter().flatten() {
            let name = case["name"].as_str().unwrap();
            let tag = format!("{controlnet}-{name}-{}", lines.lines().count());
            assert_eq!(case["image_files"].as_array().unwrap().len(), 1, "{tag}: one image per case");
            let mut fields: Vec<String> = vec![
                name.into(),
                root().join(entry["package"].as_str().unwrap()).display().to_string(),
                controlnet.into(),
                case["prompt"].as_str().unwrap().into(),
                case["negative_prompt"].as_str().unwrap_or("").into(),
                case["seed"].to_string(),
                case["width"].to_string(),
                case["height"].to_string(),
                case["num_inference_steps"].to_string(),
                case["guidance_scale"].to_string(),
                case["controlnet_conditioning_scale"].to_string(),
                raw(&case["control_image_file"], 3, format!("{tag}-control.rgb")),
                raw(&case["image_files"][0], 3, format!("{tag}-expected.rgb")),
            ];
            if case.get("init_image_file").is_some() {
                fields.push(raw(&case["init_image_file"], 3, format!("{tag}-picture.rgb")));
                fields.push(raw(&case["mask_file"], 1, format!("{tag}-mask.gray")));
            }
            if let Some(loras) = case.get("loras").and_then(Value::as_array) {
                fields.push("lora".into());
                for lora in loras {
                    fields.push(golden_dir.join(lora["file"].as_str().unwrap()).display().to_string());
                    fields.push(lora["scale"].to_string());
                }
            }
            assert!(fields.iter().all(|f| !f.contains(['\t', '\n'])), "{tag}: no tabs or newlines");
            lines.push_str(&fields.join("\t"));
            lines.push('\n');
        }
    }
    let path = work.join("controlnet-cases.tsv");
    std::fs::write(&path, lines).unwrap();
    path
}

/// tiny-zimage with tiny-zimage-alt's transformer, listed with its true size and checksum: the
/// package loads, and the transformer rejects the caption features at run time
/// (ZIMAGE_RESULT_INFERENCE).
fn write_mismatched_package(work: &Path) -> PathBuf {
    let models = root().join("models");
    let read_manifest = |name: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(models.join(name).join("manifest.json")).unwrap()).unwrap()
    };
    let mut manifest = read_manifest("tiny-zimage");
    let other = read_manifest("tiny-zimage-alt");
    manifest["graphs"]["transformer"] = other["graphs"]["transformer"].clone();
    let dir = work.join("mismatched-package");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(models.join("tiny-zimage")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let source =
            if name == "transformer.onnx" { models.join("tiny-zimage-alt/transformer.onnx") } else { entry.path() };
        if name != "manifest.json" {
            std::os::unix::fs::symlink(source, dir.join(name)).unwrap();
        }
    }
    assert_eq!(manifest["graphs"]["transformer"]["path"], "transformer.onnx");
    std::fs::write(dir.join("manifest.json"), serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    dir
}

/// Decodes every text-to-image, image-to-image and inpainting golden of the tiny package into
/// raw files and writes one line per case.
fn write_cases_file(work: &Path) -> PathBuf {
    let golden_dir = root().join("tests/golden/tiny-zimage");
    let cases: Value = serde_json::from_str(
        &std::fs::read_to_string(golden_dir.join("cases.json")).expect("tests/golden/tiny-zimage/cases.json"),
    )
    .expect("cases.json is JSON");
    let raw_dir = work.join("raw");
    std::fs::create_dir_all(&raw_dir).unwrap();
    let mut lines = String::new();
    for kind in ["text_to_image", "image_to_image", "inpaint"] {
        for case in cases[kind].as_array().unwrap_or_else(|| panic!("cases.json has no {kind} list")) {
            let name = format!("{kind}/{}", case["name"].as_str().unwrap());
            let stem = name.replace('/', "-");
            let text = |key: &str| -> String {
                let s = case[key].as_str().unwrap_or("");
                assert!(
                    !s.contains(['\t', '\n']),
                    "{name}: {key} holds a tab or newline, which the cases file cannot carry"
                );
                s.to_string()
            };
            let number = |key: &str| -> String { case[key].as_number().map_or("0".into(), |n| n.to_string()) };

            let mut expected = Vec::new();
            for file in case["image_files"].as_array().unwrap() {
                let (pixels, channels) = decode_png(&golden_dir.join(file.as_str().unwrap()));
                assert_eq!(channels, 3, "{name}: golden images are RGB");
                expected.extend(pixels);
            }
            let images_path = raw_dir.join(format!("{stem}.rgb"));
            std::fs::write(&images_path, expected).unwrap();

            let optional_image = |key: &str, channels: usize, ext: &str| -> String {
                let Some(file) = case[key].as_str() else {
                    return "-".into();
                };
                let (pixels, got) = decode_png(&golden_dir.join(file));
                assert_eq!(got, channels, "{name}: {key} has {got} channels");
                let path = raw_dir.join(format!("{stem}.{ext}"));
                std::fs::write(&path, pixels).unwrap();
                path.display().to_string()
            };
            let init = optional_image("init_image_file", 3, "init.rgb");
            let mask = optional_image("mask_file", 1, "mask.gray");

            let latents_path = raw_dir.join(format!("{stem}.f32"));
            std::fs::write(&latents_path, read_npy_f32(&golden_dir.join(case["latents_file"].as_str().unwrap())))
                .unwrap();

            let fields = [
                name.clone(),
                text("prompt"),
                text("negative_prompt"),
                number("width"),
                number("height"),
                number("num_inference_steps"),
                number("guidance_scale"),
                number("cfg_normalization"),
                number("cfg_truncation"),
                number("seed"),
                number("num_images_per_prompt"),
                number("max_sequence_length"),
                case.get("strength").map_or("0.6".into(), |_| number("strength")),
                init,
                mask,
                images_path.display().to_string(),
                latents_path.display().to_string(),
            ];
            lines.push_str(&fields.join("\t"));
            lines.push('\n');
        }
    }
    let path = work.join("cases.tsv");
    std::fs::write(&path, lines).unwrap();
    path
}

/// The enhancer goldens the clients can check through the C API (the built-in system prompt,
/// thinking off: greedy text only), one line each: name, prompt, max_new_tokens, the expected
/// text (the golden's `raw_text`, trimmed as `zimage_enhance()` returns it) and the untrimmed
/// `raw_text` (what the token callback's pieces add up to).
fn write_enhancer_cases_file(work: &Path) -> PathBuf {
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/golden/enhancer/cases.json"))
            .expect("tests/golden/enhancer/cases.json"),
    )
    .expect("cases.json is JSON");
    let mut lines = String::new();
    for case in golden["cases"].as_array().expect("cases.json has a cases list") {
        if !case["system_prompt"].is_null() || case["thinking"] != Value::Bool(false) {
            continue;
        }
        let text = |key: &str| -> &str {
            let s = case[key].as_str().unwrap_or_else(|| panic!("enhancer case without {key}"));
            assert!(
                !s.contains(['\t', '\n']),
                "enhancer case {}: {key} holds a tab or newline, which the cases file cannot carry",
                case["name"]
            );
            s
        };
        let raw = text("raw_text");
        let fields = [
            text("name").to_string(),
            text("prompt").to_string(),
            case["max_new_tokens"].as_u64().expect("max_new_tokens").to_string(),
            raw.trim().to_string(),
            raw.to_string(),
        ];
        lines.push_str(&fields.join("\t"));
        lines.push('\n');
    }
    assert!(!lines.is_empty(), "no enhancer case with the built-in prompt and thinking off");
    let path = work.join("enhancer-cases.tsv");
    std::fs::write(&path, lines).unwrap();
    path
}

/// The edit goldens (`tests/golden/tiny-zimage-omni/cases.json`, section `section`: "edit", or
/// "lora" for the edits with LoRAs) with a non-empty instruction, for the clients' `test_edit`,
/// one case per line, tab-separated: name, prompt, negative prompt ("-" for none), seed, steps,
/// guidance, cfg_normalization, cfg_truncation, output width, height, expected raw RGB, then per
/// reference its raw RGB file, width and height (none: an edit without references, at that
/// width and height). A "lora" line starts with one more field, the
/// adapters as `FILE:SCALE;FILE:SCALE` (the C++ client's `test_edit_with_loras`).
fn write_edit_cases_file(work: &Path, section: &str) -> PathBuf {
    let golden_dir = root().join("tests/golden/tiny-zimage-omni");
    let goldens: Value =
        serde_json::from_str(&std::fs::read_to_string(golden_dir.join("cases.json")).expect("cases.json")).unwrap();
    let raw_dir = work.join("raw-edit");
    std::fs::create_dir_all(&raw_dir).unwrap();
    let mut lines = String::new();
    for case in goldens[section].as_array().expect("edit cases") {
        let name = case["name"].as_str().unwrap();
        let prompt = case["prompt"].as_str().unwrap();
        // strtok in C cannot carry empty fields; the SDK test covers the empty instruction (and
        // batches of several images). The clients give a size only without references (then
        // the case's: ZImageOmniPipeline's text-to-image).
        let references = case["image_files"].as_array().unwrap().len();
        if prompt.is_empty()
            || (!case["width"].is_null() && references > 0)
            || case["num_images_per_prompt"].as_u64() > Some(1)
        {
            continue;
        }
        let (pixels, channels) = decode_png(&golden_dir.join(case["output_files"][0].as_str().unwrap()));
        assert_eq!(channels, 3);
        let expected = raw_dir.join(format!("{name}.rgb"));
        std::fs::write(&expected, &pixels).unwrap();
        let out_png =
            png::Decoder::new(std::fs::File::open(golden_dir.join(case["output_files"][0].as_str().unwrap())).unwrap())
                .read_info()
                .unwrap();
        let (width, height) = (out_png.info().width, out_png.info().height);
        let mut fields: Vec<String> = Vec::new();
        if let Some(loras) = case["loras"].as_array() {
            // The "lora" section: first the adapters, "FILE:SCALE;FILE:SCALE".
            let specs: Vec<String> = loras
                .iter()
                .map(|l| format!("{}:{}", golden_dir.join(l["file"].as_str().unwrap()).display(), l["scale"]))
                .collect();
            fields.push(specs.join(";"));
        }
        fields.extend([
            name.into(),
            prompt.into(),
            case["negative_prompt"].as_str().unwrap_or("-").into(),
            case["seed"].to_string(),
            case["num_inference_steps"].to_string(),
            case["guidance_scale"].to_string(),
            case["cfg_normalization"].to_string(),
            case["cfg_truncation"].to_string(),
            width.to_string(),
            height.to_string(),
            expected.display().to_string(),
        ]);
        for (k, image) in case["image_files"].as_array().unwrap().iter().enumerate() {
            let path = golden_dir.join(image.as_str().unwrap());
            let (pixels, channels) = decode_png(&path);
            assert_eq!(channels, 3);
            let info = png::Decoder::new(std::fs::File::open(&path).unwrap()).read_info().unwrap();
            let raw = raw_dir.join(format!("{name}-{k}.rgb"));
            std::fs::write(&raw, pixels).unwrap();
            fields.extend([raw.display().to_string(), info.info().width.to_string(), info.info().height.to_string()]);
        }
        assert!(fields.iter().all(|f| !f.contains(['\t', '\n'])), "{name}: tabs or newlines");
        lines += &(fields.join("\t") + "\n");
    }
    assert!(!lines.is_empty(), "no {section} case for the C client");
    let path = work.join(format!("omni-{section}-cases.tsv"));
    std::fs::write(&path, lines).unwrap();
    path
}

/// Pixels and channel count of an 8-bit PNG.
fn decode_png(path: &Path) -> (Vec<u8>, usize) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!(info.bit_depth, png::BitDepth::Eight, "{}", path.display());
    pixels.truncate(info.buffer_size());
    (pixels, info.color_type.samples())
}

/// The data of a little-endian float32, C-order .npy file (the goldens' only kind).
fn read_npy_f32(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}", path.display());
    let (header_len, header_start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
    };
    let header = std::str::from_utf8(&bytes[header_start..header_start + header_len]).unwrap();
    assert!(
        header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"),
        "{}: {header}",
        path.display()
    );
    bytes[header_start + header_len..].to_vec()
}

enum Language {
    C,
    Cpp,
}

enum Linking {
    Shared,
    Static,
}

fn compile(language: Language, linking: Linking, output: &Path) {
    let root = root();
    let (compiler, standard, source) = match language {
        Language::C => (std::env::var("CC").unwrap_or("cc".into()), "-std=c99", root.join("tests/c/zimage_test.c")),
        Language::Cpp => {
            (std::env::var("CXX").unwrap_or("c++".into()), "-std=c++17", root.join("tests/cpp/zimage_test.cpp"))
        }
    };
    let mut command = Command::new(&compiler);
    command
        .args([standard, "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-g", "-pthread"])
        .arg("-I")
        .arg(root.join("include"))
        .arg("-I")
        .arg(root.join("tests/cpp"))
        .arg(source)
        .arg("-o")
        .arg(output);
    match linking {
        Linking::Shared => {
            let dir = &prepared().shared_lib_dir;
            command.arg("-L").arg(dir).arg("-lzimage").arg(format!("-Wl,-rpath,{}", dir.display()));
        }
        Linking::Static => {
            command.arg(library_dir().join("libzimage.a")).args(STATIC_LINK_LIBS);
        }
    }
    command.arg("-lm");
    let result = command.output().unwrap_or_else(|e| panic!("running {compiler}: {e}"));
    assert!(
        result.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
}

fn run(name: &str, language: Language, linking: Linking) {
    let p = prepared();
    let binary = p.work.join(name);
    let shared = matches!(linking, Linking::Shared);
    compile(language, linking, &binary);
    if shared {
        let needed = Command::new("readelf")
            .arg("-d")
            .arg(&binary)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        if let Ok(dynamic) = needed {
            assert!(dynamic.contains("[libzimage.so.2]"), "{name} should need libzimage.so.2 (the SONAME):\n{dynamic}");
        }
    }
    // Under valgrind (some 50x slower) one golden case; otherwise all of them.
    let max_cases = if valgrind() { "1" } else { "1000" };
    let mut command = if valgrind() {
        let mut c = Command::new("valgrind");
        c.args([
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
            "--show-leak-kinds=definite",
            "--num-callers=30",
        ]);
        c.arg(format!("--suppressions={}", root().join("tests/c/valgrind.supp").display()));
        c.arg(&binary);
        c
    } else {
        Command::new(&binary)
    };
    command
        .arg(root().join("models/tiny-zimage"))
        .arg(&p.cases_file)
        .arg(&p.folder_manifest)
        .arg(&p.mismatched_package)
        .arg(root().join("models/tiny-qwen3-enhancer"))
        .arg(&p.enhancer_cases_file)
        .arg(max_cases)
        .env("ZIMAGE_TEST_LORA_CASES", &p.lora_cases_file)
        .env("ZIMAGE_TEST_EDIT_CASES", &p.edit_cases_file)
        .env("ZIMAGE_TEST_EDIT_LORA_CASES", &p.edit_lora_cases_file)
        .env("ZIMAGE_TEST_OMNI_PACKAGE", root().join("models/tiny-zimage-omni"))
        .env("ZIMAGE_TEST_CONTROLNET_CASES", &p.controlnet_cases_file)
        .env("ZIMAGE_TEST_TILING_CASE", &p.tiling_case_file)
        .env("ZIMAGE_TEST_WRONG_LORA", root().join("tests/golden/tiny-zimage-alt/loras/peft.safetensors"))
        .env("ZIMAGE_TEST_BASE_PACKAGE", root().join("models/tiny-zimage-base"))
        .current_dir(root());
    let result = command.output().unwrap_or_else(|e| panic!("running {}: {e}", binary.display()));
    let stdout = String::from_utf8_lossy(&result.stdout);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{name} failed ({}):\n{stdout}\n{stderr}", result.status);
    print!("{stdout}");
    if valgrind() {
        // The summary lines, for the log of scripts/test-c.sh.
        for line in stderr.lines().filter(|l| l.contains("ERROR SUMMARY") || l.contains("definitely lost")) {
            println!("{name}: {line}");
        }
    }
}

#[test]
fn c_client_shared() {
    run("c-shared", Language::C, Linking::Shared);
}

#[test]
fn c_client_static() {
    run("c-static", Language::C, Linking::Static);
}

#[test]
fn cpp_client_shared() {
    run("cpp-shared", Language::Cpp, Linking::Shared);
}

#[test]
fn cpp_client_static() {
    run("cpp-static", Language::Cpp, Linking::Static);
}
