//! An edit's reference pictures, checked and prepared as ZImageOmniPipeline prepares them
//! (diffusers' Flux2ImageProcessor):
//!
//! - each must be at least `min_side` pixels per side, with an aspect ratio of at most
//!   `max_aspect_ratio` (`check_image_input`);
//! - one larger than `max_area` pixels is first resized with Lanczos to about that area (or to
//!   the request's width x height when both are given): the picture SigLIP2 sees;
//! - the VAE gets it centre-cropped to multiples of `multiple` (no resampling), in [-1, 1],
//!   rounded to bfloat16 (the pipeline calls `vae.encode(image.bfloat16())`).

use ndarray::Array4;

use crate::error::{Error, Result};
use crate::image_io::{self, RgbImage};
use crate::package::edit::ReferenceRules;
use crate::pil_resize::Filter;

/// Largest reference accepted, in pixels (larger ones would only be scaled down to
/// `max_area` after costing their full decode): 64 megapixels.
pub const MAX_REFERENCE_PIXELS: u64 = 1 << 26;

/// One reference, prepared.
pub(crate) struct PreparedReference {
    /// What the SigLIP2 processor gets (after the area limit).
    pub for_vision: RgbImage,
    /// `[1, 3, h, w]` in [-1, 1], bf16-rounded: what the VAE encoder gets.
    pub for_vae: Array4<f32>,
}

/// Checks one reference against the package's rules (index for messages, 1-based).
pub(crate) fn check(image: &RgbImage, index: usize, rules: &ReferenceRules) -> Result<()> {
    check_size(image.width, image.height, index, rules)?;
    // Sizes first (above), so that a hostile size is refused without touching the buffer.
    image.check().map_err(|e| Error::Image(format!("reference image {index}: {e}")))
}

/// The size rules of [`check`], for a picture's size alone (a file's header, before decoding).
pub(crate) fn check_size(w: u32, h: u32, index: usize, rules: &ReferenceRules) -> Result<()> {
    if w == 0 || h == 0 {
        return Err(Error::Image(format!("reference image {index} is {w}x{h}: empty")));
    }
    if w as u64 * h as u64 > MAX_REFERENCE_PIXELS {
        return Err(Error::invalid(format!(
            "reference image {index} is {w}x{h}: more than {MAX_REFERENCE_PIXELS} pixels; scale it down first"
        )));
    }
    if w < rules.min_side || h < rules.min_side {
        return Err(Error::invalid(format!(
            "reference image {index} is {w}x{h}: both sides must be at least {} pixels",
            rules.min_side
        )));
    }
    let ratio = (w as f64 / h as f64).max(h as f64 / w as f64);
    if ratio > rules.max_aspect_ratio {
        return Err(Error::invalid(format!(
            "reference image {index} is {w}x{h}: aspect ratio {ratio:.1}:1 exceeds {}:1",
            rules.max_aspect_ratio
        )));
    }
    Ok(())
}

/// `Flux2ImageProcessor._resize_to_target_area`: the size scaled by sqrt(target / area),
/// each side truncated.
fn area_size(width: u32, height: u32, target_area: u64) -> (u32, u32) {
    let scale = (target_area as f64 / (width as f64 * height as f64)).sqrt();
    (((width as f64) * scale) as u32, ((height as f64) * scale) as u32)
}

/// The size of the picture SigLIP2 sees: the reference's own, or, above `max_area` pixels,
/// scaled to about that area (or to the request's width x height when both are given).
fn vision_size(width: u32, height: u32, rules: &ReferenceRules, size: Option<(u32, u32)>) -> Result<(u32, u32)> {
    if width as u64 * height as u64 <= rules.max_area {
        return Ok((width, height));
    }
    let target = size.map_or(rules.max_area, |(w, h)| w as u64 * h as u64);
    let (w, h) = area_size(width, height, target);
    if w == 0 || h == 0 {
        return Err(Error::invalid(format!("reference of {width}x{height} scales to nothing")));
    }
    Ok((w, h))
}

/// The centre crop of a `width` x `height` vision picture the VAE gets: each side floored to
/// the rules' multiple.
fn vae_size(width: u32, height: u32, rules: &ReferenceRules) -> Result<(u32, u32)> {
    let m = rules.multiple;
    let (w, h) = (width / m * m, height / m * m);
    if w == 0 || h == 0 {
        return Err(Error::invalid(format!("reference of {width}x{height} has no {m}x{m} block to keep")));
    }
    Ok((w, h))
}

/// The size of the latents [`prepare`] makes of a `width` x `height` reference when the
/// request gives no size: the output's size when it is the last reference.
pub(crate) fn prepared_size(width: u32, height: u32, rules: &ReferenceRules) -> Result<(u32, u32)> {
    let (w, h) = vision_size(width, height, rules, None)?;
    vae_size(w, h, rules)
}

/// Prepares one (checked) reference. `size`: the request's (width, height) when both given.
pub(crate) fn prepare(image: &RgbImage, rules: &ReferenceRules, size: Option<(u32, u32)>) -> Result<PreparedReference> {
    let (vision_w, vision_h) = vision_size(image.width, image.height, rules, size)?;
    let for_vision = if (vision_w, vision_h) != (image.width, image.height) {
        image_io::resize_rgb_with(image, vision_w, vision_h, Filter::Lanczos)?
    } else {
        image.clone()
    };
    let (w, h) = vae_size(for_vision.width, for_vision.height, rules)?;
    let cropped = image_io::crop_rgb(&for_vision, (for_vision.width - w) / 2, (for_vision.height - h) / 2, w, h)?;
    let for_vae = image_io::to_model_input(&cropped).mapv(|v| half::bf16::from_f32(v).to_f32());
    Ok(PreparedReference { for_vision, for_vae })
}
