"""Edge maps of toy scenes, made as the SDK makes a control map (`zimage::control_preprocess`,
`--control-preprocess canny`), for the toy ControlNet (train_toy_controlnet.py).

The map is the Canny edge map of the scene's shape OUTLINE: the shape drawn white on black
(`silhouette`), not the coloured picture. Red, blue and purple have nearly the same luma (70,
65, 74), so Canny of a red circle on a blue background finds no edge at all; the outline gives
every scene its edges whatever its colours, and carries no colour the ControlNet could copy.
For a picture with contrast (a yellow square on black) the edges of the picture and of its
outline are the same pixels.

`canny` is imageproc 0.26.2's `edges::canny` (what the SDK calls) step for step, in the same
float32 arithmetic, with exp/atan2/hypot taken from the C library Rust's std calls, so the maps
are bit-identical to the SDK's (checked against the SDK by sdk/tests/semantic_toy_controlnet.rs
on committed maps). `silhouette` uses integer geometry only, so the Rust test draws the same
pixels.
"""

import ctypes
import ctypes.util
import itertools
import math

import numpy as np

from .scenes import IMAGE_SIZE, POSITIONS, SHAPES, SIZES

_LIBM = ctypes.CDLL(ctypes.util.find_library("m"))
for _name, _args in (("expf", 1), ("atan2f", 2), ("hypotf", 2)):
    getattr(_LIBM, _name).restype = ctypes.c_float
    getattr(_LIBM, _name).argtypes = [ctypes.c_float] * _args

SUPERSAMPLE = 4  # samples per pixel side: edges of a silhouette are grey where a pixel is partly covered


def silhouette(shape: str, position: str, size: str, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """The shape of a toy scene white (255) on black, [H, W] uint8, anti-aliased by 4x4
    supersampling with integer geometry (coordinates in 1/8 pixel: sample (2i + 1) / 8), the
    same geometry as scenes.render. A pixel's value is round(255 * covered samples / 16)."""
    (cx, cy), _ = POSITIONS[position]
    r = SIZES[size][0]
    scale = image_size / IMAGE_SIZE  # positions and sizes are given for 64x64
    n = image_size * SUPERSAMPLE
    u = 2 * np.arange(n, dtype=np.int64) + 1  # sample coordinates, 1/8 pixel units
    x8, y8, r8 = round(8 * cx * scale), round(8 * cy * scale), round(8 * r * scale)
    xs, ys = np.meshgrid(u, u)
    dx, dy = xs - x8, ys - y8
    if shape == "circle":
        inside = dx * dx + dy * dy <= r8 * r8
    elif shape == "square":
        inside = (np.abs(dx) <= r8) & (np.abs(dy) <= r8)
    elif shape == "triangle":  # pointing up, in the box of half extent r
        below_top = ys - (y8 - r8)
        inside = (below_top >= 0) & (dy <= r8) & (2 * np.abs(dx) <= below_top)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    count = inside.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE).sum(axis=(1, 3))
    return ((255 * count + 8) // 16).astype(np.uint8)


def luma(rgb: np.ndarray) -> np.ndarray:
    """The image crate's RGB -> luma (what `to_luma8` does): (2126 R + 7152 G + 722 B) / 10000,
    truncated. [H, W, 3] uint8 -> [H, W] uint8."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((2126 * r + 7152 * g + 722 * b) // 10000).astype(np.uint8)


def _gaussian_kernel(sigma: float) -> np.ndarray:
    f = np.float32
    sigma = f(sigma)
    radius = math.ceil(float(f(2.0) * sigma))
    norm = f(1.0) / (sigma * np.sqrt(f(2.0) * f(np.pi)))
    values = []
    for i in range(radius + 1):
        x = f(i)
        values.append(norm * f(_LIBM.expf(float(-(x * x) / (f(2.0) * (sigma * sigma))))))
    kernel = [values[abs(i - radius)] for i in range(2 * radius + 1)]
    total = f(0.0)
    for v in kernel:  # summed in order, as Iterator::sum
        total = f(total + v)
    return np.array([f(v / total) for v in kernel], np.float32)


def _filter_1d(img: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """imageproc's horizontal/vertical_filter on u8: clamp-to-edge padding, float32
    accumulation in kernel order, then `as u8` (truncation) with clamping."""
    half = len(kernel) // 2
    n = img.shape[axis]
    acc = np.zeros(img.shape, np.float32)
    for i, k in enumerate(kernel):
        idx = np.clip(np.arange(n) + i - half, 0, n - 1)
        acc = acc + np.take(img, idx, axis=axis).astype(np.float32) * k
    out = np.where(acc < 255.0, np.where(acc > 0.0, np.trunc(acc), 0.0), 255.0)
    return out.astype(np.uint8)


def _sobel(img: np.ndarray, kernel: list[int]) -> np.ndarray:
    """imageproc's `filter_clamped` with a 3x3 integer kernel (row-major), clamp-to-edge."""
    h, w = img.shape
    pad = np.pad(img.astype(np.int64), 1, mode="edge")
    acc = np.zeros((h, w), np.int64)
    for ky in range(3):
        for kx in range(3):
            acc += kernel[3 * ky + kx] * pad[ky:ky + h, kx:kx + w]
    return np.clip(acc, -32768, 32767).astype(np.int16)


SOBEL_HORIZONTAL = [-1, 0, 1, -2, 0, 2, -1, 0, 1]
SOBEL_VERTICAL = [-1, -2, -1, 0, 0, 0, 1, 2, 1]


def canny(gray: np.ndarray, low: float = 100.0, high: float = 200.0) -> np.ndarray:
    """imageproc 0.26.2 `edges::canny` on an [H, W] uint8 image: 255 on edges, 0 elsewhere."""
    if not (0 <= low <= high):
        raise ValueError("thresholds need 0 <= low <= high")
    kernel = _gaussian_kernel(1.4)
    blurred = _filter_1d(_filter_1d(gray, kernel, axis=1), kernel, axis=0)
    gx = _sobel(blurred, SOBEL_HORIZONTAL)
    gy = _sobel(blurred, SOBEL_VERTICAL)
    h, w = gray.shape
    g = np.zeros((h, w), np.float32)
    for y in range(h):
        for x in range(w):
            g[y, x] = _LIBM.hypotf(float(gx[y, x]), float(gy[y, x]))
    to_degrees = np.float32(180.0) / np.float32(np.pi)
    thinned = np.zeros((h, w), np.float32)
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            angle = np.float32(_LIBM.atan2f(float(gy[y, x]), float(gx[y, x]))) * to_degrees
            if angle < 0.0:
                angle = np.float32(angle + np.float32(180.0))
            if not (22.5 <= angle < 157.5):
                a, b = g[y, x - 1], g[y, x + 1]
            elif angle < 67.5:
                a, b = g[y + 1, x + 1], g[y - 1, x - 1]
            elif angle < 112.5:
                a, b = g[y - 1, x], g[y + 1, x]
            else:
                a, b = g[y + 1, x - 1], g[y - 1, x + 1]
            thinned[y, x] = 0.0 if (g[y, x] < a or g[y, x] < b) else g[y, x]
    out = np.zeros((h, w), np.uint8)
    # Hysteresis as imageproc does it: a depth-first walk from each strong pixel over six of
    # the eight neighbours (imageproc's list; kept so that the maps match).
    steps = ((1, 0), (1, 1), (0, 1), (-1, -1), (-1, 0), (-1, 1))
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            if thinned[y, x] >= high and out[y, x] == 0:
                out[y, x] = 255
                stack = [(x, y)]
                while stack:
                    nx, ny = stack.pop()
                    for dx, dy in steps:
                        xx, yy = nx + dx, ny + dy
                        # (the bounds check only matters for low = 0, where imageproc would panic)
                        if 0 <= xx < w and 0 <= yy < h and thinned[yy, xx] >= low and out[yy, xx] == 0:
                            out[yy, xx] = 255
                            stack.append((xx, yy))
    return out


def control_map(shape: str, position: str, size: str, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """The toy ControlNet's control image for a scene: Canny (100, 200, the SDK's default) of
    its silhouette, as an RGB [H, W, 3] uint8 map (white edges on black), as the SDK hands it on."""
    edges = canny(silhouette(shape, position, size, image_size))
    return np.repeat(edges[..., None], 3, axis=-1)


def geometries() -> list[tuple[str, str, str]]:
    """Every (shape, position, size) of the toy world, in this order: what an edge map shows
    (the strip of maps train_toy_controlnet.py writes follows it)."""
    return list(itertools.product(SHAPES, POSITIONS, SIZES))
