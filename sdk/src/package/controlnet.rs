//! The ControlNet add-ons of a package: `controlnets.<name>` in the manifest, written by
//! `export-scripts/export_controlnet.py` (docs/controlnet.md). Each is ONE graph, the
//! transformer with the ControlNet attached, whose weights shared with the transformer are
//! read from the transformer's own file; a package without the section is unchanged.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::graph::GraphEntry;

/// One ControlNet add-on.
#[derive(Debug, Clone, Deserialize)]
pub struct ControlNetInfo {
    /// The combined transformer + ControlNet graph (`controlnet_<name>.onnx`); its
    /// `external_data` holds the ControlNet's own weights.
    pub graph: GraphEntry,
    /// sha256 of the transformer.onnx it was made for: its shared weights are read from that
    /// file at fixed offsets, so any other transformer is refused.
    pub transformer_sha256: String,
    /// Channels of the control latents: the transformer's latent channels C (control image
    /// only), or more (2C + 1 takes [control, inverted mask, masked image] for inpainting;
    /// other widths are zero-padded, as diffusers does).
    pub control_in_dim: usize,
    /// diffusers' `add_control_noise_refiner`: `None` (1.0), `"control_layers"` (2.0) or
    /// `"control_noise_refiner"` (2.1). Informational: the graph has it built in.
    #[serde(default)]
    pub add_control_noise_refiner: Option<String>,
    pub control_layers_places: Vec<usize>,
    #[serde(default)]
    pub control_refiner_layers_places: Vec<usize>,
    /// Hidden width of the ControlNet; must be the transformer's.
    pub dim: usize,
}

impl ControlNetInfo {
    /// Whether the ControlNet takes an inpainting mask and masked picture (`2C + 1` channels).
    pub fn supports_inpainting(&self, latent_channels: usize) -> bool {
        self.control_in_dim == 2 * latent_channels + 1
    }

    /// Checks the entry against the package's transformer (values only, no file access):
    /// its latent channels, width (`dim`, when the manifest records it) and file checksum.
    pub(crate) fn check(
        &self,
        name: &str,
        channels: usize,
        dim: Option<u64>,
        transformer_sha256: &str,
    ) -> Result<(), String> {
        if let Some(dim) = dim {
            if dim as usize != self.dim {
                return Err(format!(
                    "controlnets.{name} was exported for a transformer {} wide; this package's is {dim}",
                    self.dim
                ));
            }
        }
        if !self.transformer_sha256.eq_ignore_ascii_case(transformer_sha256) {
            return Err(format!(
                "controlnets.{name} was exported for another transformer.onnx (sha256 {}); re-export it for this \
                 package with export-scripts/export_controlnet.py",
                self.transformer_sha256
            ));
        }
        if self.control_in_dim < channels || self.control_in_dim > 4 * channels + 1 {
            return Err(format!(
                "controlnets.{name}.control_in_dim {} does not fit {channels} latent channels",
                self.control_in_dim
            ));
        }
        if self.control_layers_places.is_empty() || !self.control_layers_places.contains(&0) {
            return Err(format!("controlnets.{name}.control_layers_places must contain layer 0"));
        }
        match self.add_control_noise_refiner.as_deref() {
            None | Some("control_layers") | Some("control_noise_refiner") => Ok(()),
            Some(other) => Err(format!("controlnets.{name}.add_control_noise_refiner {other:?} is not supported")),
        }
    }
}

/// The ControlNet a front end's `--controlnet VALUE` names: a name in the package, or the path
/// of its graph file (`controlnet_<name>.onnx`) inside the package folder `dir`.
pub fn find_controlnet(controlnets: &BTreeMap<String, ControlNetInfo>, dir: &Path, value: &str) -> Option<String> {
    if controlnets.contains_key(value) {
        return Some(value.to_string());
    }
    let path = Path::new(value);
    let in_package = |p: &Path| match (p.parent().map(std::fs::canonicalize), std::fs::canonicalize(dir)) {
        (Some(Ok(parent)), Ok(dir)) => parent == dir,
        _ => false,
    };
    let file = path.file_name()?.to_str()?;
    controlnets.iter().find(|(_, info)| info.graph.path == file && in_package(path)).map(|(name, _)| name.clone())
}

/// [`find_controlnet`], or the message for a value that names none of the package's
/// ControlNets (it lists those it has), for the front ends to report in their own way.
pub fn require_controlnet(
    controlnets: &BTreeMap<String, ControlNetInfo>,
    dir: &Path,
    value: &str,
) -> std::result::Result<String, String> {
    find_controlnet(controlnets, dir, value).ok_or_else(|| {
        let known: Vec<&str> = controlnets.keys().map(String::as_str).collect();
        format!(
            "--controlnet {value}: the package has no such ControlNet (it has: {})",
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        )
    })
}
