//! Checking a request against the package before anything runs, and deriving its shapes.

use super::control;
use super::denoise::Guidance;
use super::request::GenerateRequest;
use super::scheduler::Schedule;
use super::start;
use crate::error::{Error, Result};
use crate::limits::{check_guidance, check_request_pixels, MAX_IMAGES_PER_REQUEST, MAX_STEPS};
use crate::package::Manifest;
use crate::runtime::gpu::TensorRtOptions;

/// What a valid request needs from here on.
pub(crate) struct Plan {
    /// `[count, C, h, w]` of the latents.
    pub latent_shape: Vec<usize>,
    pub steps: usize,
    pub guidance: Guidance,
    /// The noise levels of the steps (the package's scheduler at this size).
    pub schedule: Schedule,
}

impl Plan {
    /// Checks `r` against the package (and the TensorRT profiles, when a graph runs on
    /// TensorRT) and derives its shapes; every error is an invalid request or image.
    pub fn new(r: &GenerateRequest, m: &Manifest, tensorrt: Option<&TensorRtOptions>) -> Result<Plan> {
        let multiple = m.size_multiple();
        for (name, value, max) in [("width", r.width, m.max_image_width()), ("height", r.height, m.max_image_height())]
        {
            if value == 0 || !(value as usize).is_multiple_of(multiple) {
                return Err(Error::invalid(format!("{name} {value} must be a positive multiple of {multiple}")));
            }
            if value as usize > max {
                return Err(Error::invalid(format!("{name} {value} exceeds this model's limit of {max} pixels")));
            }
        }
        if r.steps == 0 || r.steps > MAX_STEPS {
            return Err(Error::invalid(format!("steps must be 1..={MAX_STEPS} (got {})", r.steps)));
        }
        if r.count == 0 || r.count > MAX_IMAGES_PER_REQUEST {
            return Err(Error::invalid(format!("count must be 1..={MAX_IMAGES_PER_REQUEST} (got {})", r.count)));
        }
        check_request_pixels(r.count, r.width, r.height).map_err(Error::invalid)?;
        check_guidance(r.guidance_scale, r.cfg_normalization, r.cfg_truncation).map_err(Error::invalid)?;
        if let Some(trt) = tensorrt {
            if !trt.covers(r.width, r.height, r.count) {
                let range = trt.resolutions;
                return Err(Error::invalid(format!(
                    "{}x{} x{} is outside the TensorRT profile declared at load ({}x{} to {}x{}, up to {} images)",
                    r.width, r.height, r.count, range.min.0, range.min.1, range.max.0, range.max.1, trt.max_images
                )));
            }
        }
        let channels = m.vae.latent_channels;
        // diffusers writes this 2 * (H / (scale_factor * 2)), its 2 being Z-Image's patch size;
        // the latents are H / scale_factor whatever the patch size (a multiple of it keeps
        // them whole patches).
        let h = r.height as usize / m.vae.scale_factor;
        let w = r.width as usize / m.vae.scale_factor;
        let latent_shape = vec![r.count as usize, channels, h, w];
        if let Some(l) = &r.latents {
            if l.shape() != latent_shape.as_slice() {
                return Err(Error::invalid(format!(
                    "latents have shape {:?}, this request needs {latent_shape:?}",
                    l.shape()
                )));
            }
            if l.iter().any(|v| !v.is_finite()) {
                return Err(Error::invalid("latents hold non-finite values"));
            }
        }
        if let Some(init) = &r.init_image {
            start::check(init)?;
            start::first_step(r.steps as usize, init.strength)?;
        }
        if let Some(c) = &r.control {
            control::check(c, r.init_image.is_some())?;
        }
        let p = m.transformer.patch_size;
        let image_seq_len = (h / p) * (w / p);
        Ok(Plan {
            latent_shape,
            schedule: Schedule::for_request(&m.scheduler, r.steps as usize, image_seq_len)?,
            steps: r.steps as usize,
            guidance: Guidance {
                scale: r.guidance_scale,
                normalization: r.cfg_normalization,
                truncation: r.cfg_truncation,
            },
        })
    }
}
