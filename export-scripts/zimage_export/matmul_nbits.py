"""`MatMulNBits` weights (ONNX Runtime's com.microsoft op: the weight-only int8 / int4 packages)
as integer codes and back, and their GPTQ rounding (`--method gptq` without `--activations`;
docs/quantization.md, "GPTQ").

The layout, for a `[K, N]` weight in blocks of `block_size` input rows (`k_blocks` per column):
- `B`: uint8 `[N, k_blocks, block_size * bits / 8]`; 4-bit codes two to a byte, the even row in
  the low nibble. Rows past K (K not a multiple of the block) hold the code of zero.
- `scales`: `[N, k_blocks]`, the weight's float type.
- `zero_points`: uint8 `[N, ceil(k_blocks * bits / 8)]`, packed as `B`'s codes.
A weight is `(code - zero_point) * scale` of its column and block.

ONNX Runtime writes these itself (MatMulNBitsQuantizer, round to nearest). GPTQ keeps its scales
and zero points and chooses other codes, so a GPTQ package has the same format, size and speed.
"""

import numpy as np

from .gptq import DEFAULT_DAMPING, Grid, gptq_round


def _per_byte(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits codes here are 4 or 8 bits, not {bits}")
    return 8 // bits


def block_quantize(w: np.ndarray, bits: int, block_size: int):
    """ONNX Runtime's round-to-nearest block quantization of `w` (`[K, N]`, asymmetric): the
    function its MatMulNBitsQuantizer writes each weight with, so exactly its bytes:
    `(B, scales, zero_points)`."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    _per_byte(bits)
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=bits)
    return DefaultWeightOnlyQuantizer(config).qbits_block_quant(np.ascontiguousarray(w))


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Codes packed `8 // bits` to a byte along the last axis, low bits first, unpacked."""
    per_byte = _per_byte(bits)
    if per_byte == 1:
        return packed.astype(np.int64)
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1).astype(np.int64)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `unpack` (the last axis a multiple of `8 // bits`)."""
    per_byte = _per_byte(bits)
    codes = np.asarray(codes)
    if codes.min(initial=0) < 0 or codes.max(initial=0) >= 1 << bits:
        raise ValueError(f"codes outside 0..{(1 << bits) - 1}")
    codes = codes.astype(np.uint8)
    if per_byte == 1:
        return codes
    parts = codes.reshape(*codes.shape[:-1], -1, per_byte)
    out = np.zeros(parts.shape[:-1], np.uint8)
    for i in range(per_byte):
        out |= parts[..., i] << (bits * i)
    return out


def weight_codes(b: np.ndarray, bits: int, k: int) -> np.ndarray:
    """`B`'s codes as a `[K, N]` array, rows as the float weight's."""
    return unpack(b, bits).reshape(b.shape[0], -1)[:, :k].T


def with_codes(b: np.ndarray, bits: int, codes: np.ndarray) -> np.ndarray:
    """`B` with its first K rows' codes replaced by `codes` (`[K, N]`); padding rows kept."""
    n, k_blocks = b.shape[:2]
    full = unpack(b, bits).reshape(n, -1)
    k = codes.shape[0]
    if codes.shape != (k, n) or k > full.shape[1]:
        raise ValueError(f"codes {codes.shape} do not fit B {b.shape}")
    full[:, :k] = codes.T
    return pack(full.reshape(n, k_blocks, -1), bits)


def grid(scales: np.ndarray, zero_points: np.ndarray, bits: int, block_size: int) -> Grid:
    """The values `B`'s codes stand for, from its scales and packed zero points."""
    n = scales.shape[0]
    scales = np.asarray(scales, np.float64).reshape(n, -1)
    k_blocks = scales.shape[1]
    zero = unpack(np.asarray(zero_points).reshape(n, -1), bits)[:, :k_blocks]
    return Grid(scales.T.copy(), zero.T.astype(np.float64), 0, (1 << bits) - 1, block_size)


def gptq_matmul_nbits(w: np.ndarray, h: np.ndarray, bits: int, block_size: int, damping: float = DEFAULT_DAMPING):
    """GPTQ codes of `w` (`[K, N]`) in MatMulNBits' format with ONNX Runtime's own scales and
    zero points, under calibration second moments `h`. Returns `((B, scales, zero_points),
    gptq_error, rtn_error)`; B is ONNX Runtime's round to nearest where GPTQ is no better."""
    w = np.asarray(w)
    b, scales, zero_points = block_quantize(w, bits, block_size)
    rtn = weight_codes(b, bits, w.shape[0])
    q, err, rtn_err = gptq_round(w, h, grid(scales, zero_points, bits, block_size), rtn, damping)
    if err < rtn_err:
        b = with_codes(b, bits, q.astype(np.int64))
    return (b, scales, zero_points), err, rtn_err
