//! The networks, one file each: what a graph's inputs and outputs are called and what they
//! hold, how a call is assembled and what comes back. No other module names a graph input.
//!
//! - [`text_encoder`]: prompt -> token ids -> caption features (Qwen3);
//! - [`transformer`]: one denoising prediction (the DiT);
//! - [`vae`]: latents -> pixels and pixels -> latent distribution;
//! - [`vae_tiling`]: the decoder run over overlapping tiles of the latents, blended;
//! - [`siglip_processor`]: reference picture -> SigLIP2 patches (transformers' processor);
//! - [`vision`]: SigLIP2 patches -> vision tokens (editing);
//! - [`omni`]: the transformer in Omni mode: packing of captions, reference latents and
//!   vision tokens into one stream, one denoising prediction (editing);
//! - `step`: the denoising step's arithmetic as a graph on the transformer's device;
//! - [`controlnet`]: the transformer with a ControlNet attached (control inputs).

pub(crate) mod controlnet;
pub(crate) mod omni;
pub mod siglip_processor;
pub(crate) mod step;
pub(crate) mod text_encoder;
pub(crate) mod transformer;
pub(crate) mod vae;
pub mod vae_tiling;
pub(crate) mod vision;

use crate::package::graph::GraphKind;
use crate::package::Manifest;

/// Checks that the package's graphs declare the interfaces these networks drive (the prompt
/// enhancer's decoder is checked by the enhancer). A mismatch is a package error at load time
/// rather than a failure mid-generation.
pub(crate) fn check_interfaces(manifest: &Manifest) -> Result<(), String> {
    for (kind, entry) in manifest.graphs.iter() {
        let (inputs, outputs) = match kind {
            GraphKind::TextEncoder => (text_encoder::INPUTS, text_encoder::OUTPUTS),
            GraphKind::Transformer => (transformer::INPUTS, transformer::OUTPUTS),
            GraphKind::VaeDecoder | GraphKind::VaeDecoderCpu | GraphKind::VaeDecoderInt8 => {
                (vae::DECODER_INPUTS, vae::DECODER_OUTPUTS)
            }
            GraphKind::VaeEncoder => (vae::ENCODER_INPUTS, vae::ENCODER_OUTPUTS),
            GraphKind::VisionEncoder => (vision::INPUTS, vision::OUTPUTS),
            GraphKind::TransformerOmni => (omni::INPUTS, omni::OUTPUTS),
            GraphKind::TextDecoder => continue,
        };
        entry.check_interface(kind, inputs, outputs)?;
    }
    Ok(())
}
