"""3x3 convolutions computed as Winograd F(4x4, 3x3), for the CPU variant of the VAE decoder.

On the CPU both ONNX Runtime and PyTorch run the VAE decoder's convolutions at the machine's
multiply-add peak, so the decoder only gets faster with fewer multiply-adds. Winograd's minimal
filtering algorithm computes each 4x4 output tile from a 6x6 input tile with 36 products per
channel pair instead of 144: the 3x3 convolution becomes 36 independent matrix products
(one per transformed tile element) between cheap linear transforms of the input and output
tiles (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015).

The transforms cost memory traffic proportional to the channels, the products save arithmetic
proportional to channels squared, so only wide convolutions gain: on 2 cores of the project's
machine, 512 channels at 128x128 go from 377 to 206 ms, 256 channels at 256x256 from 412 to
331 ms, while 128 channels at 512x512 lose (479 -> 571 ms). Hence a threshold on the channels
(`min_channels`, by default `winograd_math.DEFAULT_MIN_CHANNELS`).

The 3x3 kernels stay in the package as they are (only reordered, tap-major): the transformed
kernels would be 4x larger, so the graph computes them when it runs (one small product per
layer, scheduled next to the layer; see `forward`).

The price is memory: the transformed input and the 36 products are 2.25x the size of the
layer's input and output, so the decoder's activations peak higher (mid-size model at
512x512: +0.2 to +0.5 GB of process peak RSS). That is why the runtime uses this graph only when
asked (`LoadOptions::winograd_vae`).

The results differ from a direct convolution by float rounding only; F(4x4, 3x3)'s transforms
amplify it (about 2e-5 absolute on the mid-size decoder's [-1, 1] image, against 5e-7 for
a direct convolution), which is well inside one 8-bit level.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .winograd_math import A_T, B_T, G, qualifies, two_d


def transform(matrix) -> torch.Tensor:
    """two_d(matrix) as a float64 tensor."""
    return torch.tensor(two_d(matrix), dtype=torch.float64)


class WinogradConv3x3(nn.Module):
    """An `nn.Conv2d` with a 3x3 kernel, stride 1, padding 1, as F(4x4, 3x3)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not is_winograd_candidate(conv, 1):
            raise ValueError(f"not a plain 3x3 convolution: {conv}")
        out_channels, in_channels = conv.out_channels, conv.in_channels
        dtype = conv.weight.dtype
        frozen = lambda t: nn.Parameter(t.to(dtype).contiguous(), requires_grad=False)  # noqa: E731
        # Tap-major [9, out * in]: one product with kernel_transform [36, 9] gives the
        # transformed kernels already laid out as the 36 matrices [out, in] the products need.
        self.taps = frozen(conv.weight.detach().permute(2, 3, 0, 1).reshape(9, out_channels * in_channels))
        self.kernel_transform = frozen(transform(G))
        self.input_transform = frozen(transform(B_T).reshape(36, 1, 6, 6))
        self.output_transform = frozen(transform(A_T))
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(out_channels)
        self.bias = frozen(bias.reshape(1, -1, 1, 1))
        self.out_channels = out_channels

    def forward(self, x):
        n, c, h, w = x.shape
        o = self.out_channels
        rows, cols = (h + 3) // 4, (w + 3) // 4
        # Tile (i, j) covers output rows 4i..4i+3 and reads padded rows 4i..4i+5; the bottom and
        # right are padded up to whole tiles and the extra outputs cropped.
        padded = F.pad(x, (1, 4 * cols - w + 1, 1, 4 * rows - h + 1))
        # The input transform as a stride-4 convolution of every channel on its own (channels
        # folded into the batch): [n * c, 36, rows, cols].
        tiles = F.conv2d(padded.reshape(n * c, 1, 4 * rows + 2, 4 * cols + 2), self.input_transform, stride=4)
        tiles = tiles.reshape(n, c, 36, rows * cols).transpose(1, 2)  # [n, 36, c, tiles]
        # The transformed kernels are computed per run (stored, they would be 4x the weights).
        # Reading the input (not its value: where() picks the same matrix either way) keeps the
        # product out of reach of constant folding and makes the runtime compute it here,
        # instead of at the start of the graph where every layer's kernels would be held at once.
        anchor = torch.isnan(x[:1, :1, :1, :1]).reshape(())
        kernel_transform = torch.where(anchor, self.kernel_transform, self.kernel_transform)
        kernels = torch.matmul(kernel_transform, self.taps).reshape(36, o, c)
        products = torch.matmul(kernels, tiles)  # [n, 36, o, tiles]
        out = torch.matmul(self.output_transform, products.reshape(n, 36, o * rows * cols))  # [n, 16, ...]
        out = out.reshape(n, 4, 4, o, rows, cols).permute(0, 3, 4, 1, 5, 2).reshape(n, o, 4 * rows, 4 * cols)
        return out[:, :, :h, :w] + self.bias


def is_winograd_candidate(module: nn.Module, min_channels: int) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.weight.dtype == torch.float32  # the transforms' rounding is too large for fp16
        and qualifies(module, min_channels)
    )


def with_winograd_convs(module: nn.Module, min_channels: int) -> int:
    """Replaces every qualifying 3x3 convolution inside `module`; returns how many."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if is_winograd_candidate(child, min_channels):
                setattr(parent, name, WinogradConv3x3(child))
                replaced += 1
    return replaced
