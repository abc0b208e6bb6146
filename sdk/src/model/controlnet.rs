//! The transformer with a ControlNet attached (docs/controlnet.md): the transformer's inputs
//! plus the control latents `[B, control_in_dim, h, w]` and the conditioning scale `[1]`, the
//! same prediction out.

use ndarray::{Array1, Array4};
use ort::value::TensorRef;

use super::transformer::{self, CaptionBatch};
use crate::error::{Error, Result};
use crate::runtime::graph::Graph;
use crate::runtime::run_context::RunContext;

const CONTROL_CONTEXT: &str = "control_context";
const CONDITIONING_SCALE: &str = "conditioning_scale";

/// The combined graph's interface: the transformer's inputs, then the control ones.
pub(crate) fn inputs() -> Vec<(&'static str, &'static str)> {
    let mut all = transformer::INPUTS.to_vec();
    all.extend([(CONTROL_CONTEXT, "float32"), (CONDITIONING_SCALE, "float32")]);
    all
}

pub(crate) const OUTPUTS: &[(&str, &str)] = transformer::OUTPUTS;

/// What the ControlNet is given at every step: one control-latent item (broadcast to the
/// call's batch) and the conditioning scale.
pub(crate) struct ControlInputs {
    /// `[1, control_in_dim, h, w]`.
    pub context: Array4<f32>,
    pub scale: f32,
}

/// [`transformer::predict`] through the combined graph.
pub(crate) fn predict(
    graph: &Graph,
    latents: &Array4<f32>,
    t_norm: f32,
    captions: &CaptionBatch,
    control: &ControlInputs,
    context: &RunContext,
    release_arena: bool,
) -> Result<Array4<f32>> {
    let batch = latents.shape()[0];
    let timestep = Array1::<f32>::from_elem(batch, t_norm);
    let item = control.context.view();
    let (_, c, h, w) = item.dim();
    let hints = item.broadcast((batch, c, h, w)).expect("one item broadcasts").to_owned();
    let scale = Array1::<f32>::from_elem(1, control.scale);
    let err = |e: ort::Error| Error::ort("transformer", e);
    let extra = vec![
        (CONTROL_CONTEXT.into(), TensorRef::from_array_view(&hints).map_err(err)?.into()),
        (CONDITIONING_SCALE.into(), TensorRef::from_array_view(&scale).map_err(err)?.into()),
    ];
    transformer::forward_with(graph, latents, &timestep, &captions.feats, &captions.mask, extra, context, release_arena)
}
