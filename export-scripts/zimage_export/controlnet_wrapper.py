"""Export wrapper for a transformer with a ZImageControlNetModel attached: ONE graph that takes
the control latents and the conditioning scale as inputs and returns the noise prediction.

Why one graph and not ControlNet + transformer as two: the ControlNet reuses the transformer's
embedders, noise refiner and context refiner (diffusers' `from_transformer`). In one graph those
weights are the very same initializers as in transformer.onnx (export_controlnet.py points them
at the transformer's bytes on disk), so the SDK loads this graph INSTEAD of the plain
transformer and every shared weight sits in memory once. It also lets the graph compute each
hint right before the main layer that consumes it, so only one hint ([B, S, dim]) is alive at
a time instead of all of them (diffusers computes the whole dict first).

The computation is diffusers 0.42.1's ZImageControlNetModel.forward followed by
ZImageTransformer2DModel.forward with `controlnet_block_samples`, per add_control_noise_refiner:
- None: the ControlNet's control_noise_refiner (plain transformer blocks) refines the control
  tokens; the ControlNet's copy of the image stream is the transformer's own noise-refiner
  output (same weights, same inputs), so it is computed once.
- "control_layers": the control_layers run first on the image stream (before the noise
  refiner); their first len(control_refiner_layers_places) skips are added after those noise
  refiner layers in the ControlNet's OWN pass of the noise refiner; the main transformer's
  noise refiner pass stays without hints. Then the control_layers run again on the unified
  stream.
- "control_noise_refiner": the same with the ControlNet's own control_noise_refiner blocks.
Hints are scaled by `conditioning_scale` and added after main layer control_layers_places[k].
"""

import torch
import torch.nn.functional as F

from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF, ZImageTransformerBlock

from .transformer_wrapper import RealRopeAttnProcessor, ZImageTransformerExport, ceil_to_multiple

REFINER_MODES = (None, "control_layers", "control_noise_refiner")


def block_body(block, c, mask, freqs, adaln):
    """The transformer-block computation of a ZImageControlTransformerBlock (or a plain block):
    both classes have the same attention/norm/FFN/modulation attributes, so the plain block's
    forward applies to either."""
    return ZImageTransformerBlock.forward(block, c, mask, freqs, adaln)


def control_block(block, c, x, mask, freqs, adaln):
    """One ZImageControlTransformerBlock without diffusers' stack/unbind bookkeeping: returns
    (skip, c). Block 0 mixes the stream `x` in through before_proj."""
    if block.block_id == 0:
        c = block.before_proj(c) + x
    c = block_body(block, c, mask, freqs, adaln)
    return block.after_proj(c), c


class ZImageControlTransformerExport(ZImageTransformerExport):
    """Inputs: the plain transformer's (latents, timestep, cap_feats, cap_mask), plus
    control_context [B, control_in_dim, H, W] (the control latents, zero-padded or
    [control, mask, masked image] for 33 channels) and conditioning_scale [1] float32.
    Output: noise_pred [B, C, H, W] float32."""

    def __init__(self, transformer, controlnet):
        super().__init__(transformer)
        cfg = controlnet.config
        if cfg.add_control_noise_refiner not in REFINER_MODES:
            raise ValueError(f"unsupported add_control_noise_refiner {cfg.add_control_noise_refiner!r}")
        if cfg.dim != transformer.config.dim:
            raise ValueError(f"the ControlNet has dim {cfg.dim}, the transformer {transformer.config.dim}")
        self.mode = cfg.add_control_noise_refiner
        self.places = list(cfg.control_layers_places)
        self.refiner_places = list(cfg.control_refiner_layers_places or [])
        self.control_in_dim = cfg.control_in_dim
        self.control_x_embedder = controlnet.control_all_x_embedder[f"{self.patch}-1"]
        self.control_layers = controlnet.control_layers
        self.control_noise_refiner = controlnet.control_noise_refiner  # None for "control_layers"
        processor = RealRopeAttnProcessor()
        for block in [*self.control_layers, *(self.control_noise_refiner or [])]:
            block.attention.set_processor(processor)

    def own_modules(self) -> list:
        """The ControlNet modules the graph runs (its weights that are not the transformer's):
        the control embedder, the control layers up to the last one whose place is a main
        layer (all of them in "control_layers" mode, which also runs them on the image stream),
        and the control noise refiner."""
        n_main = len(self.layers)
        used = max((k + 1 for k, place in enumerate(self.places) if place < n_main), default=0)
        layers = list(self.control_layers if self.mode == "control_layers" else self.control_layers[:used])
        return [self.control_x_embedder, *layers, *(self.control_noise_refiner or [])]

    def refine_image(self, x, c, freqs, adaln, scale):
        """Noise refiner of the main transformer, and the ControlNet's view of it.
        Returns (x_main, x_control, c)."""
        x_main = x
        for layer in self.noise_refiner:
            x_main = layer(x_main, None, freqs, adaln)
        if self.mode is None:
            for layer in self.control_noise_refiner:
                c = block_body(layer, c, None, freqs, adaln)
            return x_main, x_main, c
        blocks = self.control_layers if self.mode == "control_layers" else self.control_noise_refiner
        skips = []
        for block in blocks:
            skip, c = control_block(block, c, x, None, freqs, adaln)
            skips.append(skip)
        hints = {place: skips[k] for k, place in enumerate(self.refiner_places)}
        x_control = x
        for i, layer in enumerate(self.noise_refiner):
            x_control = layer(x_control, None, freqs, adaln)
            if i in hints:
                x_control = x_control + hints[i] * scale
        return x_main, x_control, c

    def forward(self, latents, timestep, cap_feats, cap_mask, control_context, conditioning_scale):
        p = self.patch
        batch, channels, height, width = latents.shape
        ht, wt = height // p, width // p
        device = latents.device
        adaln = self.timestep_embedding(timestep).to(self.dtype)
        scale = conditioning_scale.to(self.dtype)

        cap_len = cap_mask.to(torch.int64).sum(dim=1)
        cap_pad_len = ceil_to_multiple(cap_len, SEQ_MULTI_OF)

        n_img = ht * wt
        n_img_pad = (n_img + SEQ_MULTI_OF - 1) // SEQ_MULTI_OF * SEQ_MULTI_OF
        img_real = torch.arange(n_img_pad, device=device) < n_img

        def embed(image, embedder):
            c_in = image.shape[1]
            t = image.to(self.dtype).reshape(batch, c_in, ht, p, wt, p)
            t = t.permute(0, 2, 4, 3, 5, 1).reshape(batch, ht * wt, p * p * c_in)
            t = F.pad(embedder(t), (0, 0, 0, n_img_pad - n_img))
            return torch.where(img_real[None, :, None], t, self.x_pad_token.to(t.dtype))

        x = embed(latents, self.x_embedder)
        c = embed(control_context, self.control_x_embedder)

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
        x_main, x_control, c = self.refine_image(x, c, (img_cos, img_sin), adaln, scale)

        cap_in = cap_feats.shape[1]
        cap_stream = (cap_in + SEQ_MULTI_OF - 1) // SEQ_MULTI_OF * SEQ_MULTI_OF
        cap = self.cap_embedder(cap_feats.to(self.dtype))
        cap = F.pad(cap, (0, 0, 0, cap_stream - cap_in))
        cap_idx = torch.arange(cap_stream, device=device)[None, :]
        cap_real = cap_idx < cap_len[:, None]
        cap_keep = cap_idx < cap_pad_len[:, None]
        cap = torch.where(cap_real[..., None], cap, self.cap_pad_token.to(cap.dtype))
        zeros_cap = torch.zeros(batch, cap_stream, dtype=torch.int64, device=device)
        cap_pos = [torch.where(cap_keep, cap_idx + 1, zeros_cap), zeros_cap, zeros_cap]
        cap_cos, cap_sin = self.rope(cap_pos)
        for layer in self.context_refiner:
            cap = layer(cap, cap_keep, (cap_cos, cap_sin))

        seq = torch.cat([x_main, cap], dim=1)
        stream = torch.cat([x_control, cap], dim=1)  # the ControlNet's unified stream
        ctrl = torch.cat([c, cap], dim=1)
        freqs = (torch.cat([img_cos, cap_cos], dim=1), torch.cat([img_sin, cap_sin], dim=1))
        seq_mask = torch.cat([torch.ones_like(zeros_img, dtype=torch.bool), cap_keep], dim=1)

        # Hints are computed lazily, in control-layer order, right before the main layer that
        # takes them; places past the last main layer are never used (as in diffusers).
        skips = []
        for i, layer in enumerate(self.layers):
            seq = layer(seq, seq_mask, freqs, adaln)
            if i in self.places:
                k = self.places.index(i)
                while len(skips) <= k:
                    skip, ctrl = control_block(self.control_layers[len(skips)], ctrl, stream, seq_mask, freqs, adaln)
                    skips.append(skip)
                seq = seq + skips[k] * scale
                skips[k] = None  # consumed: let the runtime free it
        seq = self.final_layer(seq, c=adaln)

        out = seq[:, :n_img].reshape(batch, ht, wt, p, p, channels)
        out = out.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height, width)
        return out.float()
