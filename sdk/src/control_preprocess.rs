//! Making a ControlNet control map from an ordinary picture, so that front ends (the CLI, the C
//! ABI, the servers) share one implementation. Other control types (depth, pose) take a
//! ready-made map.

use std::str::FromStr;

use image::{GrayImage as LumaImage, Luma, RgbImage as ImageRgb};

use crate::error::{Error, Result};
use crate::image_io::RgbImage;

/// How a control image is turned into a control map before it is used.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub enum ControlPreprocess {
    /// The image is the control map already (edges, depth, pose ... made elsewhere).
    #[default]
    None,
    /// Canny edges (white on black): imageproc's Gaussian blur (sigma 1.4), Sobel gradient
    /// magnitude, non-maximum suppression, hysteresis between `low` and `high`.
    Canny { low: f32, high: f32 },
}

impl ControlPreprocess {
    /// The thresholds the ControlNet canny annotators use (OpenCV's `Canny(img, 100, 200)`).
    pub const CANNY_DEFAULT: ControlPreprocess = ControlPreprocess::Canny { low: 100.0, high: 200.0 };

    /// The name recorded in image parameters and accepted by `FromStr`.
    pub fn name(&self) -> String {
        match self {
            ControlPreprocess::None => "none".into(),
            ControlPreprocess::Canny { .. } if *self == Self::CANNY_DEFAULT => "canny".into(),
            ControlPreprocess::Canny { low, high } => format!("canny:{low}:{high}"),
        }
    }

    /// Applies it to `image` (a copy for `None`).
    pub fn apply(&self, image: &RgbImage) -> Result<RgbImage> {
        match *self {
            ControlPreprocess::None => {
                image.check()?;
                Ok(image.clone())
            }
            ControlPreprocess::Canny { low, high } => canny(image, low, high),
        }
    }
}

/// `none`, `canny` (thresholds 100 and 200) or `canny:LOW:HIGH`.
impl FromStr for ControlPreprocess {
    type Err = Error;

    fn from_str(s: &str) -> Result<ControlPreprocess> {
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["none"] => Ok(ControlPreprocess::None),
            ["canny"] => Ok(Self::CANNY_DEFAULT),
            ["canny", low, high] => {
                let parse = |v: &str| {
                    v.parse::<f32>().map_err(|_| Error::invalid(format!("canny threshold {v:?} is not a number")))
                };
                let (low, high) = (parse(low)?, parse(high)?);
                check_thresholds(low, high)?;
                Ok(ControlPreprocess::Canny { low, high })
            }
            _ => Err(Error::invalid(format!("control preprocess {s:?}: expected none, canny or canny:LOW:HIGH"))),
        }
    }
}

fn check_thresholds(low: f32, high: f32) -> Result<()> {
    if !(low.is_finite() && high.is_finite() && 0.0 <= low && low <= high) {
        return Err(Error::invalid(format!(
            "canny thresholds must be finite with 0 <= low <= high (got {low}, {high})"
        )));
    }
    Ok(())
}

/// Canny edges of `image` as an RGB control map: 255 on edges, 0 elsewhere, in all channels.
/// The picture is converted to luma first (the image crate's Rec. 709 weights).
pub fn canny(image: &RgbImage, low: f32, high: f32) -> Result<RgbImage> {
    image.check()?;
    check_thresholds(low, high)?;
    let rgb = ImageRgb::from_raw(image.width, image.height, image.pixels.clone())
        .ok_or_else(|| Error::Image("RGB buffer does not match its size".into()))?;
    let gray: LumaImage = image::DynamicImage::ImageRgb8(rgb).to_luma8();
    // imageproc's hysteresis follows weak pixels (magnitude >= low) into the picture's
    // zero-magnitude border and indexes past it when low is 0 (a panic). The smallest positive
    // threshold selects the same edges but for zero-gradient pixels, which are no edges.
    let low = low.max(f32::MIN_POSITIVE);
    let edges = imageproc::edges::canny(&gray, low, high.max(low));
    let pixels = edges.pixels().flat_map(|Luma([v])| [*v, *v, *v]).collect();
    Ok(RgbImage { width: image.width, height: image.height, pixels })
}
