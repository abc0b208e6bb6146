//! The transformer in Omni mode (editing): caption segments, reference latents, the noisy
//! target and the references' vision tokens in one stream, with per-token timesteps (clean
//! tokens at t = 1). `transformer_omni.onnx` takes the three streams packed here as padded
//! tensors (export-scripts/zimage_export/omni_wrapper.py); the packing is diffusers'
//! `patchify_and_embed_omni` (executable twin: export-scripts/zimage_export/omni_pack.py),
//! including two details parity depends on:
//!
//! - a caption segment of L tokens padded to P = ceil32(L) takes its positions from a list of
//!   L + 2(P - L) rows (its grid covers the padded length, then P - L zero rows are appended);
//!   the lists of an item's segments are concatenated and its tokens take them in order;
//! - a vision grid [H, W, C] is flattened as `permute(2, 0, 1).reshape(H*W, C)`, i.e. the
//!   channel-major buffer read as rows of C, and its positions are scaled to the latent grid
//!   in float32 and truncated.

use ndarray::{s, Array1, Array2, Array3, Array4, ArrayView3, Ix3};
use ort::value::TensorRef;

use crate::error::{Error, Result};
use crate::runtime::graph::Graph;
use crate::runtime::run_context::RunContext;

const SEQ: usize = 32;
const STREAMS: [&str; 3] = ["x", "cap", "siglip"];
const FEATS: [&str; 3] = ["x_tokens", "cap_feats", "siglip_feats"];
const X_OUT: &str = "x_out";

/// The graph's interface: timestep `[B]`, then per stream feats `[B,S,D]`, pos `[B,S,3]`,
/// pad, noisy, valid `[B,S]`; out: the final layer at every x token.
pub(crate) const INPUTS: &[(&str, &str)] = &[
    ("timestep", "float32"),
    ("x_tokens", "float32"),
    ("x_pos", "int64"),
    ("x_pad", "bool"),
    ("x_noisy", "bool"),
    ("x_valid", "bool"),
    ("cap_feats", "float32"),
    ("cap_pos", "int64"),
    ("cap_pad", "bool"),
    ("cap_noisy", "bool"),
    ("cap_valid", "bool"),
    ("siglip_feats", "float32"),
    ("siglip_pos", "int64"),
    ("siglip_pad", "bool"),
    ("siglip_noisy", "bool"),
    ("siglip_valid", "bool"),
];
pub(crate) const OUTPUTS: &[(&str, &str)] = &[(X_OUT, "float32")];

fn pad_len(n: usize) -> usize {
    (SEQ - n % SEQ) % SEQ
}

/// One stream of one batch item.
#[derive(Default, Clone)]
struct Stream {
    feats: Vec<f32>,
    dim: usize,
    pos: Vec<[i64; 3]>,
    pad: Vec<bool>,
    noisy: Vec<bool>,
    /// False for tokens every attention masks out (as batch padding is).
    valid: Vec<bool>,
}

impl Stream {
    fn len(&self) -> usize {
        self.pad.len()
    }

    /// Appends `rows` (n x dim, row-major) and repeats the last row `p` times (diffusers pads
    /// with copies; those tokens become the pad token after embedding).
    fn push_rows(&mut self, rows: &[f32], dim: usize, p: usize, noisy: bool) {
        let n = rows.len() / dim;
        self.dim = dim;
        self.feats.extend_from_slice(rows);
        for _ in 0..p {
            self.feats.extend_from_slice(&rows[(n - 1) * dim..]);
        }
        self.pad.extend(std::iter::repeat_n(false, n).chain(std::iter::repeat_n(true, p)));
        self.noisy.extend(std::iter::repeat_n(noisy, n + p));
        self.valid.extend(std::iter::repeat_n(true, n + p));
    }

    /// Appends one block of SEQ pad tokens (zeros before embedding), `valid` or masked out.
    fn push_pad_block(&mut self, valid: bool) {
        self.feats.extend(std::iter::repeat_n(0.0, SEQ * self.dim));
        self.pad.extend(std::iter::repeat_n(true, SEQ));
        self.noisy.extend(std::iter::repeat_n(true, SEQ));
        self.valid.extend(std::iter::repeat_n(valid, SEQ));
        self.pos.extend(std::iter::repeat_n([0, 0, 0], SEQ));
    }
}

/// The conditions of an edit, shared by every batch item: the references' clean latents
/// `[C, h, w]` and vision tokens `[H, W, hidden]` (none for Omni-mode text-to-image), and
/// the vision tokens' width (`hidden`).
pub(crate) struct References {
    pub latents: Vec<Array3<f32>>,
    pub vision: Vec<Array3<f32>>,
    pub vision_dim: usize,
}

/// Patch tokens of `[C, h, w]`: per patch (row, column) the values in (pH, pW, C) order.
fn patchify(latents: ArrayView3<f32>, patch: usize) -> Vec<f32> {
    let (c, h, w) = latents.dim();
    let (ht, wt) = (h / patch, w / patch);
    let mut out = Vec::with_capacity(c * h * w);
    for i in 0..ht {
        for j in 0..wt {
            for py in 0..patch {
                for px in 0..patch {
                    for ch in 0..c {
                        out.push(latents[[ch, i * patch + py, j * patch + px]]);
                    }
                }
            }
        }
    }
    out
}

/// Packs one batch item: its caption segments (features `[L_j, D]`), the references and the
/// current target latents `[C, h, w]`.
fn pack_item(segments: &[&Array2<f32>], refs: &References, target: ArrayView3<f32>, patch: usize) -> [Stream; 3] {
    let images = refs.latents.len() + 1;
    // Noise mask per image: references clean, the target noisy; caption segment j takes
    // image j's value, and 1 past the last image.
    let noisy_image = |j: usize| j + 1 >= images;
    let mut cap = Stream::default();
    let mut cap_pos_rows: Vec<[i64; 3]> = Vec::new();
    let mut cap_end = Vec::with_capacity(segments.len());
    let mut cu = 1i64;
    for (j, seg) in segments.iter().enumerate() {
        let (n, dim) = seg.dim();
        let p = pad_len(n);
        let rows = seg.as_standard_layout();
        cap.push_rows(rows.as_slice().expect("standard layout"), dim, p, noisy_image(j));
        cap_pos_rows.extend((0..(n + p) as i64).map(|k| [cu + k, 0, 0]));
        cap_pos_rows.extend(std::iter::repeat_n([0, 0, 0], p));
        cu += n as i64;
        cap_end.push(cu);
        cu += 2;
    }
    cap_pos_rows.truncate(cap.len());
    cap.pos = cap_pos_rows;

    let mut x = Stream::default();
    let mut sizes = Vec::with_capacity(images);
    for (j, &end) in cap_end.iter().enumerate().take(images) {
        let lat = if j < refs.latents.len() { refs.latents[j].view() } else { target };
        let (c, h, w) = lat.dim();
        let (ht, wt) = (h / patch, w / patch);
        let n = ht * wt;
        let p = pad_len(n);
        x.push_rows(&patchify(lat, patch), patch * patch * c, p, noisy_image(j));
        for i in 0..ht {
            for k in 0..wt {
                x.pos.push([end, i as i64, k as i64]);
            }
        }
        x.pos.extend(std::iter::repeat_n([0, 0, 0], p));
        sizes.push((h, w));
    }

    let mut sig = Stream { dim: refs.vision_dim, ..Stream::default() };
    for (j, grid) in refs.vision.iter().enumerate() {
        let (sh, sw, sc) = grid.dim();
        // permute(2, 0, 1) then reshape(H*W, C): the [C, H, W] buffer read in rows of C.
        let channel_major: Vec<f32> = grid.view().permuted_axes([2, 0, 1]).iter().copied().collect();
        let n = sh * sw;
        let p = pad_len(n);
        sig.push_rows(&channel_major, sc, p, false);
        let (h, w) = sizes[j];
        let scale = |v: usize, grid_len: usize, latent_len: usize| -> i64 {
            (v as f32 / (grid_len.saturating_sub(1).max(1)) as f32 * (latent_len - 1) as f32) as i32 as i64
        };
        for i in 0..sh {
            for k in 0..sw {
                sig.pos.push([cap_end[j] + 1, scale(i, sh, h), scale(k, sw, w)]);
            }
        }
        sig.pos.extend(std::iter::repeat_n([0, 0, 0], p));
    }
    // The target has no vision tokens: one block of 32 pad tokens (zeros before embedding).
    // Without references diffusers has no vision stream at all; the graph's attention needs a
    // token, so the block is there but masked out everywhere (as batch padding): the caption
    // and image tokens come out as without it (omni_pack.py; verify.py checks it).
    sig.push_pad_block(!refs.vision.is_empty());
    [x, cap, sig]
}

/// The highest RoPE position (axis 0) an item with caption segments of these lengths uses:
/// a segment's grid runs to its start + its padded length - 1, and each reference's vision
/// tokens sit one past its segment's end.
pub(crate) fn highest_caption_position(segment_lengths: &[usize]) -> usize {
    let (mut cu, mut highest) = (1usize, 0usize);
    for &n in segment_lengths {
        highest = highest.max(cu + n + pad_len(n) - 1);
        cu += n;
        highest = highest.max(cu + 1);
        cu += 2;
    }
    highest
}

/// The graph's padded tensors for a batch, one stream.
struct Batched {
    feats: Array3<f32>,
    pos: Array3<i64>,
    pad: Array2<bool>,
    noisy: Array2<bool>,
    valid: Array2<bool>,
}

fn batch_stream(items: &[&Stream]) -> Batched {
    let b = items.len();
    let len = items.iter().map(|s| s.len()).max().unwrap_or(0);
    let dim = items.iter().map(|s| s.dim).max().unwrap_or(0);
    let mut out = Batched {
        feats: Array3::zeros((b, len, dim)),
        pos: Array3::zeros((b, len, 3)),
        pad: Array2::from_elem((b, len), false),
        noisy: Array2::from_elem((b, len), false),
        valid: Array2::from_elem((b, len), false),
    };
    for (i, s) in items.iter().enumerate() {
        let n = s.len();
        let rows = Array2::from_shape_vec((n, s.dim), s.feats.clone()).expect("n x dim");
        out.feats.slice_mut(s![i, ..n, ..]).assign(&rows);
        for (k, p) in s.pos.iter().enumerate() {
            for (a, &v) in p.iter().enumerate() {
                out.pos[[i, k, a]] = v;
            }
        }
        for k in 0..n {
            out.pad[[i, k]] = s.pad[k];
            out.noisy[[i, k]] = s.noisy[k];
            out.valid[[i, k]] = s.valid[k];
        }
    }
    out
}

/// One Omni transformer call for a batch: item b has caption segments `captions[b]` and
/// target latents `targets[b]` (`[B, C, h, w]`); every item shares `refs`. Returns the
/// prediction for the targets, `[B, C, h, w]`.
#[allow(clippy::too_many_arguments)] // the call's own inputs; one caller (pipeline::edit)
pub(crate) fn predict(
    graph: &Graph,
    captions: &[Vec<&Array2<f32>>],
    refs: &References,
    targets: &Array4<f32>,
    t_norm: f32,
    patch: usize,
    context: &RunContext,
    release_arena: bool,
) -> Result<Array4<f32>> {
    let b = targets.shape()[0];
    let packed: Vec<[Stream; 3]> =
        (0..b).map(|i| pack_item(&captions[i], refs, targets.slice(s![i, .., .., ..]), patch)).collect();
    let streams: Vec<Batched> =
        (0..3).map(|k| batch_stream(&packed.iter().map(|p| &p[k]).collect::<Vec<_>>())).collect();
    let timestep = Array1::<f32>::from_elem(b, t_norm);
    let err = |e: ort::Error| Error::ort("transformer_omni", e);
    let mut inputs = vec![("timestep".into(), TensorRef::from_array_view(&timestep).map_err(err)?.into())];
    for (k, stream) in streams.iter().enumerate() {
        let name = STREAMS[k];
        inputs.push((FEATS[k].into(), TensorRef::from_array_view(&stream.feats).map_err(err)?.into()));
        inputs.push((format!("{name}_pos").into(), TensorRef::from_array_view(&stream.pos).map_err(err)?.into()));
        inputs.push((format!("{name}_pad").into(), TensorRef::from_array_view(&stream.pad).map_err(err)?.into()));
        inputs.push((format!("{name}_noisy").into(), TensorRef::from_array_view(&stream.noisy).map_err(err)?.into()));
        inputs.push((format!("{name}_valid").into(), TensorRef::from_array_view(&stream.valid).map_err(err)?.into()));
    }
    let out = graph.run(inputs, &[X_OUT], context, release_arena)?.remove(0);
    let out = out.into_dimensionality::<Ix3>().map_err(|e| graph.failed(format!("output rank: {e}")))?;
    let (_, c, h, w) = targets.dim();
    let depth = patch * patch * c;
    if out.shape()[0] != b || out.shape()[1] != streams[0].feats.shape()[1] || out.shape()[2] != depth {
        return Err(graph.failed(format!("output shape {:?}", out.shape())));
    }
    // The target's tokens follow every reference's (each padded to 32).
    let offset: usize = refs
        .latents
        .iter()
        .map(|l| {
            let n = (l.shape()[1] / patch) * (l.shape()[2] / patch);
            n + pad_len(n)
        })
        .sum();
    let (ht, wt) = (h / patch, w / patch);
    let mut pred = Array4::<f32>::zeros((b, c, h, w));
    for i in 0..b {
        for r in 0..ht {
            for q in 0..wt {
                let token = out.slice(s![i, offset + r * wt + q, ..]);
                let mut k = 0;
                for py in 0..patch {
                    for px in 0..patch {
                        for ch in 0..c {
                            pred[[i, ch, r * patch + py, q * patch + px]] = token[k];
                            k += 1;
                        }
                    }
                }
            }
        }
    }
    Ok(pred)
}
