"""Reading back the quantized tied embedding table (numpy only): the MatMulNBits layout the
SDK's package holds, [vocab, blocks, block bytes] with two 4-bit values a byte, low nibble
first, and zero points packed the same way along the blocks."""

import numpy as np

from zimage_export.quantize_lm_head import dequantize_table


def test_4bit_rows_read_low_nibble_first():
    # One row, hidden 6, blocks of 4: values q = 0..7, zero points 1 and 2, scales 0.5 and 2.
    q = np.arange(8, dtype=np.uint8).reshape(1, 2, 4)
    packed = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)  # [1, 2, 2]
    zero_points = np.array([[1 | (2 << 4)]], np.uint8)  # two blocks in one byte
    scales = np.array([[0.5, 2.0]], np.float32)
    rows = dequantize_table(packed, scales, zero_points, bits=4, block_size=4, hidden=6)
    assert rows.shape == (1, 6)
    np.testing.assert_array_equal(rows[0], [-0.5, 0.0, 0.5, 1.0, 4.0, 6.0])


def test_8bit_rows():
    packed = np.array([[[10, 20], [30, 40]]], np.uint8)
    zero_points = np.array([[10, 40]], np.uint8)
    scales = np.array([[0.25, 1.0]], np.float32)
    rows = dequantize_table(packed, scales, zero_points, bits=8, block_size=2, hidden=3)
    np.testing.assert_array_equal(rows[0], [0.0, 2.5, -10.0])
