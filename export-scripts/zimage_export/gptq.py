"""GPTQ rounding of a `[K, N]` weight to symmetric int8 per output column (`--method gptq` with
`--activations int8|int8x2`; docs/quantization.md, "GPTQ").

Round to nearest (RTN) rounds each weight on its own, so a product's error is `X (W - Q)` with
independent roundings. GPTQ (Frantar et al., 2022) rounds the input rows of `W` one after another
and carries each row's rounding error into the rows not yet rounded, weighted so as to minimise
`|| X W - X Q ||^2` over calibration activations `X`, which it needs only through
`H = X^T X` (`[K, K]`). Where a product's inputs are correlated or live in a small subspace (the
noise refiner's first layer reads the patch embedding of 64 latent values: rank ~65 of 1024) the
error can be steered into directions the activations never take.

The scales are RTN's (max |column| / 127), so a GPTQ weight has the same format, size and speed
as an RTN one; only the codes differ. Measured per product on the mid-size model (held-out
prompts and noise): 0.2-0.8x RTN's error (docs/quantization.md).
"""

from dataclasses import dataclass

import numpy as np

from .quantize_w8a8 import WEIGHT_STEPS, quantize_weight_per_channel

# Added to H's diagonal, as a fraction of its mean: keeps H invertible where the calibration
# activations do not span every input direction, and limits how far errors are carried on the
# calibration's evidence alone (0.1 was slightly better than 0.01 on held-out activations).
DEFAULT_DAMPING = 0.1
# Rows rounded and corrected together before the rest of the weight is updated (speed only).
BLOCK_ROWS = 128


def weighted_error(w: np.ndarray, dequantized: np.ndarray, h: np.ndarray) -> float:
    """`sum over calibration rows x of || x (W - Q) ||^2` = trace(D^T H D), D = W - Q."""
    d = np.asarray(w, np.float64) - dequantized
    return float(np.einsum("kn,kn->", h @ d, d))


@dataclass
class Grid:
    """The values a quantized weight can take: row `k` (an input) of column `n` is
    `(q - zero[g, n]) * scale[g, n]` for an integer code `low <= q <= high`, with
    `g = k // group_rows` (per-channel int8: one group of every row; MatMulNBits: blocks)."""

    scale: np.ndarray  # [groups, N]
    zero: np.ndarray  # [groups, N]
    low: int
    high: int
    group_rows: int

    def row(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        g = k // self.group_rows
        return self.scale[g], self.zero[g]

    def _expand(self, a: np.ndarray, rows: int) -> np.ndarray:
        return np.repeat(np.asarray(a, np.float64), self.group_rows, axis=0)[:rows]

    def round(self, values: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
        """Nearest codes of `values` on the grid `scale`, `zero` (broadcast). A zero scale (a
        block of zeros) takes its zero point: it can hold nothing else."""
        safe = np.where(scale == 0, 1.0, scale)
        q = np.where(scale == 0, zero, np.round(values / safe + zero))
        return np.clip(q, self.low, self.high)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        k = q.shape[0]
        return (q - self._expand(self.zero, k)) * self._expand(self.scale, k)


def _checked(w, h, damping: float):
    w = np.asarray(w)
    h = np.asarray(h, np.float64)
    if w.ndim != 2:
        raise ValueError(f"the weight must be [K, N], not {w.shape}")
    k = w.shape[0]
    if h.shape != (k, k):
        raise ValueError(f"H is {h.shape}, the weight {w.shape}: want [{k}, {k}]")
    if not (np.isfinite(w).all() and np.isfinite(h).all()):
        raise ValueError("GPTQ needs finite weights and calibration statistics")
    if damping <= 0:
        raise ValueError(f"damping must be positive, not {damping}")
    return w, h


def gptq_round(w: np.ndarray, h: np.ndarray, grid: Grid, rtn: np.ndarray, damping: float = DEFAULT_DAMPING):
    """GPTQ codes of weight `w` (`[K, N]`) on `grid` under calibration second moments `h`
    (`[K, K]`); `rtn` are the round-to-nearest codes the result is compared with.

    Returns `(q, gptq_error, rtn_error)`: float64 codes and the weighted errors
    (`weighted_error`, undamped H) of the result and of `rtn`. The result is `rtn` where GPTQ's
    codes would not have been better on the calibration data (they are, for a positive-definite
    H; the check costs one product)."""
    w, h = _checked(w, h, damping)
    k, n = w.shape
    rtn = np.asarray(rtn, np.float64)
    rtn_error = weighted_error(w, grid.dequantize(rtn), h)

    hd = h.copy()
    diag = np.diagonal(hd).copy()
    # An input the calibration never saw has no evidence: it is rounded to nearest, on its own.
    dead = diag <= 0
    hd[dead, :] = 0
    hd[:, dead] = 0
    diag[dead] = 0
    mean = diag[~dead].mean() if (~dead).any() else 1.0
    hd[np.diag_indices(k)] = diag + damping * mean
    hd[dead, dead] = mean
    # The upper Cholesky factor of H^-1 gives each row's error-carrying coefficients in order.
    try:
        u = np.linalg.cholesky(np.linalg.inv(hd)).T
    except np.linalg.LinAlgError:  # (not positive-definite after damping: keep RTN)
        return rtn, rtn_error, rtn_error

    work = w.astype(np.float64)
    q = np.zeros((k, n), np.float64)
    for start in range(0, k, BLOCK_ROWS):
        end = min(start + BLOCK_ROWS, k)
        block = work[start:end].copy()
        errors = np.zeros_like(block)
        for i in range(end - start):
            row = start + i
            s, z = grid.row(row)
            q[row] = grid.round(block[i], s, z)
            err = (block[i] - (q[row] - z) * s) / u[row, row]
            block[i:] -= np.outer(u[row, row:end], err)
            errors[i] = err
        work[end:] -= u[start:end, end:].T @ errors
    gptq_error = weighted_error(w, grid.dequantize(q), h)
    if not gptq_error < rtn_error:
        return rtn, rtn_error, rtn_error
    return q, gptq_error, rtn_error


def gptq_per_channel(w: np.ndarray, h: np.ndarray, damping: float = DEFAULT_DAMPING):
    """GPTQ codes of weight `w` (`[K, N]`) as symmetric int8 per output column (the int8
    activation packages' format), under calibration second moments `h` (`[K, K]`).

    Returns `(q, scale, gptq_error, rtn_error)`: int8 codes and RTN's float32 scales (`w ~= q *
    scale`), and the weighted errors of the result and of RTN (see gptq_round)."""
    w, h = _checked(w, h, damping)
    rtn, scale = quantize_weight_per_channel(w)
    grid = Grid(scale[None].astype(np.float64), np.zeros((1, w.shape[1])), -int(WEIGHT_STEPS), int(WEIGHT_STEPS),
                max(w.shape[0], 1))
    q, err, rtn_err = gptq_round(w, h, grid, rtn, damping)
    return q.astype(np.int8), scale, err, rtn_err
