//! Where denoising starts: seeded noise (text-to-image), or an input picture noised to the
//! strength's level (image-to-image), plus the per-step re-imposition of the kept region
//! (inpainting), in diffusers' order of random draws (img2img: VAE sample, then noise; inpaint
//! with caller latents: noise, then VAE sample). New ways to start plug in here.

use ndarray::{s, Array2, Array4, Axis, Ix4, Zip};

use super::latent_mask::latent_mask;
use super::noise::TorchGenerator;
use super::request::InitImage;
use super::scheduler::Schedule;
use crate::error::{Error, Result};
use crate::image_io;
use crate::model::vae::Vae;
use crate::runtime::graph::Graph;
use crate::runtime::run_context::RunContext;

/// Where denoising starts, and what inpainting needs after each step.
pub(crate) struct Start {
    pub latents: Array4<f32>,
    pub first_step: usize,
    pub inpaint: Option<InpaintBlend>,
}

/// diffusers' `get_timesteps`: the index of the first step that runs for this strength.
pub(crate) fn first_step(steps: usize, strength: f64) -> Result<usize> {
    if !(0.0..=1.0).contains(&strength) {
        return Err(Error::invalid(format!("strength must be within [0, 1] (got {strength})")));
    }
    let init = (steps as f64 * strength).min(steps as f64);
    let start = (steps as f64 - init).max(0.0) as usize;
    if start >= steps {
        return Err(Error::invalid(format!(
            "strength {strength} with {steps} steps leaves no denoising step; raise strength or steps"
        )));
    }
    Ok(start)
}

/// Checks the input picture and mask (their buffers; pictures of another size than the
/// request's are resized to it: [`super::request::GenerateRequest::pictures_at_size`]).
pub(crate) fn check(init: &InitImage) -> Result<()> {
    init.image.check_input("init image")?;
    if let Some(mask) = &init.mask {
        mask.check_input("mask")?;
    }
    Ok(())
}

/// Text-to-image: the caller's latents, or seeded noise of `shape` `[K, C, h, w]`.
pub(crate) fn from_noise(shape: &[usize], seed: u64, caller_latents: Option<&Array4<f32>>) -> Start {
    let latents = match caller_latents {
        Some(l) => l.clone(),
        None => draw(&mut TorchGenerator::new(seed), shape),
    };
    Start { latents, first_step: 0, inpaint: None }
}

/// The input picture a request starts from, and the VAE that encodes it.
pub(crate) struct FromImage<'a> {
    pub vae: &'a Vae,
    pub encoder: &'a Graph,
    pub init: &'a InitImage,
}

/// Builds the starting latents `[K, C, h, w]` for an img2img or inpaint request.
pub(crate) fn from_image(
    source: FromImage<'_>,
    shape: &[usize],
    schedule: &Schedule,
    seed: u64,
    caller_latents: Option<&Array4<f32>>,
    context: &RunContext,
) -> Result<Start> {
    let FromImage { vae, encoder, init } = source;
    let steps = schedule.len();
    let first = first_step(steps, init.strength)?;
    let mut generator = TorchGenerator::new(seed);
    let count = shape[0];
    let latent_shape = [1, shape[1], shape[2], shape[3]];
    let sigma = schedule.sigmas[first];

    let Some(mask) = &init.mask else {
        // img2img: caller latents replace the whole preparation, as in diffusers.
        if let Some(l) = caller_latents {
            return Ok(Start { latents: l.clone(), first_step: first, inpaint: None });
        }
        let image_latents = encode(vae, encoder, init, &latent_shape, &mut generator, context)?;
        let noise = draw(&mut generator, shape);
        let latents = scale_noise(&broadcast(&image_latents, count), &noise, sigma);
        return Ok(Start { latents, first_step: first, inpaint: None });
    };

    let (latents, noise, image_latents) = match caller_latents {
        Some(l) => {
            let noise = draw(&mut generator, shape);
            let image_latents = encode(vae, encoder, init, &latent_shape, &mut generator, context)?;
            (l.clone(), noise, image_latents)
        }
        None => {
            let image_latents = encode(vae, encoder, init, &latent_shape, &mut generator, context)?;
            let noise = draw(&mut generator, shape);
            (scale_noise(&broadcast(&image_latents, count), &noise, sigma), noise, image_latents)
        }
    };
    let blend = InpaintBlend {
        image_latents: broadcast(&image_latents, count),
        noise,
        mask: latent_mask(mask, shape[2], shape[3]),
    };
    Ok(Start { latents, first_step: first, inpaint: Some(blend) })
}

fn draw(generator: &mut TorchGenerator, shape: &[usize]) -> Array4<f32> {
    generator.randn(shape).into_dimensionality::<Ix4>().expect("4-d shape")
}

/// VAE-encodes the picture and samples its latent distribution with the generator's next
/// draw, then applies the package's shift and scale: `(z - shift) * scaling`.
fn encode(
    vae: &Vae,
    encoder: &Graph,
    init: &InitImage,
    latent_shape: &[usize; 4],
    generator: &mut TorchGenerator,
    context: &RunContext,
) -> Result<Array4<f32>> {
    let pixels = image_io::to_model_input(&init.image);
    let (mean, logvar) = vae.encode(encoder, &pixels, context)?;
    if mean.shape() != latent_shape {
        return Err(encoder.failed(format!("latent shape {:?}, expected {latent_shape:?}", mean.shape())));
    }
    let sample = draw(generator, latent_shape);
    let shift = vae.info.shift_factor as f32;
    let scaling = vae.info.scaling_factor as f32;
    let mut z = Array4::<f32>::zeros(mean.raw_dim());
    Zip::from(&mut z).and(&mean).and(&logvar).and(&sample).for_each(|z, &m, &lv, &e| {
        let std = (0.5f32 * lv).exp();
        *z = (m + std * e - shift) * scaling;
    });
    Ok(z)
}

/// The same latents for each of `count` images.
fn broadcast(one: &Array4<f32>, count: usize) -> Array4<f32> {
    let views: Vec<_> = (0..count).map(|_| one.view()).collect();
    ndarray::concatenate(Axis(0), &views).expect("same shapes")
}

/// Flow-matching forward process: `sigma * noise + (1 - sigma) * sample`.
fn scale_noise(sample: &Array4<f32>, noise: &Array4<f32>, sigma: f32) -> Array4<f32> {
    let mut out = Array4::<f32>::zeros(sample.raw_dim());
    Zip::from(&mut out).and(sample).and(noise).for_each(|o, &x, &n| *o = sigma * n + (1.0f32 - sigma) * x);
    out
}

/// Inpainting's per-step blend: outside the mask, the input picture noised to the next
/// step's level (clean at the last step).
pub(crate) struct InpaintBlend {
    image_latents: Array4<f32>,
    noise: Array4<f32>,
    mask: Array2<f32>,
}

impl InpaintBlend {
    /// The clean image latents, the noise they are re-noised with, and the latent-grid mask
    /// (1 = repaint): what the device loop's step graph blends with.
    pub fn parts(&self) -> (&Array4<f32>, &Array4<f32>, &Array2<f32>) {
        (&self.image_latents, &self.noise, &self.mask)
    }

    pub fn apply(&self, step: usize, schedule: &Schedule, latents: &mut Array4<f32>) {
        let known = if step + 1 < schedule.len() {
            scale_noise(&self.image_latents, &self.noise, schedule.sigmas[step + 1])
        } else {
            self.image_latents.clone()
        };
        for (mut item, known_item) in latents.outer_iter_mut().zip(known.outer_iter()) {
            for c in 0..item.shape()[0] {
                let mut channel = item.slice_mut(s![c, .., ..]);
                Zip::from(&mut channel)
                    .and(&known_item.slice(s![c, .., ..]))
                    .and(&self.mask)
                    .for_each(|x, &k, &m| *x = (1.0f32 - m) * k + m * *x);
            }
        }
    }
}
