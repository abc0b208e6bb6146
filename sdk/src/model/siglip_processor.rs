//! transformers' `Siglip2ImageProcessor` (its PIL backend, which the reference pipeline runs
//! without torchvision) in Rust: a picture -> NaFlex patches for the SigLIP2 vision encoder.
//!
//! 1. the largest size whose patch grid fits `max_num_patches` (the processor's binary search
//!    over a scale factor, sides rounded up to whole patches, at least one patch each);
//! 2. a Pillow resize to that size (bilinear by default; `pil_resize`, bit-exact);
//! 3. `x * rescale_factor` (in float64, then float32), `(x - mean) / std` in float32;
//! 4. patches in row-major grid order, each flattened (patch row, patch column, channel);
//!    padded with zeros to `max_num_patches`, with the mask of real patches and the grid
//!    size (`spatial_shapes`).

use ndarray::{Array2, Array4};

use crate::error::{Error, Result};
use crate::image_io::{self, RgbImage};
use crate::limits::MAX_SIGLIP_VALUES;
use crate::package::edit::SiglipProcessorSettings;
use crate::pil_resize::Filter;

/// What the processor gives the vision encoder for one picture.
#[derive(Debug, Clone, PartialEq)]
pub struct SiglipInputs {
    /// `[max_num_patches, patch * patch * 3]`, zero rows past the real patches.
    pub pixel_values: Array2<f32>,
    /// `[max_num_patches]`: 1 for real patches.
    pub pixel_attention_mask: Vec<i32>,
    /// The patch grid (rows, columns).
    pub spatial_shapes: (usize, usize),
}

impl SiglipInputs {
    /// The real patches as the vision graph takes them: `[1, rows, columns, depth]`.
    pub fn patch_grid(&self) -> Array4<f32> {
        let (h, w) = self.spatial_shapes;
        let depth = self.pixel_values.ncols();
        let real = self.pixel_values.slice(ndarray::s![..h * w, ..]).to_owned();
        real.into_shape_with_order((1, h, w, depth)).expect("h * w rows")
    }
}

/// transformers' `get_image_size_for_max_num_patches`: (height, width) in pixels.
pub fn target_size(height: u32, width: u32, patch: usize, max_patches: usize) -> (usize, usize) {
    let scaled = |scale: f64, size: u32| -> usize {
        let s = size as f64 * scale;
        let s = (s / patch as f64).ceil() * patch as f64;
        s.max(patch as f64) as usize
    };
    let eps = 1e-5;
    let (mut lo, mut hi) = (eps / 10.0, 100.0);
    while hi - lo >= eps {
        let scale = (lo + hi) / 2.0;
        let (h, w) = (scaled(scale, height), scaled(scale, width));
        let patches = (h as f64 / patch as f64) * (w as f64 / patch as f64);
        if patches <= max_patches as f64 {
            lo = scale;
        } else {
            hi = scale;
        }
    }
    (scaled(lo, height), scaled(lo, width))
}

/// Runs the processor on one picture.
pub fn siglip_inputs(image: &RgbImage, settings: &SiglipProcessorSettings) -> Result<SiglipInputs> {
    image.check()?;
    let patch = settings.patch_size;
    let values = (settings.max_num_patches as u64).checked_mul((patch as u64).pow(2) * 3);
    if patch == 0 || patch > 1024 || settings.max_num_patches == 0 || values.is_none_or(|v| v > MAX_SIGLIP_VALUES) {
        return Err(Error::invalid(format!(
            "SigLIP processor: patch_size must be 1..=1024 and max_num_patches > 0, with max_num_patches x \
             patch_size^2 x 3 at most {MAX_SIGLIP_VALUES}"
        )));
    }
    let resized = if settings.do_resize {
        let (h, w) = target_size(image.height, image.width, patch, settings.max_num_patches);
        let filter = Filter::from_name(&settings.resample).ok_or_else(|| {
            Error::invalid(format!("SigLIP processor: resample {:?} is not supported", settings.resample))
        })?;
        image_io::resize_rgb_with(image, w as u32, h as u32, filter)?
    } else {
        image.clone()
    };
    let (h, w) = (resized.height as usize, resized.width as usize);
    let (rows, cols) = (h / patch, w / patch);
    if rows * cols > settings.max_num_patches || rows == 0 || cols == 0 {
        return Err(Error::invalid(format!(
            "SigLIP processor: a {w}x{h} picture makes {rows}x{cols} patches, not 1..={}",
            settings.max_num_patches
        )));
    }
    let mean = settings.image_mean.map(|m| m as f32);
    let std = settings.image_std.map(|s| s as f32);
    let value = |byte: u8, c: usize| -> f32 {
        let mut v = if settings.do_rescale { (byte as f64 * settings.rescale_factor) as f32 } else { byte as f32 };
        if settings.do_normalize {
            v = (v - mean[c]) / std[c];
        }
        v
    };
    let depth = patch * patch * 3;
    let mut pixel_values = Array2::<f32>::zeros((settings.max_num_patches, depth));
    for i in 0..rows {
        for j in 0..cols {
            let mut row = pixel_values.row_mut(i * cols + j);
            let mut k = 0;
            for py in 0..patch {
                for px in 0..patch {
                    let at = ((i * patch + py) * w + j * patch + px) * 3;
                    for c in 0..3 {
                        row[k] = value(resized.pixels[at + c], c);
                        k += 1;
                    }
                }
            }
        }
    }
    let mut mask = vec![0; settings.max_num_patches];
    mask[..rows * cols].fill(1);
    Ok(SiglipInputs { pixel_values, pixel_attention_mask: mask, spatial_shapes: (rows, cols) })
}
