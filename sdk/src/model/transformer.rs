//! The diffusion transformer: one call predicts the flow for a batch of latents at one
//! timestep, conditioned on caption features. The denoising loop and the low-level
//! [`Pipeline::transformer_forward`](crate::Pipeline::transformer_forward) both call it here.

use ndarray::{s, Array1, Array2, Array3, Array4, Ix4};
use ort::value::{Tensor, TensorRef};

use crate::error::{Error, Result};
use crate::model::text_encoder::PromptEmbedding;
use crate::runtime::graph::{Graph, Inputs};
use crate::runtime::run_context::RunContext;

const LATENTS: &str = "latents";
const TIMESTEP: &str = "timestep";
const CAP_FEATS: &str = "cap_feats";
const CAP_MASK: &str = "cap_mask";
const NOISE_PRED: &str = "noise_pred";
/// The graph's interface: latents `[B,C,h,w]`, timestep `[B]` (`(1000 - t)/1000`), caption
/// features `[B,L,D]` and their mask `[B,L]` in; the prediction `[B,C,h,w]` out.
pub(crate) const INPUTS: &[(&str, &str)] =
    &[(LATENTS, "float32"), (TIMESTEP, "float32"), (CAP_FEATS, "float32"), (CAP_MASK, "bool")];
pub(crate) const OUTPUTS: &[(&str, &str)] = &[(NOISE_PRED, "float32")];

/// Caption features for a batch: zero-padded `[B, Lmax, D]` plus the mask of real tokens.
pub(crate) struct CaptionBatch {
    pub feats: Array3<f32>,
    pub mask: Array2<bool>,
}

impl CaptionBatch {
    pub fn new(items: &[&PromptEmbedding]) -> CaptionBatch {
        let width = items[0].features.ncols();
        let max_len = items.iter().map(|e| e.features.nrows()).max().unwrap_or(0);
        let mut feats = Array3::<f32>::zeros((items.len(), max_len, width));
        let mut mask = Array2::<bool>::from_elem((items.len(), max_len), false);
        for (b, e) in items.iter().enumerate() {
            let n = e.features.nrows();
            feats.slice_mut(s![b, ..n, ..]).assign(&*e.features);
            mask.slice_mut(s![b, ..n]).fill(true);
        }
        CaptionBatch { feats, mask }
    }
}

/// One transformer call. `release_arena`: the last call of a run, after which the
/// transformer's activations are not needed again (the arena goes back before the VAE
/// allocates its own).
pub(crate) fn forward(
    graph: &Graph,
    latents: &Array4<f32>,
    timestep: &Array1<f32>,
    cap_feats: &Array3<f32>,
    cap_mask: &Array2<bool>,
    context: &RunContext,
    release_arena: bool,
) -> Result<Array4<f32>> {
    forward_with(graph, latents, timestep, cap_feats, cap_mask, Vec::new(), context, release_arena)
}

/// [`forward`] with more inputs after the transformer's own (a ControlNet's control inputs,
/// named by `model::controlnet`).
#[allow(clippy::too_many_arguments)] // the graph's inputs, one argument each
pub(crate) fn forward_with<'a>(
    graph: &Graph,
    latents: &'a Array4<f32>,
    timestep: &'a Array1<f32>,
    cap_feats: &'a Array3<f32>,
    cap_mask: &'a Array2<bool>,
    extra: Inputs<'a>,
    context: &RunContext,
    release_arena: bool,
) -> Result<Array4<f32>> {
    let err = |e: ort::Error| Error::ort("transformer", e);
    let mut inputs: Inputs<'a> = vec![
        (LATENTS.into(), TensorRef::from_array_view(latents).map_err(err)?.into()),
        (TIMESTEP.into(), TensorRef::from_array_view(timestep).map_err(err)?.into()),
        (CAP_FEATS.into(), TensorRef::from_array_view(cap_feats).map_err(err)?.into()),
        (CAP_MASK.into(), TensorRef::from_array_view(cap_mask).map_err(err)?.into()),
    ];
    inputs.extend(extra);
    let out = graph.run(inputs, &[NOISE_PRED], context, release_arena)?.remove(0);
    let out = out.into_dimensionality::<Ix4>().map_err(|e| graph.failed(format!("output rank: {e}")))?;
    if out.shape() != latents.shape() {
        return Err(graph.failed(format!("output shape {:?} != latents {:?}", out.shape(), latents.shape())));
    }
    Ok(out)
}

/// [`forward`] for a whole batch at one normalised timestep, with captions batched already.
pub(crate) fn predict(
    graph: &Graph,
    latents: &Array4<f32>,
    t_norm: f32,
    captions: &CaptionBatch,
    context: &RunContext,
    release_arena: bool,
) -> Result<Array4<f32>> {
    let timestep = Array1::<f32>::from_elem(latents.shape()[0], t_norm);
    forward(graph, latents, &timestep, &captions.feats, &captions.mask, context, release_arena)
}

/// Binds one transformer call's buffers (device-resident ones in the device loop) to
/// `binding`: the call then reads and writes them in place.
pub(crate) fn bind(
    binding: &mut ort::session::IoBinding,
    latents: &Tensor<f32>,
    timestep: &Tensor<f32>,
    cap_feats: &Tensor<f32>,
    cap_mask: &Tensor<bool>,
    noise_pred: &mut Tensor<f32>,
) -> Result<()> {
    let err = |e: ort::Error| Error::ort("transformer", e);
    binding.bind_input(LATENTS, latents).map_err(err)?;
    binding.bind_input(TIMESTEP, timestep).map_err(err)?;
    binding.bind_input(CAP_FEATS, cap_feats).map_err(err)?;
    binding.bind_input(CAP_MASK, cap_mask).map_err(err)?;
    binding.bind_output(NOISE_PRED, noise_pred).map_err(err)?;
    Ok(())
}
