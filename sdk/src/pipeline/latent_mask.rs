//! An inpainting mask at latent resolution, as diffusers' inpainting pipelines make it (plain
//! inpainting's per-step blend and ControlNet inpainting's mask channel both use it).

use ndarray::Array2;

use crate::image_io::GrayImage;

/// Binarises the mask (>= 0.5 after /255 means repaint) and resizes it to the latent grid
/// with torch's nearest-neighbour rule (`floor(dst * in / out)` in float32).
pub(crate) fn latent_mask(mask: &GrayImage, h: usize, w: usize) -> Array2<f32> {
    let (mh, mw) = (mask.height as usize, mask.width as usize);
    let scale_y = mh as f32 / h as f32;
    let scale_x = mw as f32 / w as f32;
    Array2::from_shape_fn((h, w), |(y, x)| {
        let sy = ((y as f32 * scale_y).floor() as usize).min(mh - 1);
        let sx = ((x as f32 * scale_x).floor() as usize).min(mw - 1);
        let v = mask.pixels[sy * mw + sx] as f32 / 255.0;
        if v >= 0.5 {
            1.0
        } else {
            0.0
        }
    })
}
