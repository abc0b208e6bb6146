//! Quality of quantized packages against their float package: same prompts, same seeds.
//!
//!     cargo run --release -p zimage --example quant_quality -- REFERENCE PACKAGE[:int8-vae]... \
//!         [--size 512] [--steps 8] [--prompts 8] [--threads N]
//!
//! Generates each of the first `--prompts` built-in prompts (seed 1000 + i) with REFERENCE
//! (the fp32 package), then with every PACKAGE (one pipeline loaded at a time), and prints per
//! package the final-latent relative L2 (before VAE scaling), the image PSNR (8-bit RGB,
//! 20·log10(255/RMSE)) and the largest 8-bit difference: mean and worst over the prompts.
//! `PACKAGE:int8-vae` loads that package with `LoadOptions::int8_vae` (its int8 VAE decoder).

use std::time::Instant;

use zimage::{GenerateRequest, LoadOptions, Pipeline, RgbImage};

const PROMPTS: [&str; 8] = [
    "a red fox sitting in fresh snow at dawn, soft light",
    "一只橘猫趴在窗台上晒太阳，窗外是上海的老弄堂",
    "macro photo of a dew drop on a green leaf, shallow depth of field",
    "a neon sign that reads \"OPEN 24H\" above a rainy street at night",
    "an oil painting of a lighthouse in a storm, dramatic waves",
    "isometric pixel-art city block with tiny cars and trees",
    "portrait of an elderly fisherman with a weathered face, studio lighting",
    "a bowl of ramen with a soft-boiled egg, steam rising, top-down view",
];

struct Output {
    latents: Vec<f32>,
    image: RgbImage,
}

fn run(package: &str, options: &LoadOptions, size: u32, steps: u32, prompts: usize) -> zimage::Result<Vec<Output>> {
    let t = Instant::now();
    let pipeline = Pipeline::load(package, options)?;
    eprintln!("{package}: loaded in {:.2} s ({})", t.elapsed().as_secs_f64(), pipeline.manifest().weights_summary());
    let mut out = Vec::new();
    for (i, prompt) in PROMPTS.iter().take(prompts).enumerate() {
        let mut request = GenerateRequest::new(*prompt);
        (request.width, request.height, request.steps) = (size, size, steps);
        request.guidance_scale = 0.0;
        request.seed = Some(1000 + i as u64);
        request.return_latents = true;
        let t = Instant::now();
        let mut generation = pipeline.generate(&request, None)?;
        eprintln!("  prompt {i}: {:.1} s", t.elapsed().as_secs_f64());
        let latents = generation.latents.take().expect("latents requested").iter().copied().collect();
        out.push(Output { latents, image: generation.images.remove(0) });
    }
    Ok(out)
}

fn rel_l2(a: &[f32], reference: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(reference).map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum();
    let den: f64 = reference.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// (PSNR in dB, largest 8-bit difference); PSNR is infinite for identical images.
fn image_distance(a: &RgbImage, b: &RgbImage) -> (f64, u8) {
    let mut sq = 0.0f64;
    let mut worst = 0u8;
    for (x, y) in a.pixels.iter().zip(&b.pixels) {
        let d = x.abs_diff(*y);
        worst = worst.max(d);
        sq += f64::from(d).powi(2);
    }
    let mse = sq / a.pixels.len() as f64;
    (10.0 * (255.0f64 * 255.0 / mse).log10(), worst)
}

fn main() -> zimage::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut packages, mut size, mut steps, mut prompts, mut threads) = (Vec::new(), 512u32, 8u32, 8usize, None);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--size" => size = value().parse().expect("a size"),
            "--steps" => steps = value().parse().expect("a step count"),
            "--prompts" => prompts = value().parse::<usize>().expect("a count").min(PROMPTS.len()),
            "--threads" => threads = Some(value().parse().expect("a thread count")),
            _ => packages.push(a),
        }
    }
    assert!(
        packages.len() >= 2,
        "usage: quant_quality REFERENCE PACKAGE... [--size N] [--steps N] [--prompts N] [--threads N]"
    );
    let mut options = LoadOptions::default();
    options.threads = threads;
    let reference = run(&packages[0], &options, size, steps, prompts)?;
    let mut rows = Vec::new();
    for package in &packages[1..] {
        let mut options = options.clone();
        let path = match package.strip_suffix(":int8-vae") {
            Some(path) => {
                options.int8_vae = true;
                path
            }
            None => package,
        };
        let outputs = run(path, &options, size, steps, prompts)?;
        let rels: Vec<f64> = outputs.iter().zip(&reference).map(|(o, r)| rel_l2(&o.latents, &r.latents)).collect();
        let images: Vec<(f64, u8)> =
            outputs.iter().zip(&reference).map(|(o, r)| image_distance(&o.image, &r.image)).collect();
        rows.push((package.clone(), rels, images));
    }
    println!("{} prompts, {size}x{size}, {steps} steps, seeds 1000.., against {}", reference.len(), packages[0]);
    println!("| package | latent rel L2 mean | worst | PSNR mean (dB) | worst | max 8-bit diff worst |");
    println!("|---|---|---|---|---|---|");
    for (package, rels, images) in rows {
        let n = rels.len() as f64;
        let psnr: Vec<f64> = images.iter().map(|i| i.0).collect();
        println!(
            "| {package} | {:.2e} | {:.2e} | {:.1} | {:.1} | {} |",
            rels.iter().sum::<f64>() / n,
            rels.iter().copied().fold(0.0, f64::max),
            psnr.iter().sum::<f64>() / n,
            psnr.iter().copied().fold(f64::INFINITY, f64::min),
            images.iter().map(|i| i.1).max().unwrap_or(0)
        );
    }
    Ok(())
}
