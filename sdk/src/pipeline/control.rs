//! ControlNet conditioning (docs/controlnet.md): what a request gives (a control image, its
//! conditioning scale, and for ControlNet inpainting a picture and a mask), the checks, and
//! the control latents the combined transformer + ControlNet graph takes, prepared as
//! diffusers' ZImageControlNetPipeline / ZImageControlNetInpaintPipeline do:
//!
//! - control latents: the control image VAE-encoded, the distribution's mode (mean), shifted
//!   and scaled like latents;
//! - `control_in_dim == C`: those alone; wider: zero-padded (diffusers' text-to-image path);
//! - inpainting (`control_in_dim == 2C + 1`): `[control latents, 1 - mask at latent size
//!   (nearest), latents of the picture with the repainted region zeroed in pixel space]`.
//!   It starts from pure noise: there is no strength, the picture and mask enter only here.

use std::path::Path;

use ndarray::{concatenate, Array4, Axis, Zip};

use super::latent_mask::latent_mask;
use crate::error::{Error, Result};
use crate::image_io::{self, GrayImage, RgbImage};
use crate::limits::MAX_CONTROL_SCALE;
use crate::model::controlnet::{self as controlnet_graph, ControlInputs};
use crate::model::vae::Vae;
use crate::package::controlnet::ControlNetInfo;
use crate::package::files::check_package_files;
use crate::package::graph::GraphKind;
use crate::package::Manifest;
use crate::runtime::graph::Graph;
use crate::runtime::run_context::RunContext;

/// A request's ControlNet condition. Needs a ControlNet attached to the pipeline
/// ([`Pipeline::set_controlnet`](super::Pipeline::set_controlnet)).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ControlCondition {
    /// The control map (edges, depth, pose ...), or with `preprocess` the picture it is made
    /// from. One of another size than the request's is resized to it (Pillow's Lanczos, as
    /// diffusers resizes a control image).
    pub image: RgbImage,
    /// Multiplies the ControlNet's hints; diffusers' default 0.75. Finite.
    pub conditioning_scale: f32,
    /// ControlNet inpainting: the picture and the mask to repaint (white), resized to the
    /// request's size like `image`. Only for a ControlNet with `control_in_dim = 2C + 1`
    /// (Union 2.x).
    pub inpaint: Option<ControlInpaint>,
    /// How `image` is made into the control map, by the pipeline once it is at the request's
    /// size (as `zimage generate` resizes a photo, then finds its edges). Default: none, `image`
    /// is the map.
    pub preprocess: crate::control_preprocess::ControlPreprocess,
}

/// The picture and mask of a ControlNet inpainting request.
#[derive(Debug, Clone)]
pub struct ControlInpaint {
    pub image: RgbImage,
    /// White (>= 128 after binarising) = repaint.
    pub mask: GrayImage,
}

impl ControlCondition {
    /// diffusers' `controlnet_conditioning_scale` default.
    pub const DEFAULT_SCALE: f32 = 0.75;

    /// Text-to-image guided by `image`, at the default scale.
    pub fn new(image: RgbImage) -> ControlCondition {
        ControlCondition {
            image,
            conditioning_scale: Self::DEFAULT_SCALE,
            inpaint: None,
            preprocess: crate::control_preprocess::ControlPreprocess::None,
        }
    }

    /// Refuses a conditioning scale that is NaN or beyond +-`limits::MAX_CONTROL_SCALE`
    /// ([`ErrorKind::InvalidRequest`](crate::ErrorKind::InvalidRequest)): what a request's
    /// check says of it, for front ends that check a field before building the request.
    pub fn check_scale(scale: f32) -> Result<()> {
        // NaN fails the comparison too.
        if scale.is_nan() || scale.abs() > MAX_CONTROL_SCALE {
            return Err(Error::invalid(format!(
                "controlnet conditioning scale must be -{MAX_CONTROL_SCALE}..={MAX_CONTROL_SCALE} (got {scale})"
            )));
        }
        Ok(())
    }

    /// ControlNet inpainting: repaint `picture` where `mask` is white, guided by `image`.
    pub fn inpaint(image: RgbImage, picture: RgbImage, mask: GrayImage) -> ControlCondition {
        ControlCondition { inpaint: Some(ControlInpaint { image: picture, mask }), ..ControlCondition::new(image) }
    }

    /// The condition the front ends build from pictures of any size, as `zimage generate`
    /// does: `control` resized to `width` x `height` (the request's size) and then
    /// preprocessed; with `inpaint`, ControlNet inpainting of that picture under its mask, both
    /// resized too (the mask as diffusers' mask processor resizes it). Default scale.
    pub fn resized(
        control: &RgbImage,
        preprocess: crate::control_preprocess::ControlPreprocess,
        width: u32,
        height: u32,
        inpaint: Option<(&RgbImage, GrayImage)>,
    ) -> Result<ControlCondition> {
        let map = preprocess.apply(&image_io::resize_rgb(control, width, height)?)?;
        Ok(match inpaint {
            Some((picture, mask)) => {
                let (picture, mask) =
                    (image_io::resize_rgb(picture, width, height)?, image_io::resize_gray(&mask, width, height)?);
                ControlCondition::inpaint(map, picture, mask)
            }
            None => ControlCondition::new(map),
        })
    }
}

/// Checks a condition (no model needed). Its pictures may have any size: they are resized to
/// the request's ([`super::request::GenerateRequest::pictures_at_size`]).
pub(crate) fn check(control: &ControlCondition, has_init_image: bool) -> Result<()> {
    if has_init_image {
        return Err(Error::invalid(
            "a request has either an init image or a ControlNet condition: for ControlNet inpainting give the \
             picture and mask in the control condition (it starts from noise, without strength)",
        ));
    }
    ControlCondition::check_scale(control.conditioning_scale)?;
    control.image.check_input("control image")?;
    if let Some(inpaint) = &control.inpaint {
        inpaint.image.check_input("ControlNet inpainting picture")?;
        inpaint.mask.check_input("ControlNet inpainting mask")?;
    }
    Ok(())
}

/// Checks a condition against the attached ControlNet.
pub(crate) fn check_fits(control: &ControlCondition, name: &str, info: &ControlNetInfo, channels: usize) -> Result<()> {
    if control.inpaint.is_some() && !info.supports_inpainting(channels) {
        return Err(Error::invalid(format!(
            "ControlNet {name} takes {} control channels, not the {} of inpainting (control, mask, picture): it \
             cannot inpaint",
            info.control_in_dim,
            2 * channels + 1
        )));
    }
    Ok(())
}

/// The control latents `[1, control_in_dim, h, w]` and scale for the combined graph.
pub(crate) fn prepare(
    vae: &Vae,
    encoder: &Graph,
    info: &ControlNetInfo,
    control: &ControlCondition,
    context: &RunContext,
) -> Result<ControlInputs> {
    let channels = vae.info.latent_channels;
    let control_latents = encode_mode(vae, encoder, image_io::to_model_input(&control.image), context)?;
    let (_, _, h, w) = control_latents.dim();
    let context_latents = match &control.inpaint {
        Some(inpaint) => {
            let mut pixels = image_io::to_model_input(&inpaint.image);
            // diffusers: image * (mask < 0.5), the mask binarised at pixel level.
            let mw = inpaint.mask.width as usize;
            for ((_, _, y, x), v) in pixels.indexed_iter_mut() {
                if inpaint.mask.pixels[y * mw + x] as f32 / 255.0 >= 0.5 {
                    *v = 0.0;
                }
            }
            let picture = encode_mode(vae, encoder, pixels, context)?;
            let keep = latent_mask(&inpaint.mask, h, w).mapv(|m| 1.0 - m);
            let keep = keep.into_shape_with_order((1, 1, h, w)).expect("same element count");
            concatenate![Axis(1), control_latents, keep, picture]
        }
        None => {
            let pad = Array4::<f32>::zeros((1, info.control_in_dim - channels, h, w));
            concatenate![Axis(1), control_latents, pad]
        }
    };
    if context_latents.shape()[1] != info.control_in_dim {
        return Err(Error::invalid(format!(
            "the ControlNet takes {} control channels; this condition makes {}",
            info.control_in_dim,
            context_latents.shape()[1]
        )));
    }
    Ok(ControlInputs { context: context_latents, scale: control.conditioning_scale })
}

/// Inputs for a generation without a control condition on a pipeline that has a ControlNet
/// attached: zero control latents at scale 0. Every hint is then multiplied by 0 before it is
/// added, so the prediction is the plain transformer's (at the ControlNet's extra cost).
pub(crate) fn neutral(info: &ControlNetInfo, h: usize, w: usize) -> ControlInputs {
    ControlInputs { context: Array4::zeros((1, info.control_in_dim, h, w)), scale: 0.0 }
}

/// VAE-encodes `pixels` and takes the distribution's mode (diffusers' `sample_mode="argmax"`),
/// shifted and scaled like latents: `(mean - shift) * scaling`.
fn encode_mode(vae: &Vae, encoder: &Graph, pixels: Array4<f32>, context: &RunContext) -> Result<Array4<f32>> {
    let (mut mean, _) = vae.encode(encoder, &pixels, context)?;
    let shift = vae.info.shift_factor as f32;
    let scaling = vae.info.scaling_factor as f32;
    Zip::from(&mut mean).for_each(|z| *z = (*z - shift) * scaling);
    Ok(mean)
}

/// The manifest entry of the package's ControlNet `name`, checked against the package (made
/// for this transformer file and width, its interface) and its files: a `Package` error when
/// it does not fit. Packages whose transformer is quantized are refused: the combined graph
/// reads the float weights it shares with the transformer at their offsets in the float
/// transformer's file, which a quantized package does not have.
pub(crate) fn entry(dir: &Path, manifest: &Manifest, verify_checksums: bool, name: &str) -> Result<ControlNetInfo> {
    let manifest_path = dir.join("manifest.json");
    let info = manifest.controlnets.get(name).ok_or_else(|| {
        let known: Vec<&str> = manifest.controlnets.keys().map(String::as_str).collect();
        let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
        Error::package(
            &manifest_path,
            format!("no ControlNet {name:?} in this package (it has: {known}); add one with export_controlnet.py"),
        )
    })?;
    if let Some(q) = manifest.quantization.as_ref().filter(|q| q.graphs.contains_key("transformer")) {
        return Err(Error::package(
            &manifest_path,
            format!(
                "controlnets.{name}: ControlNets run on float packages only; this package's transformer is quantized \
                 ({}): add the ControlNet to the fp32/fp16 package",
                q.summary()
            ),
        ));
    }
    let transformer = &manifest.transformer;
    let dim = transformer.other.get("dim").and_then(|v| v.as_u64());
    info.check(name, transformer.in_channels, dim, &manifest.graphs.transformer.sha256)
        .map_err(|m| Error::package(&manifest_path, m))?;
    info.graph
        .check_interface(GraphKind::Transformer, &controlnet_graph::inputs(), controlnet_graph::OUTPUTS)
        .map_err(|m| Error::package(&manifest_path, format!("controlnets.{name}: {m}")))?;
    check_package_files(dir, info.graph.files(), verify_checksums)?;
    Ok(info.clone())
}
