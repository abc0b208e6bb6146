"""The toy ControlNet's inputs (zimage_export/toy/edges.py, scenes.unplaced_captions): the
silhouette is the rendered scene's geometry, the Canny port finds the outline and nothing
else, and the position-less captions name everything but the position. (That the port makes
the SDK's maps bit for bit is checked on the Rust side: sdk/tests/semantic_toy_controlnet.rs.)"""

import numpy as np
import pytest

from zimage_export.toy.edges import canny, control_map, geometries, luma, silhouette
from zimage_export.toy.scenes import COLOURS, POSITIONS, Scene, captions, render, unplaced_captions


def test_the_silhouette_is_the_rendered_shape():
    # render() samples the same 4x4 points per pixel in float geometry: white (245) on black
    # (15) gives the covered share; the silhouette may differ by one sample on a boundary.
    for shape, position, size in geometries():
        img = render(Scene(shape, "white", "black", position, size))
        covered = ((img[..., 0] + 1) * 127.5 - 15) / (245 - 15)
        sil = silhouette(shape, position, size) / 255.0
        assert np.abs(sil - covered).max() <= 1 / 16 + 1e-3, (shape, position, size)


def test_edges_lie_on_the_outline_and_only_there():
    for shape, position, size in geometries():
        sil = silhouette(shape, position, size).astype(np.int64)
        edges = control_map(shape, position, size)
        assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
        assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 0] == edges[..., 2]).all()
        ys, xs = np.nonzero(edges[..., 0])
        assert len(xs) >= 40, (shape, position, size)
        # The outline: pixels with a neighbour of other coverage. Every edge is within 2 px of it.
        pad = np.pad(sil, 1, mode="edge")
        boundary = np.zeros_like(sil, bool)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            boundary |= pad[dy:dy + 64, dx:dx + 64] != sil
        by, bx = np.nonzero(boundary)
        d = np.sqrt((ys[:, None] - by[None]) ** 2 + (xs[:, None] - bx[None]) ** 2).min(axis=1)
        assert d.max() <= 2.0, (shape, position, size)
        # ... and they go round the shape: its box is the outline's box within 2 px.
        assert abs(xs.min() - bx.min()) <= 2 and abs(xs.max() - bx.max()) <= 2
        assert abs(ys.min() - by.min()) <= 2 and abs(ys.max() - by.max()) <= 2


def test_each_geometry_has_its_own_map():
    maps = {g: control_map(*g).tobytes() for g in geometries()}
    assert len(set(maps.values())) == len(maps) == 45


def test_canny_thresholds():
    flat = np.full((32, 32), 128, np.uint8)
    assert not canny(flat).any()
    step = np.zeros((32, 32), np.uint8)
    step[:, 16:] = 255
    edges = canny(step)
    cols = np.nonzero(edges.any(axis=0))[0]
    assert edges[1:-1].any(axis=1).all() and set(cols) <= {15, 16}  # a vertical line at the step
    assert not canny(step // 8).any()  # too weak for the default thresholds (100, 200)
    assert canny(step // 8, 10.0, 20.0).any()
    with pytest.raises(ValueError):
        canny(step, 200.0, 100.0)


def test_luma_is_the_image_crates():
    rgb = np.array([[COLOURS[c][0] for c in ("red", "blue", "purple", "white")]], np.uint8)
    # (2126 R + 7152 G + 722 B) // 10000: red, blue and purple are nearly the same grey, why
    # the maps are made from outlines and not from the coloured pictures.
    assert luma(rgb).tolist() == [[70, 65, 74, 245]]


def test_unplaced_captions_name_all_but_the_position():
    for position in POSITIONS:
        scene = Scene("triangle", "green", "black", position, "large")
        caps = unplaced_captions(scene)
        assert caps == [
            "a large green triangle on a black background",
            "a large green triangle, on a black background",
            "黑色背景上有一个大绿色三角形",
            "黑色背景上的一个大绿色三角形",
        ]
        assert set(caps) <= set(captions(Scene("triangle", "green", "black", "centre", "large")))
