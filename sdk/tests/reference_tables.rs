//! Parity of the model-free stages with torch/diffusers goldens: noise and scheduler tables.

mod common;

use common::*;
use zimage::TorchGenerator;
use zimage::{Schedule, SchedulerConfig};

#[test]
fn noise_matches_torch_randn() {
    let cases = json(&golden("common/noise.json"));
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 4);
    for case in cases {
        let seed = case["seed"].as_u64().unwrap();
        let mut generator = TorchGenerator::new(seed);
        for draw in case["draws"].as_array().unwrap() {
            let shape: Vec<usize> =
                draw["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            let want = npy_f32(&golden("common").join(draw["file"].as_str().unwrap()));
            let got = generator.randn(&shape);
            assert_eq!(got.shape(), want.shape(), "{}", case["name"]);
            let diff = max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap());
            assert!(diff <= 1e-6, "{} seed {seed} shape {shape:?}: max abs diff {diff}", case["name"]);
        }
    }
}

#[test]
fn scheduler_tables_equal_diffusers() {
    let cases = json(&golden("common/scheduler.json"));
    for case in cases.as_array().unwrap() {
        let config: SchedulerConfig = serde_json::from_value(case["config"].clone()).unwrap();
        config.check().unwrap();
        let steps = case["num_inference_steps"].as_u64().unwrap() as usize;
        let seq = case["image_seq_len"].as_u64().unwrap() as usize;
        let schedule = Schedule::new(&config, steps, seq);
        let sigmas = npy_f32(&golden("common").join(case["sigmas_file"].as_str().unwrap()));
        let timesteps = npy_f32(&golden("common").join(case["timesteps_file"].as_str().unwrap()));
        assert_eq!(schedule.sigmas.as_slice(), sigmas.as_slice().unwrap(), "sigmas of {}", case["name"]);
        assert_eq!(schedule.timesteps.as_slice(), timesteps.as_slice().unwrap(), "timesteps of {}", case["name"]);
    }
}

/// `image_io::resize_rgb_with` (`pil_resize`) against Pillow 13.0.0's `Image.resize` (tests/golden/common/resize.json:
/// both pass orders, their boundary, one-axis and upscaling cases, three filters): the same
/// bytes.
#[test]
fn pil_resize_equals_pillow() {
    let doc = json(&golden("common/resize.json"));
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 48, "{} cases", cases.len());
    for case in cases {
        let input = png_rgb(&golden("common").join(case["input_file"].as_str().unwrap()));
        let want = png_rgb(&golden("common").join(case["output_file"].as_str().unwrap()));
        let filter = zimage::pil_resize::Filter::from_name(case["filter"].as_str().unwrap()).unwrap();
        let (width, height) = (case["width"].as_u64().unwrap() as u32, case["height"].as_u64().unwrap() as u32);
        let got = zimage::image_io::resize_rgb_with(&input, width, height, filter).unwrap();
        assert_eq!((got.width, got.height), (want.width, want.height), "{}", case["output_file"]);
        let differing = got.pixels.iter().zip(&want.pixels).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{}: {differing} bytes differ", case["output_file"]);
        if filter == zimage::pil_resize::Filter::Lanczos {
            // What the CLI, the server and ControlNet do to a picture of another size, as
            // diffusers' image processor does (PIL, Lanczos).
            let resized = zimage::image_io::resize_rgb(&input, width, height).unwrap();
            assert_eq!(resized, want, "resize_rgb to {}", case["output_file"]);
        }
    }
}

/// `image_io::resize_gray` against Pillow 13.0.0's `Image.resize` of a mode-L mask with Lanczos
/// (tests/golden/common/resize.json, `gray_cases`: up, down, another aspect): the same bytes, as
/// diffusers' mask processor resizes a mask of another size before binarising it.
#[test]
fn mask_resize_equals_pillow() {
    let doc = json(&golden("common/resize.json"));
    let cases = doc["gray_cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let input = zimage::image_io::load_gray(&golden("common").join(case["input_file"].as_str().unwrap())).unwrap();
        let want = zimage::image_io::load_gray(&golden("common").join(case["output_file"].as_str().unwrap())).unwrap();
        let (width, height) = (case["width"].as_u64().unwrap() as u32, case["height"].as_u64().unwrap() as u32);
        assert_eq!(zimage::image_io::resize_gray(&input, width, height).unwrap(), want, "{}", case["output_file"]);
    }
}

/// Input pictures are turned upright by their EXIF orientation as diffusers' `load_image` turns
/// them (`PIL.ImageOps.exif_transpose`, then `convert("RGB")`, or `convert("L")` for masks):
/// tests/golden/common/orientation.json, a picture of 35 distinct colours as PNG, JPEG and WebP
/// with each orientation 1-8. PNG and lossless WebP give Pillow's bytes. JPEG decoders differ
/// by a level or two (Pillow's libjpeg against the image crate's), so a JPEG must give its
/// unrotated decode moved pixel for pixel where Pillow moved the PNG's (the colours are
/// distinct, so the PNG goldens say where each pixel goes). The header's size is the upright
/// one too (the CLI, the server and editing size requests and masks from it before decoding).
#[test]
fn input_pictures_are_upright_as_diffusers_loads_them() {
    let doc = json(&golden("common/orientation.json"));
    let cases = doc["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 24);
    let path = |case: &serde_json::Value, key: &str| golden("common").join(case[key].as_str().unwrap());
    let case_of = |name: String| cases.iter().find(|c| c["file"] == name.as_str()).unwrap();
    let stored = png_rgb(&path(case_of("orientation/o1.png".into()), "rgb_file"));
    let stored_jpeg = std::fs::read(path(case_of("orientation/o1.jpg".into()), "file")).unwrap();
    let (stored_jpeg_rgb, stored_jpeg_gray) =
        (zimage::image_io::decode_rgb(&stored_jpeg).unwrap(), zimage::image_io::decode_gray(&stored_jpeg).unwrap());
    for case in cases {
        let name = case["file"].as_str().unwrap();
        let bytes = std::fs::read(path(case, "file")).unwrap();
        let (width, height) = (case["width"].as_u64().unwrap() as u32, case["height"].as_u64().unwrap() as u32);
        assert_eq!(zimage::image_io::image_size(&bytes).unwrap(), (width, height), "{name}");
        let rgb = zimage::image_io::decode_rgb(&bytes).unwrap();
        let gray = zimage::image_io::decode_gray(&bytes).unwrap();
        assert_eq!(zimage::image_io::load_rgb(&path(case, "file")).unwrap(), rgb, "{name} from its file");
        assert_eq!((rgb.width, rgb.height, gray.width, gray.height), (width, height, width, height), "{name}");
        if name.ends_with(".jpg") {
            // Where Pillow put each stored pixel of the PNG with the same orientation.
            let png = case_of(name.replace(".jpg", ".png"));
            let moved = png_rgb(&path(png, "rgb_file"));
            let source: Vec<usize> = moved
                .pixels
                .chunks(3)
                .map(|p| stored.pixels.chunks(3).position(|q| q == p).expect("distinct colours"))
                .collect();
            let want_rgb: Vec<u8> =
                source.iter().flat_map(|&i| stored_jpeg_rgb.pixels[3 * i..3 * i + 3].to_vec()).collect();
            let want_gray: Vec<u8> = source.iter().map(|&i| stored_jpeg_gray.pixels[i]).collect();
            assert_eq!(rgb.pixels, want_rgb, "{name} as RGB");
            assert_eq!(gray.pixels, want_gray, "{name} as gray");
        } else {
            assert_eq!(rgb, png_rgb(&path(case, "rgb_file")), "{name} as RGB");
            let want_gray = image::open(path(case, "gray_file")).unwrap().into_luma8();
            assert_eq!(gray.pixels, want_gray.into_raw(), "{name} as gray");
        }
    }
}

/// Input pictures in every sample format a user's file may have decode to what diffusers'
/// `load_image` gives (tests/golden/common/formats.json): 16-bit PNGs as Pillow reads them
/// (the high byte, or `I;16`'s clipping for gray without alpha), palettes, gray with alpha,
/// 1-bit, lossy WebP with and without alpha: the same bytes, as RGB and as a mask's gray. JPEG
/// decoders differ (Pillow's libjpeg-turbo and the image crate's zune-jpeg round their inverse
/// DCTs and chroma upsampling differently): at most 3 levels apart, on a minority of the
/// samples (these files: 1 level for gray and CMYK, 2 for the colour ones, 27 % of the samples
/// at 4:2:0; 3 levels were seen on a larger 4:2:0 picture).
#[test]
fn input_pictures_of_every_sample_format_decode_as_diffusers_loads_them() {
    const JPEG_LEVELS: u8 = 3;
    let doc = json(&golden("common/formats.json"));
    let cases = doc["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 15);
    let path = |case: &serde_json::Value, key: &str| golden("common").join(case[key].as_str().unwrap());
    for case in cases {
        let name = case["file"].as_str().unwrap();
        let bytes = std::fs::read(path(case, "file")).unwrap();
        let want_rgb = png_rgb(&path(case, "rgb_file"));
        let want_gray = image::open(path(case, "gray_file")).unwrap().into_luma8().into_raw();
        let rgb = zimage::image_io::decode_rgb(&bytes).unwrap();
        let gray = zimage::image_io::decode_gray(&bytes).unwrap();
        assert_eq!((rgb.width, rgb.height), (want_rgb.width, want_rgb.height), "{name}");
        assert_eq!((gray.width, gray.height), (want_rgb.width, want_rgb.height), "{name}");
        if name.ends_with(".jpg") {
            for (what, got, want) in [("RGB", &rgb.pixels, &want_rgb.pixels), ("gray", &gray.pixels, &want_gray)] {
                let levels: Vec<u8> = got.iter().zip(want.iter()).map(|(a, b)| a.abs_diff(*b)).collect();
                let worst = *levels.iter().max().unwrap();
                let differing = levels.iter().filter(|&&d| d > 0).count();
                assert!(worst <= JPEG_LEVELS, "{name} as {what}: {worst} levels from Pillow's");
                assert!(
                    differing * 2 < levels.len(),
                    "{name} as {what}: {differing} of {} samples differ",
                    levels.len()
                );
            }
        } else {
            assert_eq!(rgb, want_rgb, "{name} as RGB (Pillow mode {})", case["pillow_mode"]);
            assert_eq!(gray.pixels, want_gray, "{name} as gray (Pillow mode {})", case["pillow_mode"]);
        }
    }
}
