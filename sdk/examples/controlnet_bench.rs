//! Time per denoising step and memory with and without a ControlNet, one mode per process (so
//! each peak is its own):
//!
//!     cargo run --release -p zimage --example controlnet_bench -- PACKAGE [CONTROLNET] \
//!         [--size 512] [--steps 4] [--threads N] [--runs 2] [--inpaint] [--attach-after-load]
//!
//! Without CONTROLNET: the plain transformer. With it: loaded with `LoadOptions::controlnet`
//! (`--attach-after-load`: the plain transformer loaded, then `Pipeline::set_controlnet`, to
//! compare the load time and peak) and a control condition (a synthetic edge map; `--inpaint` adds a picture and mask, for a
//! ControlNet with 2C+1 channels). Reports the median step time over the timed runs (the first
//! run is a warmup), and the process's resident memory after loading/attaching and its peak
//! (Linux: VmRSS / VmHWM).

use std::time::{Duration, Instant};

use zimage::{ControlCondition, GenerateRequest, GrayImage, LoadOptions, Pipeline, RgbImage};

fn status_mib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with(key))?.to_string();
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// White rings and lines on black: what an edge map looks like.
fn edge_map(size: u32) -> RgbImage {
    let mut pixels = Vec::with_capacity((size * size * 3) as usize);
    let c = size as f32 / 2.0;
    for y in 0..size {
        for x in 0..size {
            let r = ((x as f32 - c).powi(2) + (y as f32 - c).powi(2)).sqrt();
            let on = (r % 48.0) < 2.0 || x % 64 == 0 || y == x;
            pixels.extend(if on { [255, 255, 255] } else { [0, 0, 0] });
        }
    }
    RgbImage { width: size, height: size, pixels }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> zimage::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut package, mut controlnet) = (None, None);
    let (mut size, mut steps, mut runs, mut threads, mut inpaint) = (512u32, 4u32, 2usize, None, false);
    let mut attach_after_load = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size" => size = args.next().expect("--size N").parse().expect("a number"),
            "--steps" => steps = args.next().expect("--steps N").parse().expect("a number"),
            "--runs" => runs = args.next().expect("--runs N").parse().expect("a number"),
            "--threads" => threads = Some(args.next().expect("--threads N").parse().expect("a number")),
            "--inpaint" => inpaint = true,
            "--attach-after-load" => attach_after_load = true,
            _ if package.is_none() => package = Some(a),
            _ => controlnet = Some(a),
        }
    }
    let package = package.expect("PACKAGE");
    let mut options = LoadOptions::default();
    options.threads = threads;
    if !attach_after_load {
        options.controlnet = controlnet.clone();
    }
    let t = Instant::now();
    let pipeline = Pipeline::load(&package, &options)?;
    if let (Some(name), true) = (&controlnet, attach_after_load) {
        pipeline.set_controlnet(Some(name))?;
    }
    println!(
        "mode: {}; load{}: {:.2} s; RSS {:.0} MiB, peak {:.0} MiB",
        controlnet.as_deref().unwrap_or("plain transformer"),
        match (&controlnet, attach_after_load) {
            (Some(_), true) => " + set_controlnet",
            (Some(_), false) => " with LoadOptions::controlnet",
            _ => "",
        },
        t.elapsed().as_secs_f64(),
        status_mib("VmRSS:"),
        status_mib("VmHWM:")
    );
    let mut request = GenerateRequest::new("a lighthouse on a cliff at dusk, oil painting");
    request.width = size;
    request.height = size;
    request.steps = steps;
    request.seed = Some(1);
    if controlnet.is_some() {
        let map = edge_map(size);
        request.control = Some(if inpaint {
            let mut mask = GrayImage { width: size, height: size, pixels: vec![0; (size * size) as usize] };
            mask.pixels[..(size * size / 2) as usize].fill(255);
            ControlCondition::inpaint(map.clone(), map, mask)
        } else {
            ControlCondition::new(map)
        });
    }
    let mut step_times = Vec::new();
    for run in 0..=runs {
        let result = pipeline.generate(&request, None)?;
        if run > 0 {
            step_times.extend(result.timings.denoise_steps.iter().copied());
        }
    }
    println!(
        "{size}x{size}, {steps} steps, {runs} timed runs: median step {:.3} s; RSS {:.0} MiB, peak {:.0} MiB",
        median(step_times).as_secs_f64(),
        status_mib("VmRSS:"),
        status_mib("VmHWM:")
    );
    Ok(())
}
