//! Tiled VAE decoding (and encoding): the latents are decoded in overlapping square tiles, each
//! tile blended linearly into its upper and left neighbours over the overlap, and the tiles
//! stitched; a picture going in is encoded the same way, blended in latent space. The
//! decoder then holds one tile's activations at a time instead of the whole image's (the
//! untiled float32 decode of a 512x512 image alone takes about 1.1 GB on the CPU, a 1024x1024
//! one about four times that, on a GPU too), at the price of more arithmetic (the overlaps are
//! decoded twice) and different pixels: the decoder's GroupNorm statistics are taken per tile,
//! so a tile that sees little of the picture decodes it differently (docs/loading.md: visible on
//! small tiles).
//!
//! The tiles, their order and the blending are those of the reference, diffusers'
//! `AutoencoderKL.tiled_decode` and `_tiled_encode` (what `pipe.vae.enable_tiling()` runs), so a
//! tiled image matches diffusers' tiled image for the same tile size and overlap, image to image
//! and inpainting included (tests/golden/*/vae_tiling). Where
//! diffusers derives the tile stride and the blend width from a float overlap factor (and for
//! some factors stitches an image of the wrong size), both are whole numbers of latents here.

use ndarray::{s, Array4, ArrayView4, ArrayViewMut4, Axis};

use crate::error::{Error, Result};

/// Decode (and encode) images in overlapping tiles ([`crate::LoadOptions::vae_tiling`]). Sizes
/// are in pixels and must be multiples of the package's VAE scale factor (8 for Z-Image).
///
/// An image no larger than `tile_size` in either direction is decoded (encoded) whole, as
/// without tiling. diffusers' `enable_tiling()` on Z-Image's VAE is `tile_size` 1024 with `overlap`
/// 256; 512 / 128 (or 256 / 64) keeps a CPU decode of 512x512 or 1024x1024 images within a
/// few hundred MB of activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VaeTiling {
    /// The side of a square tile, in pixels.
    pub tile_size: u32,
    /// How far neighbouring tiles overlap, in pixels (blended linearly there); less than
    /// `tile_size`.
    pub overlap: u32,
}

impl VaeTiling {
    /// `tile_size` with the reference's overlap of a quarter of a tile, rounded down to a
    /// multiple of 8 (Z-Image's VAE scale factor).
    pub fn new(tile_size: u32) -> VaeTiling {
        VaeTiling { tile_size, overlap: tile_size / 4 / 8 * 8 }
    }

    /// The tile geometry in latents for a VAE of `scale_factor`, or why these sizes do not fit it.
    pub(crate) fn geometry(&self, scale_factor: usize) -> Result<TileGeometry> {
        let (tile, overlap) = (self.tile_size as usize, self.overlap as usize);
        let what = format!("vae_tiling (tile {tile}, overlap {overlap})");
        if tile == 0 || tile % scale_factor != 0 || overlap % scale_factor != 0 {
            return Err(Error::invalid(format!(
                "{what}: the tile size must be a positive multiple of the VAE's scale factor {scale_factor}, \
                 and so must the overlap"
            )));
        }
        if overlap >= tile {
            return Err(Error::invalid(format!("{what}: the overlap must be smaller than the tile")));
        }
        if tile > MAX_TILE_SIZE {
            return Err(Error::invalid(format!("{what}: the tile size must be at most {MAX_TILE_SIZE}")));
        }
        Ok(TileGeometry {
            tile_latents: tile / scale_factor,
            stride_latents: (tile - overlap) / scale_factor,
            overlap_latents: overlap / scale_factor,
            scale_factor,
        })
    }
}

impl std::str::FromStr for VaeTiling {
    type Err = Error;

    /// `SIZE` (with [`VaeTiling::new`]'s overlap) or `SIZE:OVERLAP`, in pixels; whether they
    /// fit a package's VAE is checked when a pipeline is loaded with them.
    fn from_str(s: &str) -> Result<VaeTiling> {
        let number = |v: &str| {
            v.trim().parse::<u32>().map_err(|_| Error::invalid(format!("{s:?} is not SIZE or SIZE:OVERLAP (pixels)")))
        };
        match s.split_once(':') {
            Some((size, overlap)) => Ok(VaeTiling { tile_size: number(size)?, overlap: number(overlap)? }),
            None => Ok(VaeTiling::new(number(s)?)),
        }
    }
}

/// Larger than any image a package serves (limits.rs caps sides far below): a bigger tile
/// could only be a typo.
const MAX_TILE_SIZE: usize = 16384;

/// A [`VaeTiling`] checked against the package's VAE, in latents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TileGeometry {
    tile_latents: usize,
    stride_latents: usize,
    overlap_latents: usize,
    scale_factor: usize,
}

impl TileGeometry {
    /// Whether latents of this height and width are decoded in tiles at all.
    pub fn applies(&self, height: usize, width: usize) -> bool {
        height > self.tile_latents || width > self.tile_latents
    }

    /// Whether a picture of this height and width is encoded in tiles at all.
    pub fn applies_to_pixels(&self, height: usize, width: usize) -> bool {
        let tile = self.tile_latents * self.scale_factor;
        height > tile || width > tile
    }

    /// Decodes `latents` (`[1, C, h, w]`, already scaled for the decoder) with `decode_tile`
    /// called once per tile, rows top to bottom, each row left to right; returns the stitched
    /// `[1, 3, h * f, w * f]` picture, blended over the overlap in pixels.
    pub fn decode(
        &self,
        latents: ArrayView4<f32>,
        decode_tile: impl FnMut(ArrayView4<f32>) -> Result<Array4<f32>>,
    ) -> Result<Array4<f32>> {
        let f = self.scale_factor;
        let plan = Plan {
            tile: self.tile_latents,
            stride: self.stride_latents,
            output_size: |n| n * f,
            blend: self.overlap_latents * f,
            stage: "vae_decoder",
        };
        plan.run(latents, decode_tile)
    }

    /// Encodes `pixels` (`[1, 3, H, W]`) with `encode_tile` called once per tile of
    /// `tile_size` pixels, in the same order; returns the stitched `[1, K, H / f, W / f]` of the
    /// encoder's outputs (mean and log-variance side by side in K), blended over the overlap in
    /// latents, as diffusers' `_tiled_encode` blends its moments. (Its log-variance is clamped
    /// after blending, ours before: the same unless a tile's log-variance leaves [-30, 20].)
    pub fn encode(
        &self,
        pixels: ArrayView4<f32>,
        encode_tile: impl FnMut(ArrayView4<f32>) -> Result<Array4<f32>>,
    ) -> Result<Array4<f32>> {
        let f = self.scale_factor;
        let plan = Plan {
            tile: self.tile_latents * f,
            stride: self.stride_latents * f,
            output_size: |n| n / f,
            blend: self.overlap_latents,
            stage: "vae_encoder",
        };
        plan.run(pixels, encode_tile)
    }
}

/// One tiled run: tiles of `tile` input elements every `stride`, each mapped to
/// `output_size(n)` output elements by the graph, blended over `blend` output elements.
struct Plan<F: Fn(usize) -> usize> {
    tile: usize,
    stride: usize,
    output_size: F,
    blend: usize,
    stage: &'static str,
}

impl<F: Fn(usize) -> usize> Plan<F> {
    fn run(
        &self,
        input: ArrayView4<f32>,
        mut run_tile: impl FnMut(ArrayView4<f32>) -> Result<Array4<f32>>,
    ) -> Result<Array4<f32>> {
        let (height, width) = (input.shape()[2], input.shape()[3]);
        let starts = |len: usize| (0..len).step_by(self.stride).collect::<Vec<_>>();
        let (rows, cols) = (starts(height), starts(width));
        let mut tiles: Vec<Vec<Array4<f32>>> = Vec::with_capacity(rows.len());
        let mut first_channels = None;
        for &top in &rows {
            let mut row = Vec::with_capacity(cols.len());
            for &left in &cols {
                let bottom = (top + self.tile).min(height);
                let right = (left + self.tile).min(width);
                let tile = run_tile(input.slice(s![.., .., top..bottom, left..right]))?;
                let expected = [(self.output_size)(bottom - top), (self.output_size)(right - left)];
                let channels = *first_channels.get_or_insert(tile.shape()[1]);
                if tile.shape()[0] != 1 || tile.shape()[2..] != expected[..] || tile.shape()[1] != channels {
                    return Err(Error::inference(
                        self.stage,
                        format!(
                            "a tile came out with shape {:?}, expected [1, C, {}, {}]",
                            tile.shape(),
                            expected[0],
                            expected[1]
                        ),
                    ));
                }
                row.push(tile);
            }
            tiles.push(row);
        }
        // Blend in place, in the reference's order: each tile with its upper neighbour, then with
        // its left one, both already blended with theirs.
        for i in 0..rows.len() {
            for j in 0..cols.len() {
                if i > 0 {
                    let (above, below) = tiles.split_at_mut(i);
                    blend_rows(above[i - 1][j].view(), below[0][j].view_mut(), self.blend);
                }
                if j > 0 {
                    let (left, right) = tiles[i].split_at_mut(j);
                    blend_columns(left[j - 1].view(), right[0].view_mut(), self.blend);
                }
            }
        }
        // Each tile keeps its first `stride` (mapped) elements, where the next tile starts; the
        // last of a row or column all it has: the pieces add up to exactly the output's size.
        let keep = (self.output_size)(self.stride);
        let channels = tiles[0][0].shape()[1];
        let mut output = Array4::<f32>::zeros((1, channels, (self.output_size)(height), (self.output_size)(width)));
        for (i, row) in tiles.iter().enumerate() {
            for (j, tile) in row.iter().enumerate() {
                let (th, tw) = (tile.shape()[2].min(keep), tile.shape()[3].min(keep));
                let (y, x) = (i * keep, j * keep);
                output.slice_mut(s![.., .., y..y + th, x..x + tw]).assign(&tile.slice(s![.., .., ..th, ..tw]));
            }
        }
        Ok(output)
    }
}

/// Fades the bottom of `above` into the top of `below` over `extent` rows (fewer when either
/// tile is shorter): row y of `below` becomes `above[h - e + y] * (1 - y/e) + below[y] * (y/e)`.
fn blend_rows(above: ArrayView4<f32>, below: ArrayViewMut4<f32>, extent: usize) {
    blend(above, below, extent, Axis(2));
}

/// The same from left to right.
fn blend_columns(left: ArrayView4<f32>, right: ArrayViewMut4<f32>, extent: usize) {
    blend(left, right, extent, Axis(3));
}

fn blend(first: ArrayView4<f32>, mut second: ArrayViewMut4<f32>, extent: usize, axis: Axis) {
    let extent = extent.min(first.len_of(axis)).min(second.len_of(axis));
    let first_len = first.len_of(axis);
    for k in 0..extent {
        // The weights are rounded to float32 once, then each product rounded on its own before
        // the sum, as the reference's float32 tensor arithmetic does.
        let t = k as f64 / extent as f64;
        let (keep_first, take_second) = ((1.0 - t) as f32, t as f32);
        let from = first.index_axis(axis, first_len - extent + k);
        let mut to = second.index_axis_mut(axis, k);
        ndarray::Zip::from(&mut to).and(&from).for_each(|b, &a| *b = a * keep_first + *b * take_second);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array4;

    /// A stand-in decoder whose output at a pixel depends only on the latent under it (nearest
    /// upsampling of the first three channels): tiling must then reproduce the whole-image
    /// decode, up to the blend's rounding, whatever the geometry.
    fn pointwise(latents: ArrayView4<f32>, f: usize) -> Array4<f32> {
        let (h, w) = (latents.shape()[2], latents.shape()[3]);
        Array4::from_shape_fn((1, 3, h * f, w * f), |(_, c, y, x)| latents[[0, c, y / f, x / f]])
    }

    fn latents(h: usize, w: usize) -> Array4<f32> {
        Array4::from_shape_fn((1, 4, h, w), |(_, c, y, x)| {
            ((c * 7919 + y * 104729 + x * 1299709) % 1000) as f32 / 500.0 - 1.0
        })
    }

    /// Largest difference of two arrays of the same shape; NaN as soon as one difference is
    /// (`f32::max` would drop it and let a `<=` bound pass).
    fn worst(a: &Array4<f32>, b: &Array4<f32>) -> f32 {
        assert_eq!(a.shape(), b.shape());
        a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0f32, |m, d| {
            if d.is_nan() || m.is_nan() {
                f32::NAN
            } else {
                m.max(d)
            }
        })
    }

    /// With stand-in networks whose output at a point depends only on the input under it
    /// (nearest upsampling for the decoder, keeping every f-th pixel for the encoder), tiling
    /// must reproduce the whole-image result, up to the blend's rounding, whatever the geometry;
    /// and it calls the network once per tile.
    #[test]
    fn tiling_reproduces_a_pointwise_network_for_every_geometry() {
        for f in [4usize, 8] {
            let subsample = |p: ArrayView4<f32>| {
                Array4::from_shape_fn((1, 4, p.shape()[2] / f, p.shape()[3] / f), |(_, c, y, x)| {
                    p[[0, c, y * f, x * f]]
                })
            };
            for tile_latents in 1..=7 {
                for overlap_latents in 0..tile_latents {
                    let tiling =
                        VaeTiling { tile_size: (tile_latents * f) as u32, overlap: (overlap_latents * f) as u32 };
                    let geometry = tiling.geometry(f).unwrap();
                    let stride = tile_latents - overlap_latents;
                    for (h, w) in [(1, 1), (3, 9), (8, 8), (13, 5), (16, 17)] {
                        let z = latents(h, w);
                        let mut calls = 0;
                        let decoded = geometry
                            .decode(z.view(), |t| {
                                calls += 1;
                                Ok(pointwise(t, f))
                            })
                            .unwrap();
                        let off = worst(&decoded, &pointwise(z.view(), f));
                        assert!(off <= 1e-6, "decode, f {f} tiling {tiling:?} size {h}x{w}: off by {off}");
                        assert_eq!(calls, h.div_ceil(stride) * w.div_ceil(stride));
                        let pixels = latents(h * f, w * f);
                        let encoded = geometry.encode(pixels.view(), |t| Ok(subsample(t))).unwrap();
                        let off = worst(&encoded, &subsample(pixels.view()));
                        assert!(off <= 1e-6, "encode, f {f} tiling {tiling:?} size {h}x{w}: off by {off}");
                        assert_eq!(geometry.applies_to_pixels(h * f, w * f), geometry.applies(h, w));
                    }
                }
            }
        }
    }

    #[test]
    fn blending_fades_linearly_over_the_overlap() {
        // Two constant tiles, 0 above and 1 below, 8 pixels of overlap: the below tile's first
        // rows ramp 0, 1/8, ..., 7/8, then stay 1.
        let geometry = VaeTiling { tile_size: 16, overlap: 8 }.geometry(8).unwrap();
        let z = Array4::<f32>::zeros((1, 1, 3, 1));
        let mut n = 0;
        let image = geometry
            .decode(z.view(), |t| {
                n += 1;
                Ok(Array4::from_elem((1, 1, t.shape()[2] * 8, 8), if n == 1 { 0.0 } else { 1.0 }))
            })
            .unwrap();
        let column: Vec<f32> = image.slice(s![0, 0, .., 0]).to_vec();
        let expected: Vec<f32> =
            (0..8).map(|_| 0.0).chain((0..8).map(|k| k as f32 / 8.0)).chain((0..8).map(|_| 1.0)).collect();
        assert_eq!(column, expected);
    }

    #[test]
    fn sizes_that_do_not_fit_the_vae_are_refused() {
        for (tile, overlap) in [(0, 0), (12, 0), (16, 4), (16, 16), (16, 24), (16392, 0)] {
            let err = VaeTiling { tile_size: tile, overlap }.geometry(8).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidRequest, "{tile}/{overlap}");
        }
        assert_eq!(VaeTiling::new(512), VaeTiling { tile_size: 512, overlap: 128 });
        assert_eq!(VaeTiling::new(100), VaeTiling { tile_size: 100, overlap: 24 });
    }

    #[test]
    fn a_tile_of_the_wrong_shape_is_an_inference_error() {
        let geometry = VaeTiling { tile_size: 16, overlap: 8 }.geometry(8).unwrap();
        let z = latents(4, 4);
        // Too small a picture for its tile, and then a tile whose channels change mid-image.
        let err = geometry.decode(z.view(), |t| Ok(pointwise(t, 4))).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Inference);
        let mut n = 0;
        let err = geometry
            .decode(z.view(), |t| {
                n += 1;
                let full = pointwise(t, 8);
                Ok(if n == 2 { full.slice(s![.., ..2, .., ..]).to_owned() } else { full })
            })
            .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Inference);
        assert_eq!(n, 2, "stops at the first bad tile");
    }

    #[test]
    fn parses_size_and_optional_overlap() {
        assert_eq!("512".parse::<VaeTiling>().unwrap(), VaeTiling { tile_size: 512, overlap: 128 });
        assert_eq!(" 256:64 ".parse::<VaeTiling>().unwrap(), VaeTiling { tile_size: 256, overlap: 64 });
        for bad in ["", "big", "512:", ":64", "-8", "512:64:8", "5e2"] {
            let err = bad.parse::<VaeTiling>().unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidRequest, "{bad:?}");
        }
    }

    #[test]
    fn only_latents_larger_than_a_tile_are_tiled() {
        let geometry = VaeTiling { tile_size: 64, overlap: 16 }.geometry(8).unwrap();
        assert!(!geometry.applies(8, 8));
        assert!(geometry.applies(9, 8));
        assert!(geometry.applies(8, 9));
    }
}
