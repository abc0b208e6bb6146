"""Export wrapper around diffusers' ZImageTransformer2DModel (basic, non-omni mode).

diffusers' forward takes Python lists of per-item tensors and uses complex-valued RoPE; neither
exports to ONNX. This wrapper keeps the model's own submodules and weights, and re-expresses
only the glue around them with padded batch tensors:

- RoPE as real cos/sin tables, gathered per axis with F.embedding (the tables are taken from
  diffusers' own complex tables, so they are bit-identical);
- the 32-multiple padding of each stream done with arange/where masks instead of Python loops,
  so captions of different lengths can share one batch;
- the transformer blocks, embedders and final layer are called unchanged; only the attention
  processor is swapped for one that applies the real RoPE (it defers to the stock processor
  when given diffusers' complex table, so the wrapped model keeps working in diffusers).

Per batch item b with len_b = sum(cap_mask[b]) real caption tokens and P_b = ceil32(len_b):
- caption token k < len_b is embedded; len_b <= k < P_b becomes cap_pad_token and IS attended
  to; k >= P_b is masked out. Caption positions are (1 + k, 0, 0).
- image patch (h, w) has position (P_b + 1, h, w); the image stream is padded to a multiple of
  32 with x_pad_token at position (0, 0, 0), also attended to.
- the unified sequence is [image, caption]; the output is the first H*W/4 image tokens.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffusers.models.transformers.transformer_z_image import (
    SEQ_MULTI_OF,
    RopeEmbedder,
    ZImageTransformer2DModel,
    ZSingleStreamAttnProcessor,
)


def ceil_to_multiple(n: torch.Tensor, multiple: int) -> torch.Tensor:
    return (n + (multiple - 1)) // multiple * multiple


def apply_real_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, D]; cos/sin: [B, S, D/2]. Rotates adjacent pairs (2i, 2i+1), as diffusers'
    complex view does, in float32 like diffusers (it upcasts before the complex product)."""
    xf = x.float().unflatten(-1, (-1, 2))
    re, im = xf[..., 0], xf[..., 1]
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    out = torch.stack((re * c - im * s, re * s + im * c), dim=-1).flatten(3)
    return out.type_as(x)


class RealRopeAttnProcessor(ZSingleStreamAttnProcessor):
    """Same computation as ZSingleStreamAttnProcessor, but freqs_cis is a (cos, sin) pair and the
    attention calls scaled_dot_product_attention directly with a [B, 1, 1, S] boolean key mask.
    Given anything else (diffusers' complex table) it defers to the stock processor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        if not isinstance(freqs_cis, tuple):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        cos, sin = freqs_cis
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query = apply_real_rope(query, cos, sin)
        key = apply_real_rope(key, cos, sin)
        dtype = query.dtype
        # A full [B, 1, S, S] mask: ONNX Runtime's fused Attention (opset 23) does not broadcast
        # the query axis of the mask.
        seq = query.shape[1]
        mask = None if attention_mask is None else attention_mask[:, None, None, :].expand(-1, 1, seq, -1)
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
        ).transpose(1, 2)
        out = out.flatten(2, 3).to(dtype)
        out = attn.to_out[0](out)
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)
        return out


class ZImageTransformerExport(nn.Module):
    """Inputs: latents [B,C,H,W], timestep [B] (already (1000 - t)/1000), cap_feats [B,L,Dcap],
    cap_mask [B,L] bool (real tokens first). Output: noise_pred [B,C,H,W] float32."""

    def __init__(self, model: ZImageTransformer2DModel):
        super().__init__()
        cfg = model.config
        if len(cfg.all_f_patch_size) != 1 or cfg.all_f_patch_size[0] != 1:
            raise ValueError("only image models (f_patch_size 1) are supported")
        # An Omni transformer (siglip_feat_dim set) runs here in diffusers' basic mode, as
        # ZImagePipeline runs it: its SigLIP modules are unused (transformer_omni.onnx has them).
        self.patch = cfg.all_patch_size[0]
        key = f"{self.patch}-1"
        self.channels = cfg.in_channels
        self.t_scale = float(cfg.t_scale)
        self.dtype = next(model.parameters()).dtype

        self.t_mlp = model.t_embedder.mlp
        self.t_freq_dim = model.t_embedder.frequency_embedding_size
        # Same expression as TimestepEmbedder.timestep_embedding, evaluated once in eager torch so
        # the exporter cannot constant-fold it to slightly different values.
        half = self.t_freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
        self.register_buffer("t_freqs", freqs, persistent=False)

        self.x_embedder = model.all_x_embedder[key]
        self.final_layer = model.all_final_layer[key]
        self.cap_embedder = model.cap_embedder
        self.noise_refiner = model.noise_refiner
        self.context_refiner = model.context_refiner
        self.layers = model.layers
        self.x_pad_token = model.x_pad_token
        self.cap_pad_token = model.cap_pad_token

        processor = RealRopeAttnProcessor()
        for block in [*self.noise_refiner, *self.context_refiner, *self.layers]:
            block.attention.set_processor(processor)

        # diffusers' own complex tables, split into real parts: one (cos, sin) pair per axis.
        tables = RopeEmbedder.precompute_freqs_cis(list(cfg.axes_dims), list(cfg.axes_lens), theta=cfg.rope_theta)
        for i, table in enumerate(tables):
            self.register_buffer(f"rope_cos_{i}", table.real.contiguous(), persistent=False)
            self.register_buffer(f"rope_sin_{i}", table.imag.contiguous(), persistent=False)
        self.n_axes = len(tables)

    def rope(self, pos: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """pos: one int64 [B, S] tensor per axis -> (cos, sin), each [B, S, head_dim/2]."""
        cos = [F.embedding(p, getattr(self, f"rope_cos_{i}")) for i, p in enumerate(pos)]
        sin = [F.embedding(p, getattr(self, f"rope_sin_{i}")) for i, p in enumerate(pos)]
        return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)

    def timestep_embedding(self, timestep: torch.Tensor) -> torch.Tensor:
        args = (timestep * self.t_scale)[:, None].float() * self.t_freqs[None]
        t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.t_freq_dim % 2:
            t_freq = torch.cat([t_freq, torch.zeros_like(t_freq[:, :1])], dim=-1)
        return self.t_mlp(t_freq.to(self.dtype))

    def forward(self, latents, timestep, cap_feats, cap_mask):
        p = self.patch
        batch, channels, height, width = latents.shape
        ht, wt = height // p, width // p
        device = latents.device
        adaln = self.timestep_embedding(timestep).to(self.dtype)

        # Per-item caption lengths and their 32-padded lengths.
        cap_len = cap_mask.to(torch.int64).sum(dim=1)  # [B]
        cap_pad_len = ceil_to_multiple(cap_len, SEQ_MULTI_OF)  # [B]

        # ---- image stream: patchify (F=1, pH, pW, C order), embed, pad to a multiple of 32.
        x = latents.to(self.dtype).reshape(batch, channels, ht, p, wt, p)
        x = x.permute(0, 2, 4, 3, 5, 1).reshape(batch, ht * wt, p * p * channels)
        x = self.x_embedder(x)
        n_img = ht * wt
        n_img_pad = (n_img + SEQ_MULTI_OF - 1) // SEQ_MULTI_OF * SEQ_MULTI_OF
        x = F.pad(x, (0, 0, 0, n_img_pad - n_img))
        img_idx = torch.arange(n_img_pad, device=device)
        img_real = img_idx < n_img  # [S_img]
        x = torch.where(img_real[None, :, None], x, self.x_pad_token.to(x.dtype))
        # Row/column of each patch without integer division on symbolic sizes.
        rows = torch.arange(ht, device=device)[:, None].expand(ht, wt).reshape(-1)
        cols = torch.arange(wt, device=device)[None, :].expand(ht, wt).reshape(-1)
        rows = F.pad(rows, (0, n_img_pad - n_img))
        cols = F.pad(cols, (0, n_img_pad - n_img))
        zeros_img = torch.zeros(batch, n_img_pad, dtype=torch.int64, device=device)
        img_pos = [
            torch.where(img_real[None, :], (cap_pad_len + 1)[:, None], zeros_img),
            zeros_img + rows[None, :],
            zeros_img + cols[None, :],
        ]
        img_cos, img_sin = self.rope(img_pos)
        for layer in self.noise_refiner:
            x = layer(x, None, (img_cos, img_sin), adaln)

        # ---- caption stream: embed, pad to a multiple of 32, pad tokens up to P_b.
        cap_in = cap_feats.shape[1]
        cap_stream = (cap_in + SEQ_MULTI_OF - 1) // SEQ_MULTI_OF * SEQ_MULTI_OF
        cap = self.cap_embedder(cap_feats.to(self.dtype))
        cap = F.pad(cap, (0, 0, 0, cap_stream - cap_in))
        cap_idx = torch.arange(cap_stream, device=device)[None, :]  # [1, S_cap]
        cap_real = cap_idx < cap_len[:, None]  # [B, S_cap]
        cap_keep = cap_idx < cap_pad_len[:, None]  # real + pad tokens: attended
        cap = torch.where(cap_real[..., None], cap, self.cap_pad_token.to(cap.dtype))
        zeros_cap = torch.zeros(batch, cap_stream, dtype=torch.int64, device=device)
        cap_pos = [torch.where(cap_keep, cap_idx + 1, zeros_cap), zeros_cap, zeros_cap]
        cap_cos, cap_sin = self.rope(cap_pos)
        for layer in self.context_refiner:
            cap = layer(cap, cap_keep, (cap_cos, cap_sin))

        # ---- unified [image, caption] sequence; tokens past P_b stay masked.
        seq = torch.cat([x, cap], dim=1)
        seq_cos = torch.cat([img_cos, cap_cos], dim=1)
        seq_sin = torch.cat([img_sin, cap_sin], dim=1)
        seq_mask = torch.cat([torch.ones_like(zeros_img, dtype=torch.bool), cap_keep], dim=1)
        for layer in self.layers:
            seq = layer(seq, seq_mask, (seq_cos, seq_sin), adaln)
        seq = self.final_layer(seq, c=adaln)

        # ---- unpatchify the real image tokens back to [B, C, H, W].
        out = seq[:, :n_img].reshape(batch, ht, wt, p, p, channels)
        out = out.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height, width)
        return out.float()
