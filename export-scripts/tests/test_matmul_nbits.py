"""MatMulNBits' code layout and GPTQ on its blocks (numpy only: ONNX Runtime's own quantizer,
`matmul_nbits.block_quantize`, is checked against its MatMulNBits kernel by the Rust tests of
models/tiny-zimage-int4-gptq; here the grid is built the same way by hand)."""

import numpy as np
import pytest

from zimage_export.gptq import gptq_round, weighted_error
from zimage_export.matmul_nbits import grid, pack, unpack, weight_codes, with_codes


def asymmetric_blocks(w, bits, block_size):
    """Scales and packed zero points as ONNX Runtime computes them (min and max with 0 in each
    block of each column), in MatMulNBits' layout, and the round-to-nearest B."""
    k, n = w.shape
    k_blocks = -(-k // block_size)
    padded = np.pad(w, ((0, k_blocks * block_size - k), (0, 0))).astype(np.float64)
    blocks = padded.T.reshape(n, k_blocks, block_size)
    low, high = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    top = (1 << bits) - 1
    scales = ((high - low) / top).astype(np.float32)
    zero = np.clip(np.round(-low / np.where(scales == 0, 1, scales)), 0, top).astype(np.int64)
    per_byte = 8 // bits
    zero = np.pad(zero, ((0, 0), (0, -(-k_blocks // per_byte) * per_byte - k_blocks)))
    zero_points = pack(zero, bits)
    g = grid(scales, zero_points, bits, block_size)
    codes = g.round(padded, np.repeat(g.scale, block_size, axis=0), np.repeat(g.zero, block_size, axis=0))
    codes = codes.astype(np.int64)
    b = pack(codes.T.reshape(n, k_blocks, block_size), bits)
    return b, scales, zero_points


@pytest.mark.parametrize("bits", [4, 8])
def test_codes_pack_and_unpack(bits):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 1 << bits, (5, 3, 32))
    packed = pack(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (5, 3, 32 * bits // 8)
    np.testing.assert_array_equal(unpack(packed, bits), codes)
    if bits == 4:  # the even row in the low nibble
        assert packed[0, 0, 0] == codes[0, 0, 0] | (codes[0, 0, 1] << 4)
    with pytest.raises(ValueError, match="codes outside"):
        pack(np.full((1, 2), 1 << bits), bits)
    with pytest.raises(ValueError, match="4 or 8 bits"):
        pack(codes, 3)


@pytest.mark.parametrize("bits,k", [(4, 96), (4, 100), (8, 70)])
def test_a_weights_codes_are_replaced_and_padding_kept(bits, k):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((k, 6)).astype(np.float32)
    b, scales, zero_points = asymmetric_blocks(w, bits, 32)
    g = grid(scales, zero_points, bits, 32)
    codes = weight_codes(b, bits, k)
    assert codes.shape == (k, 6)
    top = (1 << bits) - 1
    assert np.abs(g.dequantize(codes) - w).max() <= 0.5 * scales.max() * (1 + 1e-6)
    new = rng.integers(0, top + 1, (k, 6))
    b2 = with_codes(b, bits, new)
    np.testing.assert_array_equal(weight_codes(b2, bits, k), new)
    full, full2 = unpack(b, bits).reshape(6, -1), unpack(b2, bits).reshape(6, -1)
    np.testing.assert_array_equal(full[:, k:], full2[:, k:])  # rows past K: the code of zero
    with pytest.raises(ValueError, match="do not fit"):
        with_codes(b, bits, new[:, :5])


def test_gptq_on_int4_blocks_cuts_the_error():
    rng = np.random.default_rng(2)
    k, n = 256, 64
    w = rng.standard_normal((k, n)) * 0.05
    basis = rng.standard_normal((24, k))
    x = rng.standard_normal((2048, 24)) @ basis + 0.01 * rng.standard_normal((2048, k))
    held_out = rng.standard_normal((512, 24)) @ basis + 0.01 * rng.standard_normal((512, k))
    b, scales, zero_points = asymmetric_blocks(w.astype(np.float32), 4, 32)
    g = grid(scales, zero_points, 4, 32)
    rtn = weight_codes(b, 4, k)
    q, err, rtn_err = gptq_round(w, x.T @ x, g, rtn)
    assert q.min() >= 0 and q.max() <= 15 and np.array_equal(q, np.round(q))
    assert np.isclose(rtn_err, weighted_error(w, g.dequantize(rtn), x.T @ x))
    assert err < 0.5 * rtn_err, (err, rtn_err)
    y = held_out @ w
    gptq_held_out = np.linalg.norm(held_out @ g.dequantize(q) - y) / np.linalg.norm(y)
    rtn_held_out = np.linalg.norm(held_out @ g.dequantize(rtn) - y) / np.linalg.norm(y)
    assert gptq_held_out < 0.7 * rtn_held_out, (gptq_held_out, rtn_held_out)


def test_a_block_of_zeros_keeps_its_zero_point():
    # ONNX Runtime gives a block of zeros scale 0: GPTQ cannot move it, and does not divide by it.
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 4)) * 0.1
    w[:32, 1] = 0.0
    b, scales, zero_points = asymmetric_blocks(w.astype(np.float32), 4, 32)
    assert scales[1, 0] == 0
    g = grid(scales, zero_points, 4, 32)
    x = rng.standard_normal((256, 64))
    with np.errstate(all="raise"):
        q, err, rtn_err = gptq_round(w, x.T @ x, g, weight_codes(b, 4, 64))
    assert np.isfinite(err) and err <= rtn_err
    np.testing.assert_array_equal(q[:32, 1], g.zero[0, 1])
    np.testing.assert_array_equal(g.dequantize(q)[:32, 1], 0.0)
