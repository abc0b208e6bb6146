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
fn vision_size(width: u32, height: u32, rules: &ReferenceRules, size: Option<(u32, u32)>) -> (u32, u32) {
    if width as u64 * height as u64 <= rules.max_area {
        return (width, height);
    }
    let target = size.map_or(rules.max_area, |(w, h)| w as u64 * h as u64);
    area_size(width, height, target)
}

/// The sizes a `width` x `height` reference (number `index`, 1-based) takes: what SigLIP2
/// sees, then its centre crop for the VAE (each side floored to the rules' multiple). A
/// refusal names the reference and its own size, and the size it was scaled to when that
/// left nothing (a small requested size scales a large reference down with it).
fn sizes(
    width: u32,
    height: u32,
    index: usize,
    rules: &ReferenceRules,
    size: Option<(u32, u32)>,
) -> Result<((u32, u32), (u32, u32))> {
    let (vw, vh) = vision_size(width, height, rules, size);
    let m = rules.multiple;
    let (w, h) = (vw / m * m, vh / m * m);
    if w == 0 || h == 0 {
        let scaled = if (vw, vh) == (width, height) {
            String::new()
        } else {
            let to = size.map_or("the model's reference area".to_string(), |(w, h)| format!("the area of {w}x{h}"));
            format!(" once scaled to {vw}x{vh} (to {to})")
        };
        return Err(Error::invalid(format!(
            "reference image {index} is {width}x{height}{scaled}: no {m}x{m} block to keep"
        )));
    }
    Ok(((vw, vh), (w, h)))
}

/// The size of the latents [`prepare`] makes of a `width` x `height` reference when the
/// request gives no size: the output's size when it is the last reference.
pub(crate) fn prepared_size(width: u32, height: u32, index: usize, rules: &ReferenceRules) -> Result<(u32, u32)> {
    sizes(width, height, index, rules, None).map(|(_, vae)| vae)
}

/// Prepares one (checked) reference, number `index` (1-based, for messages). `size`: the
/// request's (width, height) when both given.
pub(crate) fn prepare(
    image: &RgbImage,
    index: usize,
    rules: &ReferenceRules,
    size: Option<(u32, u32)>,
) -> Result<PreparedReference> {
    let ((vision_w, vision_h), (w, h)) = sizes(image.width, image.height, index, rules, size)?;
    let for_vision = if (vision_w, vision_h) != (image.width, image.height) {
        image_io::resize_rgb_with(image, vision_w, vision_h, Filter::Lanczos)?
    } else {
        image.clone()
    };
    let cropped = image_io::crop_rgb(&for_vision, (for_vision.width - w) / 2, (for_vision.height - h) / 2, w, h)?;
    let for_vae = image_io::to_model_input(&cropped).mapv(|v| half::bf16::from_f32(v).to_f32());
    Ok(PreparedReference { for_vision, for_vae })
}
