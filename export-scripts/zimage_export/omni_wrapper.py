"""Export wrapper around diffusers' ZImageTransformer2DModel in Omni mode (siglip_feat_dim set).

In Omni mode diffusers' forward takes, per batch item, lists of caption segments, of images
(condition latents then the noisy target) and of SigLIP grids, and builds from them three
streams (caption, image, SigLIP) with per-token timesteps: a token whose noise mask is 1 is
modulated with t, the others with t = 1 (clean). The list bookkeeping (32-padding of every
segment, RoPE positions, which tokens are pad tokens, noise masks) is integer work done by
the runtime (sdk/src/model/omni.rs); this graph takes its result as padded tensors and runs
the model's own submodules on them:

  per stream s in (x, cap, siglip): feats [B, S, D_s], pos [B, S, 3] int64,
  pad [B, S] bool (replaced by the stream's pad token after embedding),
  noisy [B, S] bool (modulated with t rather than t = 1),
  valid [B, S] bool (false for batch padding only: such keys are masked out).

x_tokens are patchified latents (patch order pH, pW, C as diffusers' _patchify_image).
The unified sequence is [cap, x, siglip]; the output x_out [B, S_x, p*p*C] is the final
layer's output at every x token (the runtime unpatchifies the target's tokens).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffusers.models.transformers.transformer_z_image import RopeEmbedder, ZImageTransformer2DModel

from .transformer_wrapper import RealRopeAttnProcessor


class ZImageOmniTransformerExport(nn.Module):
    def __init__(self, model: ZImageTransformer2DModel):
        super().__init__()
        cfg = model.config
        if getattr(cfg, "siglip_feat_dim", None) is None:
            raise ValueError("not an Omni transformer (siglip_feat_dim is not set)")
        if len(cfg.all_f_patch_size) != 1 or cfg.all_f_patch_size[0] != 1:
            raise ValueError("only image models (f_patch_size 1) are supported")
        key = f"{cfg.all_patch_size[0]}-1"
        self.t_scale = float(cfg.t_scale)
        self.dtype = next(model.parameters()).dtype
        self.t_mlp = model.t_embedder.mlp
        self.t_freq_dim = model.t_embedder.frequency_embedding_size
        half = self.t_freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
        self.register_buffer("t_freqs", freqs, persistent=False)

        self.x_embedder = model.all_x_embedder[key]
        self.final_layer = model.all_final_layer[key]
        self.cap_embedder = model.cap_embedder
        self.siglip_embedder = model.siglip_embedder
        self.noise_refiner = model.noise_refiner
        self.context_refiner = model.context_refiner
        self.siglip_refiner = model.siglip_refiner
        self.layers = model.layers
        self.x_pad_token = model.x_pad_token
        self.cap_pad_token = model.cap_pad_token
        self.siglip_pad_token = model.siglip_pad_token

        processor = RealRopeAttnProcessor()
        for block in [*self.noise_refiner, *self.context_refiner, *self.siglip_refiner, *self.layers]:
            block.attention.set_processor(processor)
        tables = RopeEmbedder.precompute_freqs_cis(list(cfg.axes_dims), list(cfg.axes_lens), theta=cfg.rope_theta)
        for i, table in enumerate(tables):
            self.register_buffer(f"rope_cos_{i}", table.real.contiguous(), persistent=False)
            self.register_buffer(f"rope_sin_{i}", table.imag.contiguous(), persistent=False)
        self.n_axes = len(tables)

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos [B, S, n_axes] int64 -> (cos, sin), each [B, S, head_dim/2]."""
        cos = [F.embedding(pos[..., i], getattr(self, f"rope_cos_{i}")) for i in range(self.n_axes)]
        sin = [F.embedding(pos[..., i], getattr(self, f"rope_sin_{i}")) for i in range(self.n_axes)]
        return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)

    def timestep_embedding(self, timestep: torch.Tensor) -> torch.Tensor:
        args = (timestep * self.t_scale)[:, None].float() * self.t_freqs[None]
        t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.t_freq_dim % 2:
            t_freq = torch.cat([t_freq, torch.zeros_like(t_freq[:, :1])], dim=-1)
        return self.t_mlp(t_freq.to(self.dtype))

    def forward(self, timestep, x_tokens, x_pos, x_pad, x_noisy, x_valid, cap_feats, cap_pos, cap_pad, cap_noisy,
                cap_valid, siglip_feats, siglip_pos, siglip_pad, siglip_noisy, siglip_valid):
        t_noisy = self.timestep_embedding(timestep).to(self.dtype)
        t_clean = self.timestep_embedding(torch.ones_like(timestep)).to(self.dtype)

        x = self.x_embedder(x_tokens.to(self.dtype))
        x = torch.where(x_pad[..., None], self.x_pad_token.to(x.dtype), x)
        x_rope = self.rope(x_pos)
        x_nm = x_noisy.to(torch.int64)
        for layer in self.noise_refiner:
            x = layer(x, x_valid, x_rope, None, x_nm, t_noisy, t_clean)

        cap = self.cap_embedder(cap_feats.to(self.dtype))
        cap = torch.where(cap_pad[..., None], self.cap_pad_token.to(cap.dtype), cap)
        cap_rope = self.rope(cap_pos)
        for layer in self.context_refiner:
            cap = layer(cap, cap_valid, cap_rope)

        sig = self.siglip_embedder(siglip_feats.to(self.dtype))
        sig = torch.where(siglip_pad[..., None], self.siglip_pad_token.to(sig.dtype), sig)
        sig_rope = self.rope(siglip_pos)
        for layer in self.siglip_refiner:
            sig = layer(sig, siglip_valid, sig_rope)

        seq = torch.cat([cap, x, sig], dim=1)
        rope = (torch.cat([cap_rope[0], x_rope[0], sig_rope[0]], dim=1),
                torch.cat([cap_rope[1], x_rope[1], sig_rope[1]], dim=1))
        valid = torch.cat([cap_valid, x_valid, siglip_valid], dim=1)
        noisy = torch.cat([cap_noisy, x_noisy, siglip_noisy], dim=1).to(torch.int64)
        for layer in self.layers:
            seq = layer(seq, valid, rope, None, noisy, t_noisy, t_clean)
        seq = self.final_layer(seq, noise_mask=noisy, c_noisy=t_noisy, c_clean=t_clean)
        n_cap, n_x = cap_feats.shape[1], x_tokens.shape[1]
        return seq[:, n_cap : n_cap + n_x].float()
