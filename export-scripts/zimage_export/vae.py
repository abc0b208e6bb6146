"""Export wrappers for the two halves of diffusers' AutoencoderKL.

The runtime does the latent scaling (z / scaling_factor + shift_factor) and the image
post-processing itself, so the graphs are the bare networks: decoder(post_quant_conv(z)) and
encoder -> quant_conv -> (mean, clamped logvar), exactly what DiagonalGaussianDistribution
holds before sampling. Tiling and slicing are off (they are memory options, not the math).
"""

import torch
from torch import nn


class VaeDecoderExport(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder
        self.dtype = next(vae.parameters()).dtype

    def forward(self, latents):
        z = latents.to(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).float()


class VaeEncoderExport(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.quant_conv = vae.quant_conv
        self.encoder = vae.encoder
        self.dtype = next(vae.parameters()).dtype

    def forward(self, image):
        moments = self.encoder(image.to(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        # Same clamp as diffusers' DiagonalGaussianDistribution.
        return mean.float(), torch.clamp(logvar, -30.0, 20.0).float()
