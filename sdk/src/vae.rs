//! VAE: latents → pixels (decoder) and pixels → latent distribution (encoder), with the
//! package's scaling and shift factors applied here rather than in the graphs.

use std::time::Duration;

use ndarray::{s, Array4};
use ort::value::TensorRef;

use crate::cancel::RunControl;
use crate::error::{Error, Result};
use crate::manifest::VaeInfo;
use crate::session::Graph;

pub(crate) struct Vae {
    pub info: VaeInfo,
}

impl Vae {
    /// Decodes each image of the batch on its own (bounded memory at large sizes) into
    /// `[1, 3, H, W]` decoder outputs.
    pub fn decode(
        &self,
        decoder: &Graph,
        latents: &Array4<f32>,
        control: &RunControl,
        ort_time: &mut Duration,
    ) -> Result<Vec<Array4<f32>>> {
        let scaling = self.info.scaling_factor as f32;
        let shift = self.info.shift_factor as f32;
        let mut images = Vec::with_capacity(latents.shape()[0]);
        for b in 0..latents.shape()[0] {
            let z = latents.slice(s![b..b + 1, .., .., ..]).mapv(|v| v / scaling + shift);
            let inputs = vec![(
                "latents",
                TensorRef::from_array_view(&z).map_err(|e| Error::inference("vae_decoder", e))?.into(),
            )];
            let out = decoder.run(inputs, &["image"], control, ort_time)?.remove(0);
            let out = out
                .into_dimensionality::<ndarray::Ix4>()
                .map_err(|e| Error::inference("vae_decoder", format!("output rank: {e}")))?;
            if out.shape()[1] != 3 {
                return Err(Error::inference("vae_decoder", format!("output shape {:?}", out.shape())));
            }
            images.push(out);
        }
        Ok(images)
    }

    /// Encodes `[1, 3, H, W]` pixels in [-1, 1] to the latent distribution's mean and log-variance.
    pub fn encode(
        &self,
        encoder: &Graph,
        image: &Array4<f32>,
        control: &RunControl,
        ort_time: &mut Duration,
    ) -> Result<(Array4<f32>, Array4<f32>)> {
        let inputs =
            vec![("image", TensorRef::from_array_view(image).map_err(|e| Error::inference("vae_encoder", e))?.into())];
        let mut out = encoder.run(inputs, &["mean", "logvar"], control, ort_time)?;
        let logvar = out.pop().expect("two outputs");
        let mean = out.pop().expect("two outputs");
        let to4 = |a: ndarray::ArrayD<f32>| {
            a.into_dimensionality::<ndarray::Ix4>()
                .map_err(|e| Error::inference("vae_encoder", format!("output rank: {e}")))
        };
        let (mean, logvar) = (to4(mean)?, to4(logvar)?);
        if mean.shape()[1] != self.info.latent_channels || mean.shape() != logvar.shape() {
            return Err(Error::inference("vae_encoder", format!("output shape {:?}", mean.shape())));
        }
        Ok((mean, logvar))
    }
}
