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


def gptq_per_channel(w: np.ndarray, h: np.ndarray, damping: float = DEFAULT_DAMPING):
    """GPTQ codes of weight `w` (`[K, N]`) under calibration second moments `h` (`[K, K]`).

    Returns `(q, scale, gptq_error, rtn_error)`: int8 codes and RTN's float32 scales (`w ~= q *
    scale`), and the weighted errors (`weighted_error`, undamped H) of the result and of RTN.
    The result is RTN's codes where GPTQ's would not have been better on the calibration data
    (it is, for a positive-definite H; the check costs one product)."""
    w = np.asarray(w)
    h = np.asarray(h, np.float64)
    k, n = w.shape
    if h.shape != (k, k):
        raise ValueError(f"H is {h.shape}, the weight {w.shape}: want [{k}, {k}]")
    if not (np.isfinite(w).all() and np.isfinite(h).all()):
        raise ValueError("GPTQ needs finite weights and calibration statistics")
    if damping <= 0:
        raise ValueError(f"damping must be positive, not {damping}")
    rtn, scale = quantize_weight_per_channel(w)
    rtn_error = weighted_error(w, rtn * scale.astype(np.float64), h)

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
        return rtn, scale, rtn_error, rtn_error

    work = w.astype(np.float64)
    s = scale.astype(np.float64)
    q = np.zeros((k, n), np.float64)
    for start in range(0, k, BLOCK_ROWS):
        end = min(start + BLOCK_ROWS, k)
        block = work[start:end].copy()
        errors = np.zeros_like(block)
        for i in range(end - start):
            row = start + i
            q[row] = np.clip(np.round(block[i] / s), -WEIGHT_STEPS, WEIGHT_STEPS)
            err = (block[i] - q[row] * s) / u[row, row]
            block[i:] -= np.outer(u[row, row:end], err)
            errors[i] = err
        work[end:] -= u[start:end, end:].T @ errors
    q = q.astype(np.int8)
    gptq_error = weighted_error(w, q * s, h)
    if not gptq_error < rtn_error:
        return rtn, scale, rtn_error, rtn_error
    return q, scale, gptq_error, rtn_error
