//! How the model package is loaded: the flags every subcommand shares, and the SDK's load
//! options made from them.

use std::path::PathBuf;

use clap::Args;
use zimage::{LoadOptions, Pipeline};
use zimage_load_flags::LoadFlags;

use crate::interrupt;

/// How the model package is loaded; shared by every subcommand.
#[derive(Args)]
pub struct ModelArgs {
    /// Model package folder (made by export-scripts/export.py).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    #[command(flatten)]
    pub load: LoadFlags,
}

impl ModelArgs {
    /// Loads the pipeline and lets Ctrl-C cancel its runs from then on. The image count and
    /// guidance size the TensorRT profiles (unused elsewhere).
    pub fn load(&self, max_images: u32, guidance: bool) -> zimage::Result<Pipeline> {
        self.load_with_loras(max_images, guidance, Vec::new(), None)
    }

    /// [`load`](Self::load) with LoRA adapters merged into the transformer, or with a ControlNet
    /// of the package (its name) running as the transformer from the start.
    pub fn load_with_loras(
        &self,
        max_images: u32,
        guidance: bool,
        loras: Vec<zimage::LoraSetting>,
        controlnet: Option<String>,
    ) -> zimage::Result<Pipeline> {
        let mut options = self.options(max_images, guidance);
        options.loras = loras;
        options.controlnet = controlnet;
        let pipeline = Pipeline::load(&self.model, &options)?;
        interrupt::set_cancel_handle(pipeline.cancel_handle());
        Ok(pipeline)
    }

    pub fn options(&self, max_images: u32, guidance: bool) -> LoadOptions {
        self.load.options(max_images, guidance)
    }
}
