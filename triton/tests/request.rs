//! Input tensors → the SDK request, and the IMAGE output's layout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use triton_zimage::interface::{self, DataType, INPUTS, OUTPUTS};
use triton_zimage::request::{
    build_edit_request, build_request, bytes_element, image_output, is_edit, InputError, Limits, Tensor,
};
use zimage::{image_io, GenerationDefaults, InitImage, Manifest, Prompt, RgbImage};

const LIMITS: Limits =
    Limits { max_prompt_bytes: 64, max_count: 4, controlnet: false, size_multiple: 16, max_references: 8 };

fn turbo() -> GenerationDefaults {
    GenerationDefaults::default()
}

fn text(s: &str) -> Tensor {
    Tensor { data_type: DataType::Bytes, shape: vec![1], data: bytes_element(s) }
}

fn i32s(v: i32) -> Tensor {
    Tensor { data_type: DataType::Int32, shape: vec![1], data: v.to_le_bytes().to_vec() }
}

fn f32s(v: f32) -> Tensor {
    Tensor { data_type: DataType::Fp32, shape: vec![1], data: v.to_le_bytes().to_vec() }
}

fn f64s(v: f64) -> Tensor {
    Tensor { data_type: DataType::Fp64, shape: vec![1], data: v.to_le_bytes().to_vec() }
}

fn u64s(v: u64) -> Tensor {
    Tensor { data_type: DataType::Uint64, shape: vec![1], data: v.to_le_bytes().to_vec() }
}

fn pixels(h: usize, w: usize, c: usize) -> Tensor {
    let mut shape = vec![h as i64, w as i64];
    if c > 0 {
        shape.push(c as i64);
    }
    let n = h * w * c.max(1);
    Tensor { data_type: DataType::Uint8, shape, data: (0..n).map(|i| (i * 7 % 256) as u8).collect() }
}

fn inputs(items: &[(&str, Tensor)]) -> HashMap<String, Tensor> {
    items.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn refused(items: &[(&str, Tensor)]) -> String {
    let InputError(message) = build_request(&mut inputs(items), &LIMITS, &turbo()).expect_err("must be refused");
    message
}

#[test]
fn a_full_text_to_image_request() {
    let request = build_request(
        &mut inputs(&[
            ("PROMPT", text("a red fox")),
            ("NEGATIVE_PROMPT", text("blurry")),
            ("WIDTH", i32s(96)),
            ("HEIGHT", i32s(64)),
            ("STEPS", i32s(3)),
            ("GUIDANCE", f32s(2.5)),
            ("SEED", u64s(u64::MAX)),
            ("COUNT", i32s(2)),
        ]),
        &LIMITS,
        &turbo(),
    )
    .unwrap();
    assert!(matches!(&request.prompt, Prompt::Text(t) if t == "a red fox"));
    assert!(matches!(&request.negative_prompt, Some(Prompt::Text(t)) if t == "blurry"));
    assert_eq!((request.width, request.height, request.steps, request.count), (96, 64, 3, 2));
    assert_eq!(request.guidance_scale, 2.5);
    assert_eq!(request.seed, Some(u64::MAX));
    assert!(request.init_image.is_none());
}

#[test]
fn defaults_are_the_sdks() {
    let request = build_request(&mut inputs(&[("PROMPT", text(""))]), &LIMITS, &turbo()).unwrap();
    let default = zimage::GenerateRequest::default();
    assert_eq!((request.width, request.height, request.steps, request.count), (1024, 1024, default.steps, 1));
    assert_eq!(request.guidance_scale, default.guidance_scale);
    assert_eq!(request.seed, None);
    assert!(request.negative_prompt.is_none());
}

#[test]
fn left_out_inputs_take_the_models_recommended_settings() {
    let base: GenerationDefaults = serde_json::from_str(
        r#"{"variant": "base", "steps": 50, "guidance_scale": 4.0, "cfg_normalization": 0.25, "cfg_truncation": 0.8}"#,
    )
    .unwrap();
    let r = build_request(&mut inputs(&[("PROMPT", text("x"))]), &LIMITS, &base).unwrap();
    assert_eq!((r.steps, r.guidance_scale, r.cfg_normalization, r.cfg_truncation), (50, 4.0, 0.25, 0.8));
    let r = build_request(
        &mut inputs(&[("PROMPT", text("x")), ("STEPS", i32s(12)), ("GUIDANCE", f32s(0.0))]),
        &LIMITS,
        &base,
    )
    .unwrap();
    assert_eq!((r.steps, r.guidance_scale), (12, 0.0));
}

/// The init image sets the output size without WIDTH/HEIGHT; either way it goes to the
/// pipeline as sent (the pipeline checks the request, then resizes it).
#[test]
fn an_init_image_sets_the_size_and_is_passed_as_sent() {
    let image = pixels(32, 48, 3);
    let request =
        build_request(&mut inputs(&[("PROMPT", text("x")), ("INIT_IMAGE", image.clone())]), &LIMITS, &turbo()).unwrap();
    assert_eq!((request.width, request.height), (48, 32));
    let init = request.init_image.unwrap();
    assert_eq!(init.strength, InitImage::DEFAULT_STRENGTH);
    assert_eq!((init.image.width, init.image.height), (48, 32));
    assert_eq!(init.image.pixels, image.data);

    let request = build_request(
        &mut inputs(&[("PROMPT", text("x")), ("INIT_IMAGE", image.clone()), ("WIDTH", i32s(64)), ("HEIGHT", i32s(64))]),
        &LIMITS,
        &turbo(),
    )
    .unwrap();
    assert_eq!((request.width, request.height), (64, 64));
    let init = request.init_image.unwrap();
    assert_eq!((init.image.width, init.image.height, &init.image.pixels), (48, 32, &image.data));
}

/// A 1 x 1 picture asking for 16384 x 16384: the request holds the 3 bytes sent, and the
/// model's check refuses the size before anything is resized (the backend used to resize
/// first: gigabytes for one small request).
#[test]
fn a_small_picture_with_a_huge_size_is_refused_before_any_resize() {
    let dir = root().join("models/tiny-zimage");
    let manifest = Manifest::read(&dir).unwrap();
    let huge = [("WIDTH", i32s(16384)), ("HEIGHT", i32s(16384))];
    let mut items = vec![("PROMPT", text("x")), ("INIT_IMAGE", pixels(1, 1, 3)), ("MASK", pixels(1, 1, 0))];
    items.extend_from_slice(&huge);
    let request = build_request(&mut inputs(&items), &LIMITS, &turbo()).unwrap();
    let init = request.init_image.as_ref().unwrap();
    assert_eq!((init.image.pixels.len(), init.mask.as_ref().unwrap().pixels.len()), (3, 1));
    let e = zimage::pipeline::check_request(&request, &manifest).unwrap_err().to_string();
    assert!(e.contains("width 16384 exceeds this model's limit"), "{e}");

    let mut items =
        vec![("PROMPT", text("x")), ("CONTROL_IMAGE", pixels(1, 1, 3)), ("CONTROL_PREPROCESS", text("canny"))];
    items.extend_from_slice(&huge);
    let request = with_controlnet(&items).unwrap();
    let control = request.control.as_ref().unwrap();
    assert_eq!((control.image.width, control.image.height), (1, 1), "not resized, not preprocessed");
    assert!(zimage::pipeline::check_request(&request, &manifest).is_err());
}

/// Picture inputs are refused above 16384 pixels on a side (the SDK's MAX_INPUT_SIDE), with
/// the input's name: a 1 x 20,000,000 picture would otherwise be resized.
#[test]
fn a_picture_side_above_the_limit_is_refused() {
    assert_eq!(zimage::limits::MAX_INPUT_SIDE, 16384);
    let long =
        [("INIT_IMAGE", pixels(1, 16385, 3)), ("MASK", pixels(16385, 1, 0)), ("CONTROL_IMAGE", pixels(1, 16385, 3))];
    for (name, picture) in long {
        let mut items = vec![("PROMPT", text("x")), (name, picture)];
        if name == "MASK" {
            items.push(("INIT_IMAGE", pixels(1, 1, 3)));
        }
        let e = with_controlnet(&items).unwrap_err().0;
        assert!(e.starts_with(&format!("{name} is ")), "{e}");
        assert!(e.ends_with("input pictures may be at most 16384 pixels on a side"), "{e}");
    }
    let e = refused(&[("PROMPT", text("x")), ("INIT_IMAGE", pixels(1, 16385, 3))]);
    assert_eq!(
        e,
        "INIT_IMAGE is 16385 x 1 pixels (shape [1, 16385, 3]); input pictures may be at most 16384 pixels on a side"
    );
    // 16384 itself is a valid side.
    let request = build_request(
        &mut inputs(&[
            ("PROMPT", text("x")),
            ("INIT_IMAGE", pixels(1, 16384, 3)),
            ("WIDTH", i32s(64)),
            ("HEIGHT", i32s(64)),
        ]),
        &LIMITS,
        &turbo(),
    )
    .unwrap();
    assert_eq!(request.init_image.unwrap().image.width, 16384);
}

/// The byte caps the backend checks before it copies an input out of Triton's buffers.
#[test]
fn each_input_has_a_byte_cap_checked_before_its_copy() {
    let side = 16384u64;
    let caps: Vec<(&str, Option<u64>)> = INPUTS.iter().map(|t| (t.name, LIMITS.max_input_bytes(t.name))).collect();
    assert_eq!(
        caps,
        [
            ("PROMPT", Some(4 + 64)),
            ("NEGATIVE_PROMPT", Some(4 + 64)),
            ("WIDTH", Some(4)),
            ("HEIGHT", Some(4)),
            ("STEPS", Some(4)),
            ("GUIDANCE", Some(4)),
            ("CFG_NORMALIZATION", Some(4)),
            ("CFG_TRUNCATION", Some(4)),
            ("SEED", Some(8)),
            ("COUNT", Some(4)),
            ("INIT_IMAGE", Some(side * side * 3)),
            ("MASK", Some(side * side)),
            ("STRENGTH", Some(8)),
            ("CONTROL_IMAGE", Some(side * side * 3)),
            ("CONTROL_SCALE", Some(4)),
            ("CONTROL_PREPROCESS", Some(4 + 64)),
            ("REFERENCE_IMAGES", Some(8 * (4 + (256 << 20)))),
        ]
    );
    assert_eq!(LIMITS.max_input_bytes("LORA"), None);
    assert_eq!(LIMITS.check_input_size("LORA", 1).unwrap_err().0, "unknown input LORA");
    // At the cap is accepted, one byte over is refused with the input's name.
    for (name, cap) in caps {
        let cap = cap.unwrap();
        LIMITS.check_input_size(name, cap).unwrap();
        let InputError(e) = LIMITS.check_input_size(name, cap + 1).unwrap_err();
        assert!(e.starts_with(&format!("input {name} is {} bytes; this model takes at most {cap} (", cap + 1)), "{e}");
    }
    // A several-gigabyte prompt through shared memory: refused from its declared size.
    assert_eq!(
        LIMITS.check_input_size("PROMPT", 5 << 30).unwrap_err().0,
        "input PROMPT is 5368709120 bytes; this model takes at most 68 (a 4-byte length, then at most 64 bytes of \
         text: parameter max_prompt_bytes)"
    );
    assert_eq!(
        LIMITS.check_input_size("INIT_IMAGE", 4 << 30).unwrap_err().0,
        "input INIT_IMAGE is 4294967296 bytes; this model takes at most 805306368 (RGB, at most 16384 x 16384 pixels)"
    );
    // A model that does not edit takes no reference at all (an empty REFERENCE_IMAGES is
    // still its own error, from the request).
    let no_edit = Limits { max_references: 0, ..LIMITS };
    no_edit.check_input_size("REFERENCE_IMAGES", 0).unwrap();
    let InputError(e) = no_edit.check_input_size("REFERENCE_IMAGES", 100).unwrap_err();
    assert!(e.contains("does not support editing"), "{e}");
}

#[test]
fn inpainting_takes_the_mask_and_its_default_strength() {
    let request = build_request(
        &mut inputs(&[("PROMPT", text("x")), ("INIT_IMAGE", pixels(16, 32, 3)), ("MASK", pixels(16, 32, 0))]),
        &LIMITS,
        &turbo(),
    )
    .unwrap();
    let init = request.init_image.unwrap();
    assert_eq!(init.strength, InitImage::DEFAULT_INPAINT_STRENGTH);
    let mask = init.mask.unwrap();
    assert_eq!((mask.width, mask.height, mask.pixels.len()), (32, 16, 512));

    let request = build_request(
        &mut inputs(&[("PROMPT", text("x")), ("INIT_IMAGE", pixels(16, 32, 3)), ("STRENGTH", f64s(0.35))]),
        &LIMITS,
        &turbo(),
    )
    .unwrap();
    assert_eq!(request.init_image.unwrap().strength, 0.35);
}

#[test]
fn bad_inputs_are_refused_with_the_reason() {
    assert_eq!(refused(&[("WIDTH", i32s(64))]), "the input PROMPT is required");
    assert_eq!(refused(&[("PROMPT", text("x")), ("WIDTH", i32s(-64))]), "WIDTH must be positive (got -64)");
    assert_eq!(refused(&[("PROMPT", text("x")), ("STEPS", i32s(0))]), "STEPS must be positive (got 0)");
    assert_eq!(
        refused(&[("PROMPT", text("x")), ("COUNT", i32s(5))]),
        "COUNT is 5; this model serves at most 4 (parameter max_count)"
    );
    assert_eq!(
        refused(&[("PROMPT", text(&"a".repeat(65)))]),
        "PROMPT is 65 bytes long; this model accepts at most 64 (parameter max_prompt_bytes)"
    );
    assert!(build_request(&mut inputs(&[("PROMPT", text(&"a".repeat(64)))]), &LIMITS, &turbo()).is_ok());
    assert_eq!(
        refused(&[("PROMPT", text("x")), ("NEGATIVE_PROMPT", text(&"b".repeat(100)))]),
        "NEGATIVE_PROMPT is 100 bytes long; this model accepts at most 64 (parameter max_prompt_bytes)"
    );
    assert_eq!(
        refused(&[("PROMPT", text("x")), ("GUIDANCE", f32s(f32::NAN))]),
        "GUIDANCE must be a finite number (got NaN)"
    );
    assert_eq!(
        refused(&[("PROMPT", text("x")), ("GUIDANCE", f32s(f32::INFINITY))]),
        "GUIDANCE must be a finite number (got inf)"
    );
    assert_eq!(
        refused(&[("PROMPT", text("x")), ("INIT_IMAGE", pixels(8, 8, 3)), ("STRENGTH", f64s(f64::NAN))]),
        "STRENGTH must be within 0..1 (got NaN)"
    );
    assert_eq!(refused(&[("PROMPT", text("x")), ("MASK", pixels(8, 8, 0))]), "MASK needs INIT_IMAGE");
    assert_eq!(refused(&[("PROMPT", text("x")), ("STRENGTH", f64s(0.5))]), "STRENGTH needs INIT_IMAGE");
    assert_eq!(
        refused(&[("PROMPT", text("x")), ("INIT_IMAGE", pixels(8, 8, 4))]),
        "INIT_IMAGE must be [H, W, 3] RGB (got shape [8, 8, 4])"
    );
    assert_eq!(
        refused(&[("PROMPT", text("x")), ("INIT_IMAGE", pixels(8, 8, 0))]),
        "INIT_IMAGE must have 3 dimensions (got shape [8, 8])"
    );
}

#[test]
fn malformed_tensors_are_refused() {
    // A BYTES element whose length prefix disagrees with the buffer.
    let mut short = text("hello");
    short.data.truncate(6);
    assert_eq!(refused(&[("PROMPT", short)]), "PROMPT: BYTES element of 5 bytes in a buffer of 6");
    let empty = Tensor { data_type: DataType::Bytes, shape: vec![1], data: vec![] };
    assert_eq!(refused(&[("PROMPT", empty)]), "PROMPT: BYTES element without its length");
    let two =
        Tensor { data_type: DataType::Bytes, shape: vec![2], data: [bytes_element("a"), bytes_element("b")].concat() };
    assert_eq!(refused(&[("PROMPT", two)]), "PROMPT must hold one string (shape [2])");
    let latin1 = Tensor { data_type: DataType::Bytes, shape: vec![1], data: vec![1, 0, 0, 0, 0xff] };
    assert_eq!(refused(&[("PROMPT", latin1)]), "PROMPT is not UTF-8");
    // Types and sizes (Triton checks them too; the backend does not rely on it).
    assert_eq!(refused(&[("PROMPT", text("x")), ("WIDTH", f32s(64.0))]), "input WIDTH must be INT32 (got FP32)");
    let wrong_size = Tensor { data_type: DataType::Int32, shape: vec![1], data: vec![0; 8] };
    assert_eq!(
        refused(&[("PROMPT", text("x")), ("WIDTH", wrong_size)]),
        "input WIDTH: shape [1] does not match its 8 bytes"
    );
    let two_values = Tensor { data_type: DataType::Int32, shape: vec![2], data: vec![0; 8] };
    assert_eq!(refused(&[("PROMPT", text("x")), ("WIDTH", two_values)]), "WIDTH must hold one value (shape [2])");
    let negative = Tensor { data_type: DataType::Uint8, shape: vec![-1, 4, 3], data: vec![] };
    assert_eq!(
        refused(&[("PROMPT", text("x")), ("INIT_IMAGE", negative)]),
        "input INIT_IMAGE: shape [-1, 4, 3] does not match its 0 bytes"
    );
    assert_eq!(refused(&[("PROMPT", text("x")), ("LORA", i32s(1))]), "unknown input LORA");
}

#[test]
fn the_image_output_is_n_h_w_3() {
    let a = RgbImage { width: 3, height: 2, pixels: (0..18).collect() };
    let b = RgbImage { width: 3, height: 2, pixels: (100..118).collect() };
    let (shape, bytes) = image_output(&[a.clone(), b.clone()]).unwrap();
    assert_eq!(shape, [2, 2, 3, 3]);
    assert_eq!(bytes, [a.pixels.clone(), b.pixels].concat());
    assert!(image_output(&[]).is_err());
    let other = RgbImage { width: 2, height: 3, pixels: vec![0; 18] };
    assert_eq!(image_output(&[a, other]).unwrap_err(), "the pipeline returned images of different sizes");
}

#[test]
fn the_tensor_table_is_consistent() {
    let names: Vec<&str> = INPUTS.iter().map(|t| t.name).collect();
    assert_eq!(
        names,
        [
            "PROMPT",
            "NEGATIVE_PROMPT",
            "WIDTH",
            "HEIGHT",
            "STEPS",
            "GUIDANCE",
            "CFG_NORMALIZATION",
            "CFG_TRUNCATION",
            "SEED",
            "COUNT",
            "INIT_IMAGE",
            "MASK",
            "STRENGTH",
            "CONTROL_IMAGE",
            "CONTROL_SCALE",
            "CONTROL_PREPROCESS",
            "REFERENCE_IMAGES"
        ]
    );
    assert_eq!(INPUTS.iter().filter(|t| !t.optional).map(|t| t.name).collect::<Vec<_>>(), ["PROMPT"]);
    assert_eq!(OUTPUTS.iter().map(|t| t.name).collect::<Vec<_>>(), ["IMAGE", "SEED"]);
    assert_eq!(interface::output_spec("IMAGE").unwrap().dims, [-1, -1, -1, 3]);
    for spec in INPUTS.iter().chain(OUTPUTS) {
        assert_eq!(DataType::from_code(spec.data_type.code()), Some(spec.data_type));
    }
    // The values of TRITONSERVER_DataType in tritonserver.h (r24.10).
    let codes: Vec<(DataType, u32)> =
        [DataType::Uint8, DataType::Uint64, DataType::Int32, DataType::Fp32, DataType::Fp64, DataType::Bytes]
            .into_iter()
            .map(|d| (d, d.code()))
            .collect();
    assert_eq!(
        codes,
        [
            (DataType::Uint8, 2),
            (DataType::Uint64, 5),
            (DataType::Int32, 8),
            (DataType::Fp32, 11),
            (DataType::Fp64, 12),
            (DataType::Bytes, 13)
        ]
    );
}

const WITH_CONTROLNET: Limits = Limits { controlnet: true, ..LIMITS };

fn with_controlnet(items: &[(&str, Tensor)]) -> Result<zimage::GenerateRequest, InputError> {
    build_request(&mut inputs(items), &WITH_CONTROLNET, &turbo())
}

/// CONTROL_IMAGE is a ControlNet condition at the output size (which it sets without
/// WIDTH/HEIGHT), with its scale and preprocessing; with INIT_IMAGE and MASK it is ControlNet
/// inpainting, as `zimage generate --controlnet --init-image --mask`.
#[test]
fn control_inputs_make_a_controlnet_condition() {
    let request = with_controlnet(&[("PROMPT", text("a house")), ("CONTROL_IMAGE", pixels(48, 80, 3))]).unwrap();
    assert_eq!((request.width, request.height), (80, 48));
    let control = request.control.as_ref().unwrap();
    assert_eq!(control.conditioning_scale, zimage::ControlCondition::DEFAULT_SCALE);
    assert_eq!((control.image.width, control.image.height), (80, 48));
    assert_eq!(control.image.pixels, pixels(48, 80, 3).data, "same size and no preprocessing: the map as sent");
    assert!(control.inpaint.is_none() && request.init_image.is_none());

    let request = with_controlnet(&[
        ("PROMPT", text("a house")),
        ("CONTROL_IMAGE", pixels(48, 80, 3)),
        ("WIDTH", i32s(64)),
        ("HEIGHT", i32s(64)),
        ("CONTROL_SCALE", f32s(0.5)),
        ("CONTROL_PREPROCESS", text("canny")),
    ])
    .unwrap();
    assert_eq!((request.width, request.height), (64, 64));
    let control = request.control.as_ref().unwrap();
    // The pipeline resizes the picture and finds its edges after checking the request.
    assert_eq!((control.image.width, control.image.height), (80, 48));
    assert_eq!(control.image.pixels, pixels(48, 80, 3).data);
    assert_eq!(control.preprocess, zimage::ControlPreprocess::CANNY_DEFAULT);
    assert_eq!(control.conditioning_scale, 0.5);

    let request = with_controlnet(&[
        ("PROMPT", text("a window")),
        ("CONTROL_IMAGE", pixels(64, 64, 3)),
        ("INIT_IMAGE", pixels(32, 32, 3)),
        ("MASK", pixels(32, 32, 0)),
    ])
    .unwrap();
    assert_eq!((request.width, request.height), (32, 32), "INIT_IMAGE sizes the output first");
    assert!(request.init_image.is_none(), "ControlNet inpainting starts from noise");
    let control = request.control.as_ref().unwrap();
    assert_eq!(control.image.pixels, pixels(64, 64, 3).data, "resized by the pipeline");
    let inpaint = control.inpaint.as_ref().expect("ControlNet inpainting");
    assert_eq!(inpaint.image.pixels, pixels(32, 32, 3).data);
    assert_eq!(inpaint.mask.pixels, pixels(32, 32, 0).data);
}

#[test]
fn bad_control_inputs_are_refused_with_the_reason() {
    let base = [("PROMPT", text("x")), ("CONTROL_IMAGE", pixels(32, 32, 3))];
    let refused_with = |extra: &[(&str, Tensor)]| -> String {
        let mut items: Vec<(&str, Tensor)> = base.to_vec();
        items.extend_from_slice(extra);
        with_controlnet(&items).expect_err("must be refused").0
    };
    assert!(refused(&base).contains("parameter controlnet"));
    assert!(refused_with(&[("INIT_IMAGE", pixels(32, 32, 3))]).contains("needs MASK"));
    let m = refused_with(&[("INIT_IMAGE", pixels(32, 32, 3)), ("MASK", pixels(32, 32, 0)), ("STRENGTH", f64s(0.5))]);
    assert!(m.contains("STRENGTH does not apply"), "{m}");
    assert!(refused_with(&[("STRENGTH", f64s(0.5))]).contains("STRENGTH needs INIT_IMAGE"));
    assert!(refused_with(&[("CONTROL_SCALE", f32s(f32::NAN))]).contains("finite"));
    assert!(refused_with(&[("CONTROL_PREPROCESS", text("sobel"))]).contains("CONTROL_PREPROCESS"));
    assert!(refused(&[("PROMPT", text("x")), ("CONTROL_SCALE", f32s(0.5))]).contains("needs CONTROL_IMAGE"));
    assert!(refused(&[("PROMPT", text("x")), ("CONTROL_PREPROCESS", text("canny"))]).contains("needs CONTROL_IMAGE"));
    let m = with_controlnet(&[("PROMPT", text("x")), ("CONTROL_IMAGE", pixels(32, 32, 0))]).unwrap_err().0;
    assert!(m.contains("CONTROL_IMAGE must have 3 dimensions"), "{m}");
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A BYTES tensor of encoded files, one element each.
fn files(contents: &[Vec<u8>]) -> Tensor {
    let mut data = Vec::new();
    for file in contents {
        data.extend_from_slice(&(file.len() as u32).to_le_bytes());
        data.extend_from_slice(file);
    }
    Tensor { data_type: DataType::Bytes, shape: vec![contents.len() as i64], data }
}

fn reference_file(name: &str) -> Vec<u8> {
    std::fs::read(root().join("tests/golden/tiny-zimage-omni/inputs").join(name)).unwrap()
}

fn omni() -> (Manifest, PathBuf) {
    let dir = root().join("models/tiny-zimage-omni");
    (Manifest::read(&dir).unwrap(), dir)
}

fn edit_refused(items: &[(&str, Tensor)]) -> String {
    let (manifest, dir) = omni();
    let InputError(message) =
        build_edit_request(&inputs(items), &LIMITS, &manifest, &dir).expect_err("must be refused");
    message
}

#[test]
fn reference_images_make_an_edit_with_the_packages_defaults() {
    let (manifest, dir) = omni();
    let (a, b) = (reference_file("ref_80x128.png"), reference_file("ref_100x70.png"));
    let items = inputs(&[
        ("PROMPT", text("make it night")),
        ("NEGATIVE_PROMPT", text("blurry")),
        ("SEED", u64s(2)),
        ("COUNT", i32s(2)),
        ("CFG_NORMALIZATION", f32s(1.3)),
        ("CFG_TRUNCATION", f32s(0.7)),
        ("REFERENCE_IMAGES", files(&[a.clone(), b.clone()])),
    ]);
    assert!(is_edit(&items));
    let request = build_edit_request(&items, &LIMITS, &manifest, &dir).unwrap();
    assert_eq!(request.prompt, "make it night");
    assert_eq!(request.negative_prompt.as_deref(), Some("blurry"));
    assert_eq!(request.images, [image_io::decode_rgb(&a).unwrap(), image_io::decode_rgb(&b).unwrap()]);
    assert_eq!((request.images[0].width, request.images[0].height), (80, 128));
    assert_eq!((request.width, request.height), (None, None));
    // Left out: the package's editing defaults (50 steps, guidance 5 for Omni).
    assert_eq!((request.steps, request.guidance_scale), (None, None));
    assert_eq!((request.seed, request.count), (Some(2), 2));
    assert_eq!((request.cfg_normalization, request.cfg_truncation), (1.3, Some(0.7)));

    let items = inputs(&[
        ("PROMPT", text("")),
        ("WIDTH", i32s(64)),
        ("HEIGHT", i32s(80)),
        ("STEPS", i32s(4)),
        ("GUIDANCE", f32s(0.0)),
        ("REFERENCE_IMAGES", files(&[a])),
    ]);
    let request = build_edit_request(&items, &LIMITS, &manifest, &dir).unwrap();
    assert_eq!(
        (request.width, request.height, request.steps, request.guidance_scale),
        (Some(64), Some(80), Some(4), Some(0.0))
    );
    assert_eq!((request.count, request.cfg_truncation), (1, None));

    // No reference (shape [0]): ZImageOmniPipeline's text-to-image, at WIDTH x HEIGHT.
    let items = inputs(&[
        ("PROMPT", text("a lighthouse")),
        ("WIDTH", i32s(96)),
        ("HEIGHT", i32s(64)),
        ("REFERENCE_IMAGES", files(&[])),
    ]);
    assert!(is_edit(&items));
    let request = build_edit_request(&items, &LIMITS, &manifest, &dir).unwrap();
    assert!(request.images.is_empty());
    assert_eq!((request.width, request.height), (Some(96), Some(64)));
}

#[test]
fn bad_edits_are_refused_before_decoding() {
    let a = reference_file("ref_96x64.png");
    let refs = || files(std::slice::from_ref(&a));
    let e = edit_refused(&[("PROMPT", text("x")), ("REFERENCE_IMAGES", refs()), ("INIT_IMAGE", pixels(16, 16, 3))]);
    assert!(e.starts_with("INIT_IMAGE does not apply to an edit"), "{e}");
    let e = edit_refused(&[("PROMPT", text("x")), ("REFERENCE_IMAGES", refs()), ("CONTROL_SCALE", f32s(0.5))]);
    assert!(e.starts_with("CONTROL_SCALE does not apply to an edit"), "{e}");
    let e = edit_refused(&[("PROMPT", text("x")), ("REFERENCE_IMAGES", refs()), ("WIDTH", i32s(64))]);
    assert_eq!(e, "give both WIDTH and HEIGHT, or neither (the last reference's size; 1024 x 1024 without references)");
    let e = edit_refused(&[("REFERENCE_IMAGES", refs())]);
    assert_eq!(e, "the input PROMPT is required");
    let e = edit_refused(&[("PROMPT", text("x")), ("REFERENCE_IMAGES", files(&vec![a.clone(); 9]))]);
    assert!(e.contains("9 reference images: this model takes at most 8"), "{e}");
    // An empty shape with bytes in it is malformed, not an edit without references.
    let mut stray = files(&[]);
    stray.data = vec![0; 4];
    let e = edit_refused(&[("PROMPT", text("x")), ("REFERENCE_IMAGES", stray)]);
    assert_eq!(e, "REFERENCE_IMAGES holds no element");
    let e = edit_refused(&[("PROMPT", text("x")), ("REFERENCE_IMAGES", files(&[b"not a picture".to_vec()]))]);
    assert!(e.starts_with("REFERENCE_IMAGES: "), "{e}");
    let e = edit_refused(&[("PROMPT", text("x")), ("CFG_TRUNCATION", f32s(f32::NAN)), ("REFERENCE_IMAGES", refs())]);
    assert_eq!(e, "CFG_TRUNCATION must be a finite number (got NaN)");

    // BYTES that do not add up: an element longer than the buffer, bytes left over, a shape
    // that promises more elements than sent.
    let mut short = refs();
    short.data.truncate(short.data.len() - 1);
    let e = edit_refused(&[("PROMPT", text("x")), ("REFERENCE_IMAGES", short)]);
    assert!(e.contains("element 0 of") && e.contains("runs past"), "{e}");
    let mut long = refs();
    long.data.push(0);
    let e = edit_refused(&[("PROMPT", text("x")), ("REFERENCE_IMAGES", long)]);
    assert_eq!(e, "REFERENCE_IMAGES: 1 bytes after its 1 element(s)");
    let mut two = refs();
    two.shape = vec![2];
    let e = edit_refused(&[("PROMPT", text("x")), ("REFERENCE_IMAGES", two)]);
    assert_eq!(e, "REFERENCE_IMAGES: element 1 without its length");
    // A shape of more elements than the model takes is refused before any is parsed (millions
    // of empty elements, within the byte cap, made a list that aborted the server).
    let mut many = refs();
    many.shape = vec![100_000_000];
    let e = edit_refused(&[("PROMPT", text("x")), ("REFERENCE_IMAGES", many)]);
    assert!(e.ends_with("100000000 reference images: this model takes at most 8"), "{e}");

    // A package that does not edit, and a generation asked to take references.
    let dir = root().join("models/tiny-zimage");
    let manifest = Manifest::read(&dir).unwrap();
    let mut items = inputs(&[("PROMPT", text("x")), ("REFERENCE_IMAGES", refs())]);
    let InputError(e) = build_edit_request(&items, &LIMITS, &manifest, &dir).unwrap_err();
    assert!(e.contains("does not support editing"), "{e}");
    let InputError(e) = build_request(&mut items, &LIMITS, &turbo()).unwrap_err();
    assert!(e.starts_with("REFERENCE_IMAGES makes an edit"), "{e}");
}

#[test]
fn cfg_inputs_reach_a_generation() {
    let request = build_request(
        &mut inputs(&[("PROMPT", text("x")), ("CFG_NORMALIZATION", f32s(1.5)), ("CFG_TRUNCATION", f32s(0.25))]),
        &LIMITS,
        &turbo(),
    )
    .unwrap();
    assert_eq!((request.cfg_normalization, request.cfg_truncation), (1.5, 0.25));
    let request = build_request(&mut inputs(&[("PROMPT", text("x"))]), &LIMITS, &turbo()).unwrap();
    assert_eq!((request.cfg_normalization, request.cfg_truncation), (0.0, 1.0));
    assert_eq!(
        refused(&[("PROMPT", text("x")), ("CFG_NORMALIZATION", f32s(f32::INFINITY))]),
        "CFG_NORMALIZATION must be a finite number (got inf)"
    );
}
