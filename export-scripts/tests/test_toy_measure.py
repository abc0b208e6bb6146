"""The toy's pixel measurement (zimage_export/toy/measure.py, twin of sdk/tests/common/semantic.rs)
reads every rendered training picture right, and reads noise, flat pictures and wrong
captions as wrong."""

import random

import numpy as np

from zimage_export.toy.measure import measure, mismatches, score
from zimage_export.toy.scenes import Scene, all_scenes, render


def _png(scene, **kw):
    return ((render(scene, **kw) + 1) * 127.5).round().astype(np.uint8)


def test_every_rendered_scene_measures_as_its_caption():
    scenes = all_scenes()
    assert score([_png(s) for s in scenes], scenes) == {
        "background": 1.0, "colour": 1.0, "position": 1.0, "size": 1.0, "kind": 1.0, "all": 1.0}


def test_each_attribute_is_told_apart():
    base = Scene("circle", "red", "blue", "left", "small")
    img = _png(base)
    assert mismatches(measure(img), base) == []
    assert mismatches(measure(img), Scene("square", "red", "blue", "left", "small")) == ["kind"]
    assert mismatches(measure(img), Scene("circle", "green", "blue", "left", "small")) == ["colour"]
    assert mismatches(measure(img), Scene("circle", "red", "yellow", "left", "small")) == ["background"]
    assert mismatches(measure(img), Scene("circle", "red", "blue", "right", "small")) == ["position"]
    assert mismatches(measure(img), Scene("circle", "red", "blue", "left", "large")) == ["size"]


def test_stray_pixels_do_not_move_the_shape():
    scene = Scene("triangle", "white", "black", "top", "large")
    img = _png(scene)
    img[60:62, 2:4] = 255  # a speck far from the shape
    assert mismatches(measure(img), scene) == []


def test_noise_and_flat_pictures_fail():
    rng = np.random.default_rng(0)
    scenes = random.Random(0).sample(all_scenes(), 50)
    assert score([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in scenes], scenes)["all"] == 0.0
    flat = np.zeros((64, 64, 3), np.uint8) + np.array([30, 60, 220], np.uint8)
    m = measure(flat)
    assert m.background == "blue" and m.centre is None
    assert mismatches(m, Scene("circle", "red", "blue", "centre", "medium")) == ["shape"]
