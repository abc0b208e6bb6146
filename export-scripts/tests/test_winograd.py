"""Winograd F(4x4, 3x3) (zimage_export/winograd_math.py) against direct convolution, in numpy,
with the matrices laid out as winograd.py's layers use them."""

from dataclasses import dataclass

import numpy as np
import pytest

from zimage_export import winograd_math
from zimage_export.winograd_math import A_T, B_T, DEFAULT_MIN_CHANNELS, G, qualifies


def two_d(matrix) -> np.ndarray:
    return np.array(winograd_math.two_d(matrix), dtype=np.float64)


def correlate(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Direct 'valid' 2-D correlation (what a convolution layer computes), in float64."""
    kh, kw = kernel.shape
    h, w = image.shape[0] - kh + 1, image.shape[1] - kw + 1
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            out[i, j] = np.sum(image[i:i + kh, j:j + kw].astype(np.float64) * kernel)
    return out


@pytest.mark.parametrize("matrix, tile", [(B_T, 6), (G, 3), (A_T, 6)])
def test_two_d_is_the_transform_of_a_flattened_tile(matrix, tile):
    m = np.array(matrix, dtype=np.float64)
    x = np.random.default_rng(1).standard_normal((tile, tile))
    assert two_d(matrix).shape == (m.shape[0] ** 2, tile * tile)
    np.testing.assert_allclose(two_d(matrix) @ x.ravel(), (m @ x @ m.T).ravel(), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(two_d(matrix), np.kron(m, m))


@pytest.mark.parametrize("seed", range(5))
def test_one_tile_equals_direct_correlation(seed):
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((6, 6)).astype(np.float32)
    g = rng.standard_normal((3, 3)).astype(np.float32)
    want = correlate(d, g)
    # 2-D form, float64: exact up to rounding.
    bt, gm, at = (np.array(m, dtype=np.float64) for m in (B_T, G, A_T))
    got = at @ ((gm @ g @ gm.T) * (bt @ d @ bt.T)) @ at.T
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # Flattened, with float32 matrices and arithmetic as in the exported float32 graph.
    kernel_t, input_t, output_t = (two_d(m).astype(np.float32) for m in (G, B_T, A_T))
    flat = output_t @ ((kernel_t @ g.ravel()) * (input_t @ d.ravel()))
    assert flat.dtype == np.float32
    np.testing.assert_allclose(flat.reshape(4, 4), want, rtol=0, atol=1e-5)


def test_channels_sum_like_a_convolution_layer():
    """The layout of WinogradConv3x3.forward: tap-major kernels [9, out * in], one [out, in]
    product per transformed tile element, output elements (i, j) at row 4 * i + j."""
    rng = np.random.default_rng(7)
    out_ch, in_ch = 3, 5
    x = rng.standard_normal((in_ch, 6, 6))
    w = rng.standard_normal((out_ch, in_ch, 3, 3))
    taps = w.transpose(2, 3, 0, 1).reshape(9, out_ch * in_ch)
    kernels = (two_d(G) @ taps).reshape(36, out_ch, in_ch)
    tiles = (two_d(B_T) @ x.reshape(in_ch, 36).T)  # [36, in]
    products = np.einsum("koc,kc->ko", kernels, tiles)  # [36, out]
    got = (two_d(A_T) @ products).reshape(4, 4, out_ch).transpose(2, 0, 1)
    want = np.stack([sum(correlate(x[c], w[o, c]) for c in range(in_ch)) for o in range(out_ch)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


@dataclass
class Conv:
    """nn.Conv2d's attributes, as qualifies() reads them."""

    in_channels: int
    out_channels: int
    kernel_size: tuple = (3, 3)
    padding: tuple = (1, 1)
    stride: tuple = (1, 1)
    dilation: tuple = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"


def test_threshold_picks_the_wide_layers():
    # The convolutions of a VAE decoder with block_out_channels [128, 256, 512, 512] (the
    # real model's), widest first, plus its 1x1 shortcut and its 3-channel output conv.
    layers = {
        "conv_in": Conv(16, 512),
        "mid.conv": Conv(512, 512),
        "up0.conv": Conv(512, 512),
        "up2.conv1": Conv(512, 256),
        "up2.conv2": Conv(256, 256),
        "up2.shortcut": Conv(512, 256, kernel_size=(1, 1), padding=(0, 0)),
        "up3.conv1": Conv(256, 128),
        "up3.conv2": Conv(128, 128),
        "conv_out": Conv(128, 3),
    }
    picked = lambda n: [name for name, conv in layers.items() if qualifies(conv, n)]  # noqa: E731
    assert picked(DEFAULT_MIN_CHANNELS) == ["mid.conv", "up0.conv", "up2.conv1", "up2.conv2"]
    assert picked(512) == ["mid.conv", "up0.conv"]
    assert picked(8) == ["conv_in", "mid.conv", "up0.conv", "up2.conv1", "up2.conv2", "up3.conv1", "up3.conv2"]


@pytest.mark.parametrize("change", [
    {"kernel_size": (1, 1)},
    {"kernel_size": (3, 1)},
    {"padding": (0, 0)},
    {"stride": (2, 2)},
    {"dilation": (2, 2)},
    {"groups": 2},
    {"padding_mode": "reflect"},
])
def test_only_plain_3x3_convolutions_qualify(change):
    assert qualifies(Conv(512, 512), 8)
    assert not qualifies(Conv(512, 512, **change), 8)
