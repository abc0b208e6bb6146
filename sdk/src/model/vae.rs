//! VAE: latents -> pixels (decoder) and pixels -> latent distribution (encoder), with the
//! package's scaling and shift factors applied here rather than in the graphs.

use ndarray::{s, Array4, ArrayD, Axis, Ix4};
use ort::value::TensorRef;

use super::vae_tiling::TileGeometry;
use crate::error::{Error, Result};
use crate::package::VaeInfo;
use crate::runtime::graph::Graph;
use crate::runtime::run_context::RunContext;

const LATENTS: &str = "latents";
const IMAGE: &str = "image";
const MEAN: &str = "mean";
const LOGVAR: &str = "logvar";
/// The decoder's interface: one image's latents `[1,C,h,w]` in, pixels `[1,3,H,W]` in [-1, 1] out.
pub(crate) const DECODER_INPUTS: &[(&str, &str)] = &[(LATENTS, "float32")];
pub(crate) const DECODER_OUTPUTS: &[(&str, &str)] = &[(IMAGE, "float32")];
/// The encoder's interface: pixels in, the latent distribution's mean and log-variance out.
pub(crate) const ENCODER_INPUTS: &[(&str, &str)] = &[(IMAGE, "float32")];
pub(crate) const ENCODER_OUTPUTS: &[(&str, &str)] = &[(MEAN, "float32"), (LOGVAR, "float32")];

pub(crate) struct Vae {
    pub info: VaeInfo,
    /// Decode in tiles (`LoadOptions::vae_tiling`, checked against `info` at load).
    pub tiling: Option<TileGeometry>,
}

impl Vae {
    /// Whether latents of this height and width are decoded in tiles.
    pub fn tiles(&self, height: usize, width: usize) -> bool {
        self.tiling.is_some_and(|t| t.applies(height, width))
    }

    /// Decodes each image of the batch on its own (bounded memory at large sizes), in tiles when
    /// [`Vae::tiles`], into `[1, 3, H, W]` decoder outputs.
    pub fn decode(&self, decoder: &Graph, latents: &Array4<f32>, context: &RunContext) -> Result<Vec<Array4<f32>>> {
        let scaling = self.info.scaling_factor as f32;
        let shift = self.info.shift_factor as f32;
        let run = |z: ndarray::ArrayView4<f32>| -> Result<Array4<f32>> {
            let inputs =
                vec![(LATENTS.into(), TensorRef::from_array_view(z).map_err(|e| Error::ort("vae_decoder", e))?.into())];
            to4(decoder, decoder.run(inputs, &[IMAGE], context, false)?.remove(0))
        };
        let mut images = Vec::with_capacity(latents.shape()[0]);
        for b in 0..latents.shape()[0] {
            let z = latents.slice(s![b..b + 1, .., .., ..]).mapv(|v| v / scaling + shift);
            let out = match self.tiling.filter(|t| t.applies(z.shape()[2], z.shape()[3])) {
                Some(tiling) => tiling.decode(z.view(), |tile| run(tile.as_standard_layout().view()))?,
                None => run(z.view())?,
            };
            // The picture must be the latents' size times the manifest's scale factor: a package
            // whose factor is not its decoder's gave a picture of another size than the request's.
            let sf = self.info.scale_factor;
            let expected = [1, 3, z.shape()[2] * sf, z.shape()[3] * sf];
            if out.shape() != expected {
                return Err(decoder.failed(format!(
                    "output shape {:?}, expected {expected:?} (latents {:?} times vae.scale_factor {sf})",
                    out.shape(),
                    z.shape()
                )));
            }
            if let Some(bad) = out.iter().find(|v| !v.is_finite()) {
                return Err(decoder.failed(format!(
                    "the decoded image holds non-finite values ({bad}) for image {} of {}",
                    b + 1,
                    latents.shape()[0]
                )));
            }
            images.push(out);
        }
        Ok(images)
    }

    /// Encodes `[1, 3, H, W]` pixels in [-1, 1] to the latent distribution's mean and
    /// log-variance, in tiles when the picture is larger than one (`LoadOptions::vae_tiling`).
    pub fn encode(
        &self,
        encoder: &Graph,
        image: &Array4<f32>,
        context: &RunContext,
    ) -> Result<(Array4<f32>, Array4<f32>)> {
        let run = |pixels: ndarray::ArrayView4<f32>| -> Result<(Array4<f32>, Array4<f32>)> {
            let inputs = vec![(
                IMAGE.into(),
                TensorRef::from_array_view(pixels).map_err(|e| Error::ort("vae_encoder", e))?.into(),
            )];
            let mut out = encoder.run(inputs, &[MEAN, LOGVAR], context, false)?;
            let logvar = to4(encoder, out.pop().expect("two outputs"))?;
            let mean = to4(encoder, out.pop().expect("two outputs"))?;
            if mean.shape()[1] != self.info.latent_channels || mean.shape() != logvar.shape() {
                return Err(encoder.failed(format!("output shape {:?}", mean.shape())));
            }
            Ok((mean, logvar))
        };
        match self.tiling.filter(|t| t.applies_to_pixels(image.shape()[2], image.shape()[3])) {
            None => run(image.view()),
            Some(tiling) => {
                // Mean and log-variance travel side by side through the blending, as diffusers'
                // moments do, and are split again after.
                let moments = tiling.encode(image.view(), |tile| {
                    let (mean, logvar) = run(tile.as_standard_layout().view())?;
                    Ok(ndarray::concatenate(Axis(1), &[mean.view(), logvar.view()]).expect("same shapes"))
                })?;
                let c = self.info.latent_channels;
                Ok((moments.slice(s![.., ..c, .., ..]).to_owned(), moments.slice(s![.., c.., .., ..]).to_owned()))
            }
        }
    }
}

fn to4(graph: &Graph, array: ArrayD<f32>) -> Result<Array4<f32>> {
    array.into_dimensionality::<Ix4>().map_err(|e| graph.failed(format!("output rank: {e}")))
}
