"""Export wrappers for the two halves of diffusers' AutoencoderKL.

The runtime does the latent scaling (z / scaling_factor + shift_factor) and the image
post-processing itself, so the graphs are the bare networks: decoder(post_quant_conv(z)) and
encoder -> quant_conv -> (mean, clamped logvar), exactly what DiagonalGaussianDistribution
holds before sampling. Tiling and slicing are off (they are memory options, not the math).

The decoder's upsamplers (nearest 2x, then a 3x3 convolution) are exported as the same
arithmetic done at the input resolution (`NearestUpsampleConv`): the largest convolutions of
the decoder cost 2.25x fewer multiply-adds (16 instead of 36 per input pixel and channel pair)
and the 4x upsampled copy of their input is never made; on the mid-size model this cuts the
VAE decode at 512x512 from 14.0 to 12.0 s on 2 cores. The results equal diffusers' up to float
rounding (max 4e-6 on the mid-size decoder; the parity goldens decide).
"""

import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D
from torch import nn

from .winograd import with_winograd_convs

# Output phase 0 of a nearest 2x upsampling followed by a 3x3 convolution (padding 1) reads
# input offsets -1 and 0: the first takes kernel tap 0, the second taps 1 and 2. Phase 1 reads
# offsets 0 and +1: taps 0 and 1, then tap 2. Rows and columns alike.
PHASE_TAPS = ([[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]])


class NearestUpsampleConv(nn.Module):
    """`Upsample2D` (nearest 2x, then conv 3x3 with padding 1) as four 2x2 convolutions of the
    input, one per output phase (p, q), interleaved by a pixel shuffle."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        weight = conv.weight.detach().double()
        taps = [torch.tensor(t, dtype=torch.float64) for t in PHASE_TAPS]
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
        frozen = lambda t: nn.Parameter(t.to(conv.weight.dtype).contiguous(), requires_grad=False)  # noqa: E731
        # Phase order (0, 0), (0, 1), (1, 0), (1, 1): output channel c of phase (p, q) must be
        # channel 4 c + 2 p + q of the pixel shuffle's input.
        self.weights = nn.ParameterList(
            frozen(torch.einsum("ak,oikl,bl->oiab", taps[p], weight, taps[q])) for p in (0, 1) for q in (0, 1)
        )
        self.bias = frozen(bias)

    def forward(self, x, output_size=None):
        if output_size is not None and tuple(output_size) != (2 * x.shape[-2], 2 * x.shape[-1]):
            raise ValueError(f"NearestUpsampleConv only doubles the size, not {tuple(x.shape[-2:])} -> {output_size}")
        # Phase (p, q) reads one pixel beyond the input on the top or bottom (p = 0 or 1) and on
        # the left or right (q = 0 or 1): that side is zero-padded, like the upsampled image.
        phases = [
            F.conv2d(F.pad(x, (1 - q, q, 1 - p, p)), self.weights[2 * p + q], self.bias)
            for p in (0, 1) for q in (0, 1)
        ]
        return F.pixel_shuffle(torch.stack(phases, dim=2).flatten(1, 2), 2)


def is_plain_nearest_upsample_conv(module: nn.Module) -> bool:
    if not isinstance(module, Upsample2D) or module.use_conv_transpose or not module.use_conv:
        return False
    conv = module.conv if module.name == "conv" else module.Conv2d_0
    return (module.interpolate and module.norm is None and isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def with_fast_upsamplers(decoder: nn.Module) -> nn.Module:
    for block in getattr(decoder, "up_blocks", []):
        upsamplers = getattr(block, "upsamplers", None) or []
        for i, upsampler in enumerate(upsamplers):
            if is_plain_nearest_upsample_conv(upsampler):
                conv = upsampler.conv if upsampler.name == "conv" else upsampler.Conv2d_0
                upsamplers[i] = NearestUpsampleConv(conv)
    return decoder


class VaeDecoderExport(nn.Module):
    """`winograd_min_channels`: compute the 3x3 convolutions at least this wide with Winograd
    F(4x4, 3x3) (winograd.py; the CPU variant of the decoder), or none when None."""

    def __init__(self, vae: nn.Module, winograd_min_channels: int | None = None):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = with_fast_upsamplers(vae.decoder)
        self.winograd_convs = 0
        if winograd_min_channels is not None:
            self.winograd_convs = with_winograd_convs(self.decoder, winograd_min_channels)
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
