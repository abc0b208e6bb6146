"""Export wrapper for transformers' Siglip2VisionModel (NaFlex), as ZImageOmniPipeline uses it.

The pipeline runs SigLIP2 on one reference at a time and keeps only the real patches of
`last_hidden_state` (the first h*w rows), viewed as an [h, w, C] grid. The processor pads the
patch sequence to max_num_patches and transformers hides the padding with an attention mask;
the real patches' outputs do not depend on the padding, so this graph takes the real patches
only, as a grid: `pixel_patches` [B, h, w, 3*p*p] (B images of the same grid; the runtime
sends one). The grid's shape is `spatial_shapes` and no attention mask is needed.

Position embeddings: transformers resizes its G x G table to (h, w) with
F.interpolate(bilinear, align_corners=False, antialias=True), sizes taken from data. Here the
same separable antialiased-triangle filter is written as two weight matrices built from the
input's symbolic sizes (rows: Wh [h, G], columns: Ww [w, G]), so the graph needs no
data-dependent Resize; verify.py checks it against transformers on grids smaller and larger
than G.
"""

import torch
from torch import nn


def antialias_bilinear_weights(out_size, in_size: int) -> torch.Tensor:
    """[out, in] weights of torch's antialiased bilinear resize along one axis (align_corners
    False, scale in/out): a triangle filter stretched by the scale when downsampling,
    normalised per output row. Weights outside the filter's support are exactly zero, so the
    dense matrix equals torch's windowed sum."""
    i = torch.arange(out_size, dtype=torch.float32)
    n_out = torch.ones_like(i).sum()  # out_size as a float tensor (symbolic in the graph)
    scale = in_size / n_out
    support = torch.clamp(scale, min=1.0)  # bilinear: half-width 1, widened when downsampling
    center = scale * (i + 0.5)
    k = torch.arange(in_size, dtype=torch.float32)
    w = torch.clamp(1.0 - torch.abs((k[None, :] - center[:, None] + 0.5) / support), min=0.0)
    return w / w.sum(dim=1, keepdim=True)


class Siglip2VisionExport(nn.Module):
    """Input pixel_patches [B, h, w, 3*p*p] (processor output, real patches in row-major grid
    order). Output hidden_states [B, h, w, hidden] float32 (last_hidden_state after the
    post-layernorm)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.patch_embedding = model.embeddings.patch_embedding
        self.grid = model.embeddings.position_embedding_size
        self.position_embedding = model.embeddings.position_embedding
        self.encoder = model.encoder
        self.post_layernorm = model.post_layernorm

    def forward(self, pixel_patches):
        batch, h, w, depth = pixel_patches.shape
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixel_patches.reshape(batch, h * w, depth).to(dtype))
        # [G, G, C] table -> [h, w, C], interpolated in float32 like transformers on CPU.
        table = self.position_embedding.weight.float().reshape(self.grid, self.grid, -1)
        wh = antialias_bilinear_weights(h, self.grid)
        ww = antialias_bilinear_weights(w, self.grid)
        pos = torch.einsum("hg,gkc->hkc", wh, table)
        pos = torch.einsum("wk,hkc->hwc", ww, pos)
        x = x + pos.reshape(1, h * w, -1).to(dtype)
        x = self.encoder(inputs_embeds=x, attention_mask=None).last_hidden_state
        x = self.post_layernorm(x)
        return x.reshape(batch, h, w, -1).float()
