//! The device-resident denoising loop (the default) against the host loop
//! (`LoadOptions::host_denoise_loop`): the same latents bit for bit on every path the loop has
//! (guidance on and off, guidance switched off part-way by truncation, renormalisation, a
//! batch of images, image-to-image starting part-way, inpainting's blend, caller latents that
//! overflow), nothing copied between host and device during the steps, and cancellation.
//! The diffusers goldens themselves are checked through the default (device) loop by
//! `parity.rs`. `ZIMAGE_TEST_DEVICE=cuda` runs this on a GPU too.

mod common;

use std::sync::OnceLock;

use common::{repo, test_device};
use zimage::{ErrorKind, GenerateRequest, Generation, InitImage, LoadOptions, Pipeline};

fn load(host_loop: bool) -> Pipeline {
    let mut options = LoadOptions::default();
    options.threads = Some(1);
    options.device = test_device();
    options.host_denoise_loop = host_loop;
    Pipeline::load(repo().join("models/tiny-zimage"), &options).expect("load package")
}

fn pipelines() -> &'static (Pipeline, Pipeline) {
    static BOTH: OnceLock<(Pipeline, Pipeline)> = OnceLock::new();
    BOTH.get_or_init(|| (load(false), load(true)))
}

fn request(prompt: &str, seed: u64) -> GenerateRequest {
    let mut r = GenerateRequest::new(prompt);
    r.width = 64;
    r.height = 48;
    r.steps = 6;
    r.seed = Some(seed);
    r.return_latents = true;
    r
}

fn picture(width: u32, height: u32) -> zimage::RgbImage {
    let pixels = (0..width * height * 3).map(|i| ((i * 37 + i / 7) % 256) as u8).collect();
    zimage::RgbImage { width, height, pixels }
}

/// Runs `request` both ways; asserts identical latents and images, and that the device loop
/// copied nothing between host and device during its steps.
fn same_both_ways(name: &str, request: &GenerateRequest) -> Generation {
    let (device, host) = pipelines();
    let mut progress = Vec::new();
    let mut record = |p: &zimage::Progress| {
        progress.push((p.step, p.total_steps));
        true
    };
    let on_device = device.generate(request, Some(&mut record)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let on_host = host.generate(request, None).unwrap_or_else(|e| panic!("{name}: {e}"));
    let (a, b) = (on_device.latents.as_ref().unwrap(), on_host.latents.as_ref().unwrap());
    assert_eq!(a.shape(), b.shape(), "{name}");
    assert!(a.iter().all(|v| v.is_finite()), "{name}: non-finite latents");
    let differing = a.iter().zip(b.iter()).filter(|(x, y)| x.to_bits() != y.to_bits() && x != y).count();
    assert_eq!(differing, 0, "{name}: {differing} latent values differ between the device and host loops");
    assert_eq!(on_device.images, on_host.images, "{name}: images differ");
    let steps = on_device.timings.denoise_steps.len();
    assert_eq!(steps, on_host.timings.denoise_steps.len(), "{name}");
    assert_eq!(progress, (1..=steps).map(|s| (s, steps)).collect::<Vec<_>>(), "{name}: progress");
    let traffic = on_device.timings.host_traffic.expect("the device loop reports its traffic");
    assert_eq!(traffic.max_step_bytes, 0, "{name}: bytes copied during a step");
    // The latents and the 8-byte non-finite flag come back once.
    assert_eq!(traffic.final_bytes, (a.len() * 4 + 8) as u64, "{name}");
    assert!(traffic.setup_bytes >= (a.len() * 4) as u64, "{name}: setup {}", traffic.setup_bytes);
    assert!(on_host.timings.host_traffic.is_none(), "{name}: the host loop reports no device traffic");
    on_device
}

#[test]
fn text_to_image_without_guidance() {
    let mut r = request("a red apple on a table", 7);
    r.guidance_scale = 0.0;
    same_both_ways("no guidance", &r);
}

#[test]
fn text_to_image_with_guidance_renormalisation_and_a_batch() {
    let mut r = request("a lighthouse at dusk, oil painting", 11);
    r.negative_prompt = Some("blurry".into());
    r.guidance_scale = 4.5;
    r.cfg_normalization = 0.4;
    r.count = 2;
    same_both_ways("guided, renormalised, 2 images", &r);
}

#[test]
fn guidance_switched_off_part_way_by_truncation() {
    // Steps whose normalised time exceeds the truncation run unguided: the loop changes batch
    // layout mid-run (2B rows, then B).
    let mut r = request("a small boat in a storm", 3);
    r.negative_prompt = Some("calm sea".into());
    r.guidance_scale = 3.0;
    r.cfg_truncation = 0.5;
    r.steps = 7;
    let generation = same_both_ways("truncated guidance", &r);
    assert_eq!(generation.timings.denoise_steps.len(), 7);
}

#[test]
fn image_to_image_starts_part_way() {
    let mut r = request("the same scene in winter", 5);
    r.init_image = Some(InitImage::image_to_image(picture(64, 48)));
    r.guidance_scale = 2.0;
    let generation = same_both_ways("img2img", &r);
    let steps = generation.timings.denoise_steps.len();
    assert!(steps > 0 && steps < 6, "img2img at strength 0.6 runs part of the schedule, ran {steps}");
}

#[test]
fn inpainting_blends_the_known_region_every_step() {
    let mut r = request("a cat sitting in the window", 9);
    let mask_pixels = (0..64 * 48).map(|i| if (i % 64) > 20 && (i / 64) < 30 { 255 } else { 0 }).collect();
    let mask = zimage::GrayImage { width: 64, height: 48, pixels: mask_pixels };
    r.init_image = Some(InitImage::inpaint(picture(64, 48), mask));
    r.guidance_scale = 1.5;
    r.count = 2;
    same_both_ways("inpaint", &r);
}

#[test]
fn overflowing_latents_are_reported_at_the_same_step() {
    // Caller latents at the edge of float32 overflow in the first Euler update.
    let (device, host) = pipelines();
    let mut r = request("anything", 1);
    r.guidance_scale = 0.0;
    let shape = (1, device.manifest().transformer.in_channels, 48 / 8, 64 / 8);
    r.latents = Some(ndarray::Array4::from_elem(shape, 3.0e38f32));
    let on_device = device.generate(&r, None).expect_err("non-finite latents");
    let on_host = host.generate(&r, None).expect_err("non-finite latents");
    assert_eq!(on_device.kind(), ErrorKind::Inference);
    assert_eq!(on_device.to_string(), on_host.to_string());
    assert!(on_device.to_string().contains("non-finite at step"), "{on_device}");

    // A long run stops within 8 steps of the overflow (the flag is read every 8 steps), not
    // after its last step; with previews, at the first preview step, with the same error (a
    // preview decoded from non-finite latents blamed the VAE decoder).
    r.steps = 200;
    let mut steps_seen = 0;
    let mut count = |p: &zimage::Progress| {
        steps_seen = p.step;
        true
    };
    let e = device.generate(&r, Some(&mut count)).expect_err("non-finite latents");
    assert_eq!(e.to_string(), host.generate(&r, None).unwrap_err().to_string());
    assert_eq!(steps_seen, 7, "stopped after the step that read the flag (step 8): {e}");
    let mut preview_seen = false;
    let mut previews = |p: &zimage::Progress| {
        preview_seen |= p.preview.is_some();
        true
    };
    r.steps = 5;
    r.previews = 1; // after step 3, before the first flag read
    let e = device.generate(&r, Some(&mut previews)).expect_err("non-finite latents");
    assert_eq!(e.to_string(), host.generate(&r, None).unwrap_err().to_string());
    assert!(!preview_seen);
}

#[test]
fn cancelling_from_progress_stops_the_device_loop() {
    let (device, _) = pipelines();
    let r = request("a quiet street", 2);
    let mut seen = 0;
    let mut stop_after_two = |p: &zimage::Progress| {
        seen = p.step;
        p.step < 2
    };
    let err = device.generate(&r, Some(&mut stop_after_two)).expect_err("cancelled");
    assert_eq!(err.kind(), ErrorKind::Cancelled);
    assert_eq!(seen, 2);
    // The pipeline stays usable.
    assert!(device.generate(&r, None).is_ok());
}

#[test]
fn buffers_kept_per_shape_serve_later_and_concurrent_generations() {
    // The device loop keeps its transformer buffers per shape on the session (a CUDA graph
    // replays those addresses) and refills them: later generations of the same shape, and of
    // other shapes in between, must come out exactly as the host loop computes them; two at
    // once (one of them runs on buffers of its own) too.
    let mut a = request("a red bicycle", 21);
    a.guidance_scale = 2.0;
    let mut b = request("a blue bicycle", 22);
    b.guidance_scale = 2.0;
    let mut other_size = request("a red bicycle", 23);
    other_size.width = 48;
    other_size.height = 64;
    for (name, r) in [("a", &a), ("b", &b), ("other size", &other_size), ("a again", &a), ("b again", &b)] {
        same_both_ways(name, r);
    }
    let (device, host) = pipelines();
    let expected: Vec<_> = [&a, &b].iter().map(|r| host.generate(r, None).unwrap().latents.unwrap()).collect();
    std::thread::scope(|scope| {
        let runs: Vec<_> = [&a, &b, &a]
            .into_iter()
            .map(|r| scope.spawn(move || device.generate(r, None).unwrap().latents.unwrap()))
            .collect();
        let got: Vec<_> = runs.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(got[0], expected[0], "concurrent a");
        assert_eq!(got[1], expected[1], "concurrent b");
        assert_eq!(got[2], expected[0], "concurrent a, second");
    });
}

#[test]
fn cuda_graph_fallback_is_reported() {
    let (device, _) = pipelines();
    let reason = device.cuda_graph_fallback();
    match test_device() {
        zimage::Device::Cpu => {
            let reason = reason.expect("no capture on the CPU");
            assert!(reason.contains("runs on the CPU"), "{reason}");
        }
        // On CUDA: either captured (None) or a reason naming what stopped it.
        _ => {
            if let Some(reason) = reason {
                assert!(reason.starts_with("CUDA graphs not used: "), "{reason}");
            }
        }
    }
    let mut options = LoadOptions::default();
    options.device = test_device();
    options.gpu.cuda_graphs = zimage::CudaGraphs::Off;
    options.memory_mode = zimage::MemoryMode::Sequential;
    let off = Pipeline::load(repo().join("models/tiny-zimage"), &options).unwrap();
    let reason = off.cuda_graph_fallback().unwrap();
    assert!(reason.contains("turned off"), "{reason}");
}
