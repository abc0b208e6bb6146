//! The SigLIP2 vision encoder of the editing models: one reference's real patches, as a grid
//! `[1, rows, columns, 3*p*p]` (the grid's shape is transformers' `spatial_shapes`; no
//! padding, so no attention mask), -> vision tokens `[rows, columns, hidden]`
//! (`last_hidden_state`, as ZImageOmniPipeline.prepare_siglip_embeds views it).

use ndarray::{Array3, Array4, Axis, Ix4};
use ort::value::TensorRef;

use crate::error::{Error, Result};
use crate::runtime::graph::Graph;
use crate::runtime::run_context::RunContext;

const PIXEL_PATCHES: &str = "pixel_patches";
const HIDDEN_STATES: &str = "hidden_states";
pub(crate) const INPUTS: &[(&str, &str)] = &[(PIXEL_PATCHES, "float32")];
pub(crate) const OUTPUTS: &[(&str, &str)] = &[(HIDDEN_STATES, "float32")];

/// Runs the encoder on one picture's patch grid; `hidden` is the package's token width.
pub(crate) fn encode(graph: &Graph, patches: &Array4<f32>, hidden: usize, context: &RunContext) -> Result<Array3<f32>> {
    let (rows, cols) = (patches.shape()[1], patches.shape()[2]);
    let inputs =
        vec![(PIXEL_PATCHES.into(), TensorRef::from_array_view(patches).map_err(|e| Error::ort("siglip", e))?.into())];
    let out = graph.run(inputs, &[HIDDEN_STATES], context, false)?.remove(0);
    let out = out.into_dimensionality::<Ix4>().map_err(|e| graph.failed(format!("output rank: {e}")))?;
    if out.shape() != [1, rows, cols, hidden] {
        return Err(graph.failed(format!("output shape {:?}, expected [1, {rows}, {cols}, {hidden}]", out.shape())));
    }
    if out.iter().any(|v| !v.is_finite()) {
        return Err(graph.failed("non-finite vision tokens"));
    }
    Ok(out.index_axis_move(Axis(0), 0))
}
