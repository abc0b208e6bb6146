"""What a toy picture shows, measured from pixels: the Python twin of sdk/tests/common/semantic.rs
(same palette, same thresholds), so that training can be judged by what it draws (shape colour,
position, size, kind) and not only by its loss. numpy only.
"""

from dataclasses import dataclass

import numpy as np

from .scenes import COLOURS, POSITIONS, SIZES, Scene

_NAMES = list(COLOURS)
_RGB = np.array([COLOURS[c][0] for c in _NAMES], dtype=np.int64)


@dataclass
class Measured:
    background: str
    background_share: float
    colour: str | None
    colour_share: float
    centre: tuple[float, float] | None
    half_extent: float
    fill: float


def _nearest(pixels: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour of each pixel ([..., 3] uint8)."""
    d = ((pixels.astype(np.int64)[..., None, :] - _RGB) ** 2).sum(-1)
    return d.argmin(-1)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of `mask` (first found on ties, scanning rows), so that
    stray pixels elsewhere neither move the shape's box nor its centre."""
    h, w = mask.shape
    label = np.full((h, w), -1, np.int64)
    best, best_n, n_labels = -1, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if label[y0, x0] >= 0:
            continue
        label[y0, x0] = n_labels
        stack, n = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            n += 1
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and label[yy, xx] < 0:
                    label[yy, xx] = n_labels
                    stack.append((yy, xx))
        if n > best_n:
            best, best_n = n_labels, n
        n_labels += 1
    return (label == best) & (best >= 0)


def measure(img: np.ndarray) -> Measured:
    """`img`: HxWx3 uint8. Background = the palette colour most pixels of the 2-pixel border are
    nearest to; the shape = the largest connected region of pixels farther than 60 levels (RGB
    distance) from it. Centre and half extent from its bounding box (its centroid would put the
    triangle 1/3 of a half height low)."""
    h, w, _ = img.shape
    border = np.ones((h, w), bool)
    border[2:h - 2, 2:w - 2] = False
    near = _nearest(img)
    counts = np.bincount(near[border], minlength=len(_NAMES))
    bg = int(counts.argmax())
    background_share = float(counts[bg] / border.sum())
    dist2 = ((img.astype(np.int64) - _RGB[bg]) ** 2).sum(-1)
    inside = largest_component(dist2 > 60 * 60)
    ys, xs = np.nonzero(inside)
    scale = 64.0 / max(w, h)
    if len(xs) < 8:
        return Measured(_NAMES[bg], background_share, None, 0.0, None, 0.0, 0.0)
    ccounts = np.bincount(near[inside], minlength=len(_NAMES))
    colour = int(ccounts.argmax())
    bw = float(xs.max() - xs.min() + 1)
    bh = float(ys.max() - ys.min() + 1)
    bx = (xs.min() + xs.max() + 1) / 2.0
    by = (ys.min() + ys.max() + 1) / 2.0
    return Measured(_NAMES[bg], background_share, _NAMES[colour], float(ccounts[colour] / len(xs)),
                    (bx * scale, by * scale), (bw + bh) / 4.0 * scale, len(xs) / (bw * bh))


def mismatches(m: Measured, want: Scene) -> list[str]:
    """The attributes of `want` the picture does not show (names: background, shape, colour,
    position, size, kind); empty = it shows the scene. Same rules as semantic.rs."""
    out = []
    if m.background != want.background or m.background_share < 0.9:
        out.append("background")
    if m.centre is None:
        return out + ["shape"]
    if m.colour != want.colour or m.colour_share < 0.6:
        out.append("colour")
    wx, wy = POSITIONS[want.position][0]
    if np.hypot(m.centre[0] - wx, m.centre[1] - wy) > 6.0:
        out.append("position")
    size = min(SIZES, key=lambda s: abs(SIZES[s][0] - m.half_extent))
    if size != want.size:
        out.append("size")
    kind = "square" if m.fill > 0.92 else "circle" if m.fill >= 0.68 else "triangle"
    if kind != want.shape:
        out.append("kind")
    return out


def score(images, scenes) -> dict[str, float]:
    """Share of the pictures right on each attribute, and on all of them ('all')."""
    keys = ["background", "shape", "colour", "position", "size", "kind"]
    wrong = {k: 0 for k in keys}
    all_right = 0
    for img, scene in zip(images, scenes):
        bad = mismatches(measure(np.asarray(img)), scene)
        for k in bad:
            wrong[k] += 1
        if "shape" in bad:  # nothing to measure: every shape attribute is wrong
            for k in ("colour", "position", "size", "kind"):
                wrong[k] += 1
        all_right += not bad
    n = max(1, len(scenes))
    out = {k: 1 - wrong[k] / n for k in keys if k != "shape"}
    out["all"] = all_right / n
    return out
