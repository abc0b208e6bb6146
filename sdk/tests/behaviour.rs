//! Behaviour on the tiny package that a caller relies on: typed errors for every kind of
//! bad input, cancellation, encode-once prompts, and sharing one pipeline between threads.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use zimage::{Device, ErrorKind, GenerateRequest, GraphKind, InitImage, LoadOptions, Pipeline, Prompt};

fn small(prompt: &str) -> GenerateRequest {
    let mut r = GenerateRequest::new(prompt);
    r.width = 64;
    r.height = 64;
    r.steps = 3;
    r.seed = Some(7);
    r.return_latents = true;
    r
}

fn kind_of(result: zimage::Result<impl Sized>) -> ErrorKind {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.kind(),
    }
}

/// A change made to a request, or to a manifest, by one case of a table test.
type RequestChange = Box<dyn Fn(&mut GenerateRequest)>;
type ManifestChange = Box<dyn Fn(&mut serde_json::Value)>;

#[test]
fn invalid_requests_are_refused_with_their_kind() {
    let p = pipeline("tiny-zimage");
    let cases: Vec<(&str, RequestChange)> = vec![
        ("width not a multiple of 16", Box::new(|r| r.width = 72)),
        ("zero height", Box::new(|r| r.height = 0)),
        ("beyond the RoPE limit", Box::new(|r| r.width = 16 * 4096)),
        ("zero steps", Box::new(|r| r.steps = 0)),
        ("too many steps", Box::new(|r| r.steps = 1001)),
        ("NaN guidance", Box::new(|r| r.guidance_scale = f32::NAN)),
        ("infinite truncation", Box::new(|r| r.cfg_truncation = f32::INFINITY)),
        ("negative guidance", Box::new(|r| r.guidance_scale = -1.0)),
        ("guidance above its bound", Box::new(|r| r.guidance_scale = 100.5)),
        ("extreme guidance", Box::new(|r| r.guidance_scale = 1e38)),
        ("cfg_normalization above its bound", Box::new(|r| r.cfg_normalization = 100.5)),
        ("negative cfg_normalization", Box::new(|r| r.cfg_normalization = -0.5)),
        ("negative cfg_truncation", Box::new(|r| r.cfg_truncation = -0.1)),
        ("zero images", Box::new(|r| r.count = 0)),
        ("65 images", Box::new(|r| r.count = 65)),
        (
            // Each within its cap, 4 GiB of latents together (the process aborted).
            "64 images of 8192x8192",
            Box::new(|r| (r.count, r.width, r.height) = (64, 8192, 8192)),
        ),
        ("2 images of 8192x8192", Box::new(|r| (r.count, r.width, r.height) = (2, 8192, 8192))),
        ("65 images of 1024x1024", Box::new(|r| (r.count, r.width, r.height) = (65, 1024, 1024))),
        ("max_sequence_length 0", Box::new(|r| r.max_sequence_length = Some(0))),
        (
            "caption over the model's position limit",
            Box::new(|r| {
                r.prompt = Prompt::Text("word ".repeat(2000));
                r.max_sequence_length = Some(5000);
            }),
        ),
        ("prompt over 1 MiB", Box::new(|r| r.prompt = Prompt::Text("a".repeat(zimage::MAX_PROMPT_BYTES + 1)))),
        (
            "negative prompt over 1 MiB",
            Box::new(|r| {
                r.guidance_scale = 2.0;
                r.negative_prompt = Some(Prompt::Text("a".repeat(zimage::MAX_PROMPT_BYTES + 1)));
            }),
        ),
        ("latents of the wrong shape", Box::new(|r| r.latents = Some(ndarray::Array4::zeros((1, 16, 4, 4))))),
        ("non-finite latents", Box::new(|r| r.latents = Some(ndarray::Array4::from_elem((1, 16, 8, 8), f32::NAN)))),
    ];
    // Every refusal is also check_request_prompts' (what a server checks before queueing).
    p.check_request_prompts(&small("a cat")).unwrap();
    for (name, edit) in cases {
        let mut r = small("a cat");
        edit(&mut r);
        assert_eq!(kind_of(p.generate(&r, None)), ErrorKind::InvalidRequest, "{name}");
        let generated = p.generate(&r, None).unwrap_err().to_string();
        let checked = p.check_request_prompts(&r).unwrap_err();
        assert_eq!((checked.kind(), checked.to_string()), (ErrorKind::InvalidRequest, generated), "{name}");
    }
    // The pixel cap is the product's: 64 images of 1024x1024 and one of 8192x8192 are within it.
    for (count, side) in [(64, 1024), (1, 8192)] {
        let mut r = small("a cat");
        (r.count, r.width, r.height) = (count, side, side);
        p.check_request(&r).unwrap();
    }
    let mut r = small("a cat");
    (r.count, r.width, r.height) = (2, 8192, 8192);
    let e = p.check_request(&r).unwrap_err();
    assert!(
        e.to_string().contains("2 images of 8192x8192 are 134217728 pixels; one request makes at most 67108864"),
        "{e}"
    );
    // check_request does not tokenize: the caption limits are check_request_prompts' alone,
    // the negative prompt's under guidance only.
    let mut r = small("a cat");
    r.max_sequence_length = Some(5000);
    r.negative_prompt = Some(Prompt::Text("word ".repeat(2000)));
    p.check_request(&r).unwrap();
    p.check_request_prompts(&r).unwrap();
    r.guidance_scale = 2.0;
    p.check_request(&r).unwrap();
    let e = p.check_request_prompts(&r).unwrap_err();
    assert!(
        e.to_string().contains("the negative prompt has 2009 tokens after truncation; this model takes at most 992"),
        "{e}"
    );
    // The prompt's own refusal names the prompt.
    std::mem::swap(&mut r.prompt, r.negative_prompt.as_mut().unwrap());
    let e = p.check_request_prompts(&r).unwrap_err();
    assert!(e.to_string().contains("the prompt has 2009 tokens after truncation"), "{e}");
}

/// Text past `MAX_PROMPT_BYTES` is refused before it is tokenized (8 MiB took 4-5 s and up to
/// 1 GB to tokenize); a prompt of exactly the limit is tokenized and cut as diffusers cuts it.
#[test]
fn prompts_over_the_byte_limit_are_refused_before_tokenizing() {
    let p = pipeline("tiny-zimage");
    let at_limit = "ab".repeat(zimage::MAX_PROMPT_BYTES / 2);
    let tokens = p.tokenize(&at_limit, None).expect("a prompt of exactly the limit");
    assert_eq!(tokens.ids.len(), 512);
    assert!(tokens.full_length > 512, "{}", tokens.full_length);
    let over = format!("{at_limit}!");
    let err = p.tokenize(&over, None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidRequest);
    assert!(
        err.to_string().contains(
            "the prompt is 1048577 bytes, more than the limit of 1048576 (1 MiB; the text encoder reads only its first \
             max_sequence_length tokens)"
        ),
        "{err}"
    );
    assert_eq!(p.encode_prompt(&over, None).unwrap_err().kind(), ErrorKind::InvalidRequest);
}

#[test]
fn image_to_image_inputs_are_checked() {
    let p = pipeline("tiny-zimage");
    let image = zimage::RgbImage { width: 64, height: 64, pixels: vec![128; 64 * 64 * 3] };
    let with = |init: InitImage| {
        let mut r = small("a cat");
        r.init_image = Some(init);
        p.generate(&r, None)
    };
    let base = InitImage { image: image.clone(), mask: None, strength: 0.5 };
    assert_eq!(kind_of(with(InitImage { strength: 1.5, ..base.clone() })), ErrorKind::InvalidRequest);
    assert_eq!(kind_of(with(InitImage { strength: -0.1, ..base.clone() })), ErrorKind::InvalidRequest);
    assert_eq!(kind_of(with(InitImage { strength: 0.0, ..base.clone() })), ErrorKind::InvalidRequest, "no steps left");
    let short = zimage::RgbImage { width: 64, height: 64, pixels: vec![0; 10] };
    assert_eq!(kind_of(with(InitImage { image: short, ..base.clone() })), ErrorKind::Image);
    let short_mask = zimage::GrayImage { width: 20, height: 30, pixels: vec![255; 599] };
    assert_eq!(kind_of(with(InitImage { mask: Some(short_mask), ..base.clone() })), ErrorKind::Image);
    // A side longer than any input may have is refused before resizing (a 1 x 20,000,000
    // picture's Lanczos weights took half a GB, and it was squashed without complaint).
    let long = zimage::RgbImage { width: 20_000, height: 1, pixels: vec![9; 60_000] };
    let e = with(InitImage { image: long.clone(), ..base.clone() }).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Image);
    assert!(e.to_string().contains("init image is 20000x1"), "{e}");
    let long_mask = zimage::GrayImage { width: 1, height: 20_000, pixels: vec![255; 20_000] };
    assert_eq!(kind_of(with(InitImage { mask: Some(long_mask.clone()), ..base.clone() })), ErrorKind::Image);
    assert_eq!(kind_of(zimage::image_io::resize_rgb(&long, 64, 64)), ErrorKind::Image);
    assert_eq!(kind_of(zimage::image_io::resize_gray(&long_mask, 64, 64)), ErrorKind::Image);
    // A picture and a mask of other sizes than the request's are resized to it, as diffusers'
    // processors resize them: the same result as with both resized first.
    let picture = zimage::RgbImage { width: 40, height: 24, pixels: (0..40 * 24 * 3).map(|i| (i * 7) as u8).collect() };
    let mask = zimage::GrayImage {
        width: 20,
        height: 30,
        pixels: (0..600).map(|i| if i % 20 < 10 { 255 } else { 0 }).collect(),
    };
    let direct = with(InitImage { image: picture.clone(), mask: Some(mask.clone()), ..base.clone() }).unwrap();
    let first = InitImage {
        image: zimage::image_io::resize_rgb(&picture, 64, 64).unwrap(),
        mask: Some(zimage::image_io::resize_gray(&mask, 64, 64).unwrap()),
        ..base
    };
    let resized_first = with(first).unwrap();
    assert_eq!(direct.images, resized_first.images);
    assert_eq!(direct.latents, resized_first.latents);
    assert_eq!((direct.images[0].width, direct.images[0].height), (64, 64));
}

/// The size a picture implies without one given: its sides floored to the package's multiple,
/// as diffusers' image processor floors them; a side under one multiple is kept, so the request
/// check refuses it with its own size.
#[test]
fn a_pictures_size_is_floored_to_the_size_multiple() {
    use zimage::pipeline::size_for_picture;
    assert_eq!(size_for_picture(16, 1000, 750), (992, 736));
    assert_eq!(size_for_picture(16, 100, 75), (96, 64));
    assert_eq!(size_for_picture(16, 64, 48), (64, 48));
    assert_eq!(size_for_picture(16, 15, 40), (15, 32));
    assert_eq!(size_for_picture(8, 17, 9), (16, 8));
    assert_eq!(size_for_picture(16, u32::MAX, 0), (u32::MAX - 15, 0));
    let manifest = zimage::Manifest::read(&repo().join("models/tiny-zimage")).unwrap();
    let mut r = small("x");
    (r.width, r.height) = size_for_picture(manifest.size_multiple(), 15, 40);
    let e = zimage::pipeline::check_request(&r, &manifest).unwrap_err();
    assert!(e.to_string().contains("width 15"), "{e}");
}

#[test]
fn corrupt_and_empty_images_give_image_errors() {
    assert_eq!(kind_of(zimage::image_io::decode_rgb(b"")), ErrorKind::Image);
    assert_eq!(kind_of(zimage::image_io::decode_rgb(b"definitely not a picture")), ErrorKind::Image);
    let mut png = std::fs::read(
        repo()
            .join("tests/golden/tiny-zimage/t2i")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
            .join("image_0.png"),
    )
    .unwrap();
    png.truncate(png.len() / 2);
    assert_eq!(kind_of(zimage::image_io::decode_rgb(&png)), ErrorKind::Image);
    let missing = repo().join("no/such/file.png");
    assert_eq!(kind_of(zimage::image_io::load_rgb(&missing)), ErrorKind::Io);
}

#[test]
fn package_problems_are_package_errors() {
    let options = LoadOptions::default();
    assert_eq!(kind_of(Pipeline::load(repo().join("models/does-not-exist"), &options)), ErrorKind::Package);

    let variants: Vec<(&str, ManifestChange)> = vec![
        ("future format version", Box::new(|m| m["format_version"] = 99.into())),
        ("wrong size", Box::new(|m| m["graphs"]["vae_decoder"]["bytes"] = 12.into())),
        ("wrong checksum", Box::new(|m| m["graphs"]["vae_decoder"]["sha256"] = "00".repeat(32).into())),
        ("escaping path", Box::new(|m| m["tokenizer"]["path"] = "../tiny-zimage/tokenizer.json".into())),
        ("renamed graph input", Box::new(|m| m["graphs"]["transformer"]["inputs"][0]["name"] = "x".into())),
        ("mismatched channels", Box::new(|m| m["vae"]["latent_channels"] = 3.into())),
        ("renamed cpu decoder output", Box::new(|m| m["graphs"]["vae_decoder_cpu"]["outputs"][0]["name"] = "x".into())),
        ("wrong cpu decoder checksum", Box::new(|m| m["graphs"]["vae_decoder_cpu"]["sha256"] = "00".repeat(32).into())),
        // Finite as an f64, infinite as the f32 the decoder divides by: every image was the
        // same constant.
        ("scaling factor beyond float32", Box::new(|m| m["vae"]["scaling_factor"] = 1e300.into())),
        ("scaling factor below float32", Box::new(|m| m["vae"]["scaling_factor"] = 1e-50.into())),
    ];
    for (name, edit) in variants {
        let dir = tiny_package_with_manifest(name, edit);
        let err = Pipeline::load(&dir, &options).err().unwrap_or_else(|| panic!("{name}: loaded"));
        assert_eq!(err.kind(), ErrorKind::Package, "{name}: {err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn a_bf16_package_on_the_cpu_is_refused_with_the_reason() {
    let dir = tiny_package_with_manifest("bf16 package", |m| m["precision"] = "bf16".into());
    for options in [LoadOptions::default(), {
        let mut o = LoadOptions::default();
        o.transformer_device = Some(Device::Cuda { device_id: 0 });
        o
    }] {
        let err = Pipeline::load(&dir, &options).err().expect("bf16 on the CPU");
        assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{err}");
        assert!(err.to_string().contains("bf16") && err.to_string().contains("GPU"), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unknown_precision_is_a_package_error() {
    let dir = tiny_package_with_manifest("int3 package", |m| m["precision"] = "int3".into());
    let err = Pipeline::load(&dir, &LoadOptions::default()).err().expect("int3 is no precision");
    assert_eq!(err.kind(), ErrorKind::Package, "{err}");
    assert!(err.to_string().contains("int3"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A graph ONNX Runtime cannot parse (with a manifest that matches its bytes): a package error
/// whose `source()` is ONNX Runtime's own error, its message part of ours.
#[test]
fn onnx_runtime_errors_are_kept_as_the_source() {
    use std::error::Error as _;
    let garbage = b"this is not an ONNX protobuf".to_vec();
    let sha = zimage::package::files::sha256_hex(&garbage);
    let bytes = garbage.len();
    // (The VAE decoder: the encoder's session is only made by its first use, tests/loading.rs.
    // Without its prebuilt CPU layout, which would be loaded instead: tests/cpu_layout.rs.)
    let dir = tiny_package_with_manifest("garbage decoder", |m| {
        m["graphs"]["vae_decoder"].as_object_mut().unwrap().remove("cpu_layout");
        m["graphs"]["vae_decoder"]["path"] = "garbage.onnx".into();
        m["graphs"]["vae_decoder"]["bytes"] = bytes.into();
        m["graphs"]["vae_decoder"]["sha256"] = sha.clone().into();
    });
    std::fs::write(dir.join("garbage.onnx"), &garbage).unwrap();
    let err = Pipeline::load(&dir, &LoadOptions::default()).err().expect("garbage graph");
    assert_eq!(err.kind(), ErrorKind::Package, "{err}");
    let source = err.source().expect("ONNX Runtime's error is kept");
    assert!(!source.to_string().is_empty());
    assert!(err.to_string().contains(&source.to_string()), "{err} / {source}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A graph file swapped for another graph of the package, its checksum re-recorded: refused at
/// load as a package error naming what the file has and what the manifest declares, not at the
/// first decode (an inference error then).
#[test]
fn a_graph_file_with_other_inputs_than_declared_is_a_package_error_at_load() {
    let encoder = std::fs::read(repo().join("models/tiny-zimage/vae_encoder.onnx")).unwrap();
    let sha = zimage::package::files::sha256_hex(&encoder);
    let bytes = encoder.len();
    let dir = tiny_package_with_manifest("swapped decoder", |m| {
        m["graphs"]["vae_decoder"].as_object_mut().unwrap().remove("cpu_layout");
        m["graphs"]["vae_decoder"]["path"] = "vae_encoder.onnx".into();
        m["graphs"]["vae_decoder"]["bytes"] = bytes.into();
        m["graphs"]["vae_decoder"]["sha256"] = sha.clone().into();
    });
    let err = Pipeline::load(&dir, &LoadOptions::default()).err().expect("an encoder as the decoder loads");
    assert_eq!(err.kind(), ErrorKind::Package, "{err}");
    let says = "graph vae_decoder: vae_encoder.onnx has inputs [image:float32] and outputs [logvar:float32, \
                mean:float32], where the manifest declares inputs [latents:float32] and outputs [image:float32]";
    assert!(err.to_string().contains(says), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A `tokenizer.json` whose normalizer multiplies the text (nine `Replace`s of "a" by ten
/// "a"s: one letter would become 10^9), its checksum re-recorded: the crate's allocation of
/// that aborted the process at the first prompt. Refused at load as a package error instead.
#[test]
fn a_tokenizer_that_multiplies_text_is_a_package_error_at_load() {
    let mut tokenizer = json(&repo().join("models/tiny-zimage/tokenizer.json"));
    let replace = serde_json::json!({"type": "Replace", "pattern": {"String": "a"}, "content": "aaaaaaaaaa"});
    tokenizer["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": vec![replace; 9]});
    let bytes = serde_json::to_vec(&tokenizer).unwrap();
    let (sha, len) = (zimage::package::files::sha256_hex(&bytes), bytes.len());
    let dir = tiny_package_with_manifest("multiplying tokenizer", |m| {
        m["tokenizer"]["path"] = "tokenizer-multiplying.json".into();
        m["tokenizer"]["bytes"] = len.into();
        m["tokenizer"]["sha256"] = sha.clone().into();
    });
    std::fs::write(dir.join("tokenizer-multiplying.json"), &bytes).unwrap();
    let err = Pipeline::load(&dir, &LoadOptions::default()).err().expect("the multiplying tokenizer loads");
    assert_eq!(err.kind(), ErrorKind::Package, "{err}");
    let says = "its normalizer and pre-tokenizer can lengthen a text up to 2.000e9 times (the limit is 64)";
    assert!(err.to_string().contains(says), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A temporary package: links to tiny-zimage's files and its manifest changed by `edit`.
/// The latents are the image size over the VAE's scale factor whatever the transformer's
/// patch size (a patch size of 4 made a 64x64 request give a 32x32 image).
#[test]
fn images_have_the_requested_size_whatever_the_patch_size() {
    let dir = tiny_package_with_manifest("patch size 4", |m| m["transformer"]["patch_size"] = 4.into());
    let pipeline = Pipeline::load(&dir, &LoadOptions::default()).expect("load");
    assert_eq!(pipeline.manifest().size_multiple(), 32);
    let g = pipeline.generate(&small("a red fox"), None).expect("generate");
    assert_eq!((g.images[0].width, g.images[0].height), (64, 64));
    assert_eq!(g.latents.unwrap().shape(), &[1, 16, 8, 8]);
    let mut r = small("a red fox");
    r.width = 48;
    assert_eq!(kind_of(pipeline.generate(&r, None)), ErrorKind::InvalidRequest, "48 is no multiple of 32");
    drop(pipeline);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tiny_package_with_manifest(name: &str, edit: impl Fn(&mut serde_json::Value)) -> std::path::PathBuf {
    let source = repo().join("models/tiny-zimage");
    let dir = tempdir(name);
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "manifest.json" {
            std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    let mut m = json(&source.join("manifest.json"));
    edit(&mut m);
    std::fs::write(dir.join("manifest.json"), serde_json::to_string(&m).unwrap()).unwrap();
    dir
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("zimage-test-{}-{}", std::process::id(), name.replace(' ', "-")));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn cuda_on_the_cpu_runtime_is_a_provider_error() {
    pipeline("tiny-zimage"); // the runtime is loaded
    let options = {
        let mut o = LoadOptions::default();
        o.device = Device::Cuda { device_id: 0 };
        o
    };
    let err =
        Pipeline::load(repo().join("models/tiny-zimage"), &options).err().expect("CUDA is not in the CPU runtime");
    assert_eq!(err.kind(), ErrorKind::Provider, "{err}");
    assert!(err.to_string().contains("onnxruntime-gpu"), "{err}");
    let fallback = {
        let mut o = options;
        o.allow_cpu_fallback = true;
        o
    };
    let p = Pipeline::load(repo().join("models/tiny-zimage"), &fallback).unwrap();
    assert_eq!(p.providers().transformer, Device::Cpu);
    // Every graph fell back, and each says why (the provider's own error).
    let fallbacks = p.provider_fallbacks();
    let kinds: Vec<GraphKind> = fallbacks.iter().map(|(kind, _)| *kind).collect();
    assert_eq!(kinds, [GraphKind::TextEncoder, GraphKind::Transformer, GraphKind::VaeDecoder]);
    // The VAE encoder's session is made (and falls back) on first use.
    let mut r = small("a cat");
    r.init_image =
        Some(InitImage::image_to_image(zimage::RgbImage { width: 64, height: 64, pixels: vec![90; 64 * 64 * 3] }));
    p.generate(&r, None).unwrap();
    assert_eq!(p.providers().vae_encoder, Device::Cpu);
    let fallbacks = p.provider_fallbacks();
    let kinds: Vec<GraphKind> = fallbacks.iter().map(|(kind, _)| *kind).collect();
    assert_eq!(kinds, [GraphKind::TextEncoder, GraphKind::Transformer, GraphKind::VaeDecoder, GraphKind::VaeEncoder]);
    for (kind, reason) in &fallbacks {
        assert!(reason.contains("onnxruntime-gpu"), "{kind}: {reason}");
    }
    assert!(pipeline("tiny-zimage").provider_fallbacks().is_empty());
}

#[test]
fn exploding_latents_are_an_inference_error() {
    let p = pipeline("tiny-zimage");
    let mut r = small("a cat");
    r.latents = Some(ndarray::Array4::from_elem((1, 16, 8, 8), 3.0e38));
    assert_eq!(kind_of(p.generate(&r, None)), ErrorKind::Inference);
}

#[test]
fn progress_callback_can_stop_and_the_pipeline_stays_usable() {
    let p = pipeline("tiny-zimage");
    let reference = p.generate(&small("a lighthouse"), None).unwrap();
    let mut seen = Vec::new();
    let mut stop_after_two = |progress: &zimage::Progress| {
        seen.push((progress.step, progress.total_steps));
        progress.step < 2
    };
    assert_eq!(kind_of(p.generate(&small("a lighthouse"), Some(&mut stop_after_two))), ErrorKind::Cancelled);
    assert_eq!(seen, vec![(1, 3), (2, 3)]);
    let again = p.generate(&small("a lighthouse"), None).unwrap();
    assert_eq!(again.images, reference.images);
}

#[test]
fn cancel_handle_stops_a_run_from_another_thread() {
    let p = pipeline("tiny-zimage");
    let handle = p.cancel_handle();
    let steps_seen = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&steps_seen);
    let mut r = small("a lighthouse");
    r.steps = 50;
    let mut on_progress = |progress: &zimage::Progress| {
        seen.store(progress.step, Ordering::SeqCst);
        if progress.step == 2 {
            // Cancel from a different thread while this generation is in flight.
            let h = handle.clone();
            std::thread::spawn(move || h.cancel()).join().unwrap();
        }
        true
    };
    assert_eq!(kind_of(p.generate(&r, Some(&mut on_progress))), ErrorKind::Cancelled);
    assert!(steps_seen.load(Ordering::SeqCst) < 50);
    let reference = p.generate(&small("a lighthouse"), None).unwrap();
    assert_eq!(reference.images.len(), 1);
}

/// A cancel that arrives while a large input picture is being resized to the request's size
/// (the first part of the run, before any model) stops the run; it was lost, and the run
/// finished.
#[test]
fn a_cancel_during_the_resize_of_a_large_picture_stops_the_run() {
    // Its own pipeline: a cancel reaches every run of a pipeline, also other tests' on the
    // shared one (and theirs would reach this one's).
    let p = Pipeline::load(repo().join("models/tiny-zimage"), &LoadOptions::default()).unwrap();
    let pixels = (0..6000u32 * 4000 * 3).map(|i| (i % 251) as u8).collect();
    let mut r = small("a lighthouse");
    r.steps = 1;
    r.init_image =
        Some(InitImage { image: zimage::RgbImage { width: 6000, height: 4000, pixels }, mask: None, strength: 1.0 });
    let started = std::time::Instant::now();
    p.generate(&r, None).unwrap();
    let whole = started.elapsed(); // mostly the resize: one step of a 64x64 tiny model is ms
    let handle = p.cancel_handle();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(whole / 4);
        handle.cancel();
    });
    let result = p.generate(&r, None);
    canceller.join().unwrap();
    assert_eq!(kind_of(result), ErrorKind::Cancelled, "a run of {whole:?} cancelled after a quarter of it");
    p.generate(&small("a lighthouse"), None).unwrap();
}

#[test]
fn encoded_prompts_give_the_same_image_as_text() {
    let p = pipeline("tiny-zimage");
    let from_text = p.generate(&small("a red bicycle"), None).unwrap();
    let embedding = p.encode_prompt("a red bicycle", None).unwrap();
    let mut r = small("");
    r.prompt = Prompt::Embedded(embedding);
    let from_embedding = p.generate(&r, None).unwrap();
    assert_eq!(from_text.images, from_embedding.images);
    assert_eq!(from_text.latents, from_embedding.latents);
}

#[test]
fn missing_seed_is_drawn_and_reported() {
    let p = pipeline("tiny-zimage");
    let mut r = small("a cat");
    r.seed = None;
    let first = p.generate(&r, None).unwrap();
    r.seed = Some(first.seed);
    let replay = p.generate(&r, None).unwrap();
    assert_eq!(first.images, replay.images);
}

#[test]
fn long_prompts_report_truncation() {
    let p = pipeline("tiny-zimage");
    let long = "a very long prompt about many things ".repeat(100);
    let result = p.generate(&small(&long), None).unwrap();
    assert!(result.prompt_truncated());
    assert_eq!(result.prompt_tokens.ids.len(), 512);
    assert!(!p.generate(&small("short"), None).unwrap().prompt_truncated());
}

#[test]
fn two_threads_on_one_pipeline_match_sequential_runs() {
    let p = pipeline("tiny-zimage");
    let requests = [small("a castle on a hill"), {
        let mut r = small("a boat");
        r.guidance_scale = 3.0;
        r.seed = Some(99);
        r
    }];
    let sequential: Vec<_> = requests.iter().map(|r| p.generate(r, None).unwrap()).collect();
    let parallel: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = requests.iter().map(|r| s.spawn(move || p.generate(r, None).unwrap())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (a, b) in sequential.iter().zip(&parallel) {
        assert_eq!(a.images, b.images);
        assert_eq!(a.latents, b.latents);
    }
}

#[test]
fn writing_into_a_missing_folder_is_an_io_error() {
    let image = zimage::RgbImage { width: 1, height: 1, pixels: vec![0, 0, 0] };
    let err = zimage::image_io::write_png(&repo().join("no/such/dir/x.png"), &image, &[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
}

#[test]
fn the_winograd_vae_decoder_gives_the_direct_decoders_images() {
    // Sizes whose latent sides are not multiples of 4, so the 4x4 Winograd tiles of the first
    // decoder level are partly outside the image (tiny-zimage: VAE factor 8, alt: 4).
    for (package, width, height) in [("tiny-zimage", 80, 48), ("tiny-zimage-alt", 88, 40)] {
        let dir = repo().join("models").join(package);
        let direct = Pipeline::load(&dir, &{
            let mut o = LoadOptions::default();
            o.threads = Some(1);
            o
        })
        .unwrap();
        let options = {
            let mut o = LoadOptions::default();
            o.threads = Some(1);
            o.winograd_vae = true;
            o
        };
        let winograd = Pipeline::load(&dir, &options).unwrap();
        assert_eq!(direct.vae_decoder_file(), dir.join("vae_decoder.onnx"));
        assert_eq!(winograd.vae_decoder_file(), dir.join("vae_decoder_cpu.onnx"));
        let mut r = small("a lighthouse in fog");
        (r.width, r.height, r.count) = (width, height, 2);
        let a = winograd.generate(&r, None).unwrap();
        let b = direct.generate(&r, None).unwrap();
        assert_eq!(a.latents, b.latents, "{package}: the decoders share everything before decoding");
        for (x, y) in a.images.iter().zip(&b.images) {
            assert!(max_pixel_diff(x, y) <= 1, "{package}: images differ by {} levels", max_pixel_diff(x, y));
        }
    }
}

#[test]
fn winograd_vae_needs_a_package_with_the_cpu_decoder() {
    let dir = tiny_package_with_manifest("no cpu decoder", |m| {
        m["graphs"].as_object_mut().unwrap().remove("vae_decoder_cpu");
    });
    let options = {
        let mut o = LoadOptions::default();
        o.threads = Some(1);
        o.winograd_vae = true;
        o
    };
    let err = Pipeline::load(&dir, &options).err().expect("winograd_vae without vae_decoder_cpu");
    assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{err}");
    assert!(err.to_string().contains("vae_decoder_cpu"), "{err}");
    // Without the option the same package loads and decodes with vae_decoder.
    let plain = Pipeline::load(&dir, &{
        let mut o = LoadOptions::default();
        o.threads = Some(1);
        o
    })
    .unwrap();
    assert_eq!(plain.vae_decoder_file(), dir.join("vae_decoder.onnx"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn int8_vae_needs_a_package_with_the_int8_decoder_and_excludes_winograd() {
    let options = |winograd_vae: bool| {
        let mut o = LoadOptions::default();
        o.threads = Some(1);
        o.int8_vae = true;
        o.winograd_vae = winograd_vae;
        o
    };
    // tiny-zimage has a Winograd decoder and no int8 one.
    let err = Pipeline::load(repo().join("models/tiny-zimage"), &options(false)).err().expect("no vae_decoder_int8");
    assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{err}");
    assert!(err.to_string().contains("no vae_decoder_int8 graph"), "{err}");
    // toy-zimage-int8 has an int8 decoder and no Winograd one: both asked is refused before either is looked up.
    for package in ["models/tiny-zimage", "models/toy-zimage-int8"] {
        let err = Pipeline::load(repo().join(package), &options(true)).err().expect("both decoders");
        assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{err}");
        assert!(err.to_string().contains("winograd_vae and int8_vae: choose one"), "{err}");
    }
}

/// The sequential memory mode makes the VAE decoder's session per generation: with `int8_vae`
/// it is the int8 decoder's, the same pictures as the resident mode's, not the exact decoder's.
#[test]
fn the_sequential_mode_decodes_with_the_int8_vae_decoder_too() {
    let package = repo().join("models/toy-zimage-int8");
    let load = |int8_vae: bool, memory_mode: zimage::MemoryMode| {
        let mut o = LoadOptions::default();
        o.threads = Some(1);
        o.int8_vae = int8_vae;
        o.memory_mode = memory_mode;
        Pipeline::load(&package, &o).unwrap()
    };
    let mut request = GenerateRequest::new("a red circle on a blue background");
    (request.width, request.height, request.seed) = (64, 64, Some(1));
    let picture = |p: &Pipeline| p.generate(&request, None).unwrap().images.remove(0);
    let sequential = load(true, zimage::MemoryMode::Sequential);
    assert_eq!(sequential.vae_decoder_file(), package.join("vae_decoder_int8.onnx"));
    let int8 = picture(&sequential);
    assert_eq!(int8, picture(&load(true, zimage::MemoryMode::Resident)));
    // The weights it loads count the int8 decoder in place of the float one.
    let m = sequential.manifest();
    let (float, int8_bytes) = (m.graphs.vae_decoder.bytes, m.graphs.vae_decoder_int8.as_ref().unwrap().bytes);
    assert_eq!(sequential.weight_bytes(), m.weight_bytes() - float + int8_bytes);
    assert!(max_pixel_diff(&int8, &picture(&load(false, zimage::MemoryMode::Sequential))) > 0);
}

#[test]
fn an_int8_vae_decoder_with_other_inputs_is_a_package_error() {
    let dir = tiny_package_with_manifest("int8 decoder inputs", |m| {
        let mut entry = m["graphs"]["vae_decoder"].clone();
        entry["inputs"][0]["name"] = "sample".into();
        m["graphs"]["vae_decoder_int8"] = entry;
    });
    let err = Pipeline::load(&dir, &LoadOptions::default()).err().expect("mismatched vae_decoder_int8");
    assert_eq!(err.kind(), ErrorKind::Package, "{err}");
    assert!(err.to_string().contains("graphs.vae_decoder_int8 must have vae_decoder's inputs and outputs"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sequential_memory_mode_gives_the_same_images() {
    let resident = pipeline("tiny-zimage");
    let options = {
        let mut o = LoadOptions::default();
        o.memory_mode = zimage::MemoryMode::Sequential;
        o.threads = Some(1);
        o
    };
    let sequential = Pipeline::load(repo().join("models/tiny-zimage"), &options).unwrap();
    let mut r = small("a harbour at dawn");
    r.guidance_scale = 2.0;
    let a = resident.generate(&r, None).unwrap();
    let b = sequential.generate(&r, None).unwrap();
    assert_eq!(a.images, b.images);
    assert_eq!(a.latents, b.latents);
}

#[test]
fn generate_enhanced_uses_and_reports_the_rewritten_prompt() {
    let p = pipeline("tiny-zimage");
    let enhancer =
        zimage::PromptEnhancer::load(repo().join("models/tiny-qwen3-enhancer"), &LoadOptions::default()).unwrap();
    let options = {
        let mut o = zimage::EnhanceOptions::default();
        o.max_new_tokens = 24;
        o
    };
    let expected = enhancer.enhance("a cat", &options, None).unwrap();
    assert!(!expected.text.is_empty());
    let result = p.generate_enhanced(&enhancer, &options, &small("a cat"), None).unwrap();
    assert_eq!(result.enhanced_prompt.as_deref(), Some(expected.text.as_str()));
    let direct = p.generate(&small(&expected.text), None).unwrap();
    assert_eq!(result.images, direct.images);
    let mut embedded = small("");
    embedded.prompt = Prompt::Embedded(p.encode_prompt("a cat", None).unwrap());
    assert_eq!(kind_of(p.generate_enhanced(&enhancer, &options, &embedded, None)), ErrorKind::InvalidRequest);
}

/// With max_sequence_length above the model's caption positions (992 here), a short prompt
/// fits but the enhancer's rewrite (up to 1100 new tokens, tiny-zimage-enhanced's decoder
/// writes them all)
/// does not: the refusal names the enhanced prompt and the enhancer's setting.
#[test]
fn an_enhanced_prompt_past_the_caption_positions_is_named() {
    let p = Pipeline::load(repo().join("models/tiny-zimage-enhanced"), &LoadOptions::default()).unwrap();
    let enhancer =
        zimage::PromptEnhancer::load(repo().join("models/tiny-zimage-enhanced"), &LoadOptions::default()).unwrap();
    let mut options = zimage::EnhanceOptions::default();
    options.max_new_tokens = 1100;
    let mut request = small("a cat");
    request.max_sequence_length = Some(4096);
    let e = p.generate_enhanced(&enhancer, &options, &request, None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
    let message = e.to_string();
    assert!(message.contains("the enhanced prompt has") && message.contains("at most 992"), "{message}");
    assert!(message.contains("up to 1100 new tokens"), "{message}");
}

#[test]
fn optimized_model_cache_is_written_then_used_with_the_same_images() {
    let cache = tempdir("optimized-cache");
    let options = {
        let mut o = LoadOptions::default();
        o.threads = Some(1);
        o.optimized_model_cache = Some(cache.clone());
        o
    };
    // tiny-zimage without its VAE graphs' prebuilt CPU layouts and its transformer's prepacked
    // one, which would be loaded instead of optimising those graphs (and so of caching them;
    // tests/cpu_layout.rs, tests/cpu_prepacked.rs).
    let package = tiny_package_with_manifest("without layouts", |m| {
        for graph in ["vae_decoder", "vae_decoder_cpu", "vae_encoder"] {
            m["graphs"][graph].as_object_mut().unwrap().remove("cpu_layout");
        }
        m["graphs"]["transformer"].as_object_mut().unwrap().remove("cpu_prepacked");
    });
    let first = Pipeline::load(&package, &options).unwrap();
    let mut cached: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().join("model.onnx").is_file())
        .map(|e| e.file_name().to_string_lossy().split('-').next().unwrap().to_string())
        .collect();
    cached.sort();
    // The VAE encoder's session (and its cached graph) is made by its first use.
    assert_eq!(cached, ["transformer", "vae_decoder"]);
    let mut to_image = small("a windmill");
    to_image.init_image =
        Some(InitImage::image_to_image(zimage::RgbImage { width: 64, height: 64, pixels: vec![90; 64 * 64 * 3] }));
    let encoded = first.generate(&to_image, None).unwrap();
    assert!(std::fs::read_dir(&cache).unwrap().any(|e| {
        let e = e.unwrap();
        e.file_name().to_string_lossy().starts_with("vae_encoder-") && e.path().join("model.onnx").is_file()
    }));
    let second = Pipeline::load(&package, &options).unwrap();
    let mut r = small("a windmill");
    r.guidance_scale = 2.0;
    let reference = pipeline("tiny-zimage").generate(&r, None).unwrap();
    for p in [&first, &second] {
        let result = p.generate(&r, None).unwrap();
        assert!(max_pixel_diff(&result.images[0], &reference.images[0]) <= 1);
        assert!(
            max_abs_diff(
                result.latents.as_ref().unwrap().as_slice().unwrap(),
                reference.latents.as_ref().unwrap().as_slice().unwrap()
            ) <= 1e-5
        );
    }
    // The cached encoder gives the same picture as a pipeline that built its own.
    let again = second.generate(&to_image, None).unwrap();
    let plain = pipeline("tiny-zimage").generate(&to_image, None).unwrap();
    for result in [&encoded, &again] {
        assert!(max_pixel_diff(&result.images[0], &plain.images[0]) <= 1);
    }
    std::fs::remove_dir_all(&cache).unwrap();
    std::fs::remove_dir_all(&package).unwrap();
}

#[test]
fn resizing_inputs_is_sized_and_deterministic() {
    let source = png_rgb(
        &golden("tiny-zimage/inputs")
            .read_dir()
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().contains("init"))
            .expect("an init image golden"),
    );
    let a = zimage::image_io::resize_rgb(&source, 48, 80).unwrap();
    let b = zimage::image_io::resize_rgb(&source, 48, 80).unwrap();
    assert_eq!((a.width, a.height, a.pixels.len()), (48, 80, 48 * 80 * 3));
    assert_eq!(a, b, "same input, same output");
    assert_eq!(
        zimage::image_io::resize_rgb(&source, source.width, source.height).unwrap(),
        source,
        "same size is a copy"
    );
    // A flat picture stays flat through the filter (its weights sum to one).
    let flat = zimage::RgbImage { width: 30, height: 20, pixels: [10u8, 200, 90].repeat(600) };
    let resized = zimage::image_io::resize_rgb(&flat, 64, 48).unwrap();
    assert!(resized.pixels.chunks(3).all(|p| p == [10, 200, 90]));
    assert_eq!(kind_of(zimage::image_io::resize_rgb(&flat, 0, 10)), ErrorKind::InvalidRequest);
    // An empty picture says so (it said "needs 0 bytes, has 0"); a short buffer gives both sizes.
    let empty = zimage::RgbImage { width: 0, height: 0, pixels: vec![] }.check().unwrap_err();
    assert_eq!(empty.to_string(), "image: RGB image of 0x0 is empty (a side of 0 pixels)");
    let short = zimage::GrayImage { width: 3, height: 2, pixels: vec![0; 5] }.check().unwrap_err();
    assert_eq!(short.to_string(), "image: gray image of 3x2 needs 6 bytes, has 5");
}

#[test]
fn oversized_images_are_refused_before_decoding() {
    // A valid PNG whose width is beyond the decode limit: refused with an Image error, not
    // decoded into gigabytes.
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, zimage::image_io::MAX_INPUT_SIDE + 1, 1);
        encoder.set_color(png::ColorType::Grayscale);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&vec![0u8; zimage::image_io::MAX_INPUT_SIDE as usize + 1]).unwrap();
    }
    let err = zimage::image_io::decode_rgb(&bytes).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Image);
    assert!(err.to_string().contains("too large"), "{err}");
}

/// Decoded pictures are checked like the latents: latents that stay finite through the
/// denoising step but decode to NaN (what guidance 1e38 produced: an all-black PNG) are an
/// inference error of the VAE decoder. (The tiny VAE's normalisation layers keep even extreme
/// latents from saturating it, so the saturation rule is tested on `image_io::all_clipped`.)
#[test]
fn decoded_pictures_are_checked() {
    let p = pipeline("tiny-zimage");
    let mut r = small("a cat");
    r.steps = 1;
    r.latents = Some(ndarray::Array4::from_elem((1, 16, 8, 8), 1e38));
    let e = p.generate(&r, None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Inference, "{e}");
    assert!(e.to_string().contains("vae_decoder") && e.to_string().contains("non-finite"), "{e}");
    // The bounds themselves are usable: guidance 100 with normalisation 100 runs.
    let mut r = small("a cat");
    r.steps = 1;
    r.guidance_scale = zimage::limits::MAX_GUIDANCE_SCALE;
    r.cfg_normalization = zimage::limits::MAX_CFG_NORMALIZATION;
    let g = p.generate(&r, None).unwrap();
    assert!(g.latents.unwrap().iter().all(|v| v.is_finite()));

    let clipped = ndarray::Array3::from_shape_fn((3, 2, 2), |(c, _, _)| if c == 0 { -1.0f32 } else { 7.5 });
    assert!(zimage::image_io::all_clipped(clipped.view()));
    let mut one_inside = clipped.clone();
    one_inside[[2, 1, 1]] = 0.999;
    assert!(!zimage::image_io::all_clipped(one_inside.view()));
    let with_nan = ndarray::Array3::from_elem((3, 2, 2), f32::NAN);
    assert!(zimage::image_io::all_clipped(with_nan.view()), "NaN is not inside the range either");
}

/// Input files are read within a cap (devices and pipes too), and sizes the request sets are
/// checked before anything is allocated from them.
#[cfg(unix)]
#[test]
fn hostile_files_and_sizes_are_refused_before_allocating() {
    use std::time::Instant;
    use zimage::image_io;
    let started = Instant::now();
    let e = image_io::read_file_capped("/dev/zero".as_ref(), 1 << 20).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(e.to_string().contains("larger than the limit of 1 MiB"), "{e}");
    let e = image_io::load_rgb("/dev/zero".as_ref()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Image, "{e}");
    let e = image_io::load_gray("/dev/zero".as_ref()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Image, "{e}");
    // A (sparse) file over the cap is refused from its size, without reading it.
    let dir = std::env::temp_dir().join(format!("zimage-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let huge = dir.join("huge.png");
    std::fs::File::create(&huge).unwrap().set_len(64 << 30).unwrap();
    let e = image_io::load_rgb(&huge).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Image, "{e}");
    assert!(started.elapsed().as_secs() < 20, "bounded reads took {:?}", started.elapsed());
    // A folder is an I/O error, not an endless or failed read.
    assert_eq!(image_io::load_rgb(&dir).unwrap_err().kind(), ErrorKind::Io);

    // The request's size is checked before an init image is resized to it.
    let manifest = zimage::Manifest::read(&repo().join("models/tiny-zimage")).unwrap();
    let mut r = small("x");
    (r.width, r.height) = (100_000, 100_000);
    let e = zimage::pipeline::check_request(&r, &manifest).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
    let tiny = zimage::RgbImage { width: 2, height: 2, pixels: vec![9; 12] };
    let e = image_io::resize_rgb(&tiny, 100_000, 100_000).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
    // Every filter's entry point has the same limit (it was unchecked: an abort on allocation).
    for filter in [zimage::pil_resize::Filter::Bicubic, zimage::pil_resize::Filter::Bilinear] {
        for (w, h) in [(image_io::MAX_INPUT_SIDE + 1, 1), (1, u32::MAX), (0, 4)] {
            let e = image_io::resize_rgb_with(&tiny, w, h, filter).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{w}x{h}: {e}");
        }
        let bad = zimage::RgbImage { width: 2, height: 2, pixels: vec![9; 11] };
        assert_eq!(image_io::resize_rgb_with(&bad, 4, 4, filter).unwrap_err().kind(), ErrorKind::Image);
    }
    // A mask of another size than the request is resized to it (Pillow's Lanczos, checked
    // against Pillow in reference_tables.rs), within the same limits.
    let mask = golden("tiny-zimage/inputs/mask.png");
    let stored = image_io::load_gray(&mask).unwrap();
    assert_eq!(image_io::load_mask(&mask, 64, 64).unwrap(), stored);
    let resized = image_io::load_mask(&mask, 32, 48).unwrap();
    assert_eq!((resized.width, resized.height), (32, 48));
    assert_eq!(resized, image_io::resize_gray(&stored, 32, 48).unwrap());
    let e = image_io::load_mask(&mask, image_io::MAX_INPUT_SIDE + 1, 64).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Outputs are written to a temporary file and renamed: nothing is left at the destination
/// or beside it when writing fails, and what is not a regular file is never replaced.
#[cfg(unix)]
#[test]
fn outputs_are_written_atomically_and_never_over_devices() {
    use std::os::unix::fs::FileTypeExt;
    use zimage::image_io;
    let dir = std::env::temp_dir().join(format!("zimage-outputs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let image = zimage::RgbImage { width: 4, height: 2, pixels: vec![200; 24] };
    let listing = || {
        let mut names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    };

    image_io::write_png(&dir.join("a.png"), &image, &[("k", "v".into())]).unwrap();
    assert_eq!(zimage::image_io::load_rgb(&dir.join("a.png")).unwrap(), image);
    image_io::write_npy(&dir.join("l.npy"), &ndarray::Array4::zeros((1, 2, 3, 4))).unwrap();
    image_io::write_file_atomic(&dir.join("s.json"), b"{}").unwrap();
    assert_eq!(listing(), ["a.png", "l.npy", "s.json"], "no temporary file left");

    // An uncommitted file leaves nothing; a committed one replaces the old content whole.
    let staged = image_io::StagedFile::create(&dir.join("b.png")).unwrap();
    assert!(staged.temp_path().exists());
    drop(staged);
    let mut staged = image_io::StagedFile::create(&dir.join("a.png")).unwrap();
    staged.write_bytes(b"new").unwrap();
    assert_eq!(zimage::image_io::load_rgb(&dir.join("a.png")).unwrap(), image, "untouched until commit");
    staged.commit().unwrap();
    assert_eq!(std::fs::read(dir.join("a.png")).unwrap(), b"new");
    assert_eq!(listing(), ["a.png", "l.npy", "s.json"]);

    // A folder, a device, a missing folder, a path without a file name: I/O errors, up front.
    std::fs::create_dir(dir.join("sub")).unwrap();
    for bad in [dir.join("sub"), "/dev/null".into(), dir.join("missing/x.png"), "/".into()] {
        let e = image_io::check_writable(&bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{}: {e}", bad.display());
        let e = image_io::write_png(&bad, &image, &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{}: {e}", bad.display());
    }
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
    // A malformed image is refused before anything is written.
    let short = zimage::RgbImage { width: 4, height: 2, pixels: vec![0; 5] };
    assert_eq!(image_io::write_png(&dir.join("c.png"), &short, &[]).unwrap_err().kind(), ErrorKind::Image);
    assert_eq!(listing(), ["a.png", "l.npy", "s.json", "sub"]);

    // A legal name of 255 bytes (multi-byte characters at the cut) is written; its temporary
    // name was longer than the file system allows. A link to nothing says so.
    let long = format!("{}{}.png", "n".repeat(127), "é".repeat(62));
    assert_eq!(long.len(), 255);
    image_io::write_png(&dir.join(&long), &image, &[]).unwrap();
    assert_eq!(zimage::image_io::load_rgb(&dir.join(&long)).unwrap(), image);
    std::os::unix::fs::symlink(dir.join("missing/target.png"), dir.join("dangling.png")).unwrap();
    let e = image_io::check_writable(&dir.join("dangling.png")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(e.to_string().contains("dangling.png") && e.to_string().contains("symbolic link to nothing"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A manifest that names a device (a link to /dev/zero) as a package file is refused: its
/// checksum would otherwise be computed forever.
#[cfg(unix)]
#[test]
fn package_files_must_be_regular_files() {
    let src = repo().join("models/tiny-zimage");
    let dir = std::env::temp_dir().join(format!("zimage-devfile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut manifest = json(&src.join("manifest.json"));
    manifest["tokenizer"] = serde_json::json!({"path": "tokenizer.json", "bytes": 0, "sha256": "00"});
    std::fs::write(dir.join("manifest.json"), serde_json::to_string(&manifest).unwrap()).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.join("tokenizer.json")).unwrap();
    let started = std::time::Instant::now();
    let e = Pipeline::load(&dir, &LoadOptions::default()).err().expect("refused");
    assert_eq!(e.kind(), ErrorKind::Package, "{e}");
    assert!(e.to_string().contains("not a regular file"), "{e}");
    assert!(started.elapsed().as_secs() < 10);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A manifest whose vae.scale_factor is not its decoder's: the decoded picture would be of
/// another size than the request's (it was written, 32x32 for a 64x64 request). An inference
/// error naming the factor, and no picture.
#[test]
fn a_vae_scale_factor_that_is_not_the_decoders_is_an_error() {
    for factor in [16, 4] {
        let dir = edited_copy(&repo().join("models/tiny-zimage"), &format!("scale-factor-{factor}"), |m, _| {
            m["vae"]["scale_factor"] = factor.into();
        });
        let pipeline = Pipeline::load(&dir, &LoadOptions::default()).unwrap();
        let mut request = small("x");
        request.steps = 1;
        let e = pipeline.generate(&request, None).expect_err("a picture of the wrong size");
        assert_eq!(e.kind(), ErrorKind::Inference, "{e}");
        assert!(e.to_string().contains(&format!("vae.scale_factor {factor}")), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A JPEG cut short inside its scan is refused as truncated, as Pillow refuses it (the decoder
/// filled the missing part with grey and said nothing); a complete one decodes, with bytes
/// after its end too (as cameras append).
#[test]
fn truncated_jpegs_are_image_errors() {
    let (w, h) = (64u32, 48u32);
    let pixels: Vec<u8> = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode(&pixels, w, h, image::ExtendedColorType::Rgb8)
        .unwrap();
    let whole = zimage::image_io::decode_rgb(&jpeg).unwrap();
    assert_eq!((whole.width, whole.height), (w, h));
    let mut trailing = jpeg.clone();
    trailing.extend([0u8; 100]);
    assert_eq!(zimage::image_io::decode_rgb(&trailing).unwrap(), whole);
    // Whatever follows the end marker (a motion photo's video, a vendor trailer) is not read,
    // even bytes that look like a start of scan with no end after them.
    let mut trailer = jpeg.clone();
    trailer.extend([0, 0, 0xFF, 0xDA]);
    trailer.extend([0x11; 200]);
    assert_eq!(zimage::image_io::decode_rgb(&trailer).unwrap(), whole);
    let mut state = 1u32;
    for _ in 0..8 {
        let mut noisy = jpeg.clone();
        noisy.extend((0..4000).map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        }));
        assert_eq!(zimage::image_io::decode_rgb(&noisy).unwrap(), whole);
    }
    for cut in [jpeg.len() - 2, jpeg.len() / 2, jpeg.len() - 40] {
        let e = zimage::image_io::decode_rgb(&jpeg[..cut]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Image, "cut at {cut}: {e}");
        assert!(e.to_string().contains("truncated"), "{e}");
    }
    // Cut inside the headers: the header reader's error.
    for cut in [300, 3] {
        assert_eq!(zimage::image_io::decode_rgb(&jpeg[..cut]).unwrap_err().kind(), ErrorKind::Image, "cut at {cut}");
    }
    // Every committed JPEG (baseline, progressive, CMYK, gray, EXIF-oriented with thumbnails
    // or not) is complete.
    for folder in ["tests/golden/common/formats", "tests/golden/common/orientation"] {
        for entry in std::fs::read_dir(repo().join(folder)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "jpg") {
                zimage::image_io::decode_rgb(&std::fs::read(&path).unwrap())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
        }
    }
}
