"""Synthetic scenes for the toy model: one flat-coloured shape on a flat background.

A scene is (shape, colour, background, position, size). Its caption names every attribute
in English or Chinese; a caption that leaves out the position means the centre and one that
leaves out the size means medium, so every caption has exactly one picture (the sampler has
no mode to choose between, which keeps an 8-step toy sharp). The Rust semantic tests
(sdk/tests/common/semantic.rs) measure the same quantities from pixels: keep the colour
table and the geometry there in step with this file.
"""

import itertools
import random
from dataclasses import dataclass, replace

import numpy as np

IMAGE_SIZE = 64

# name -> (RGB, Chinese name). Saturated, far apart in RGB, so a measured colour is unambiguous.
COLOURS = {
    "red": ((220, 30, 30), "红色"),
    "green": ((30, 180, 40), "绿色"),
    "blue": ((30, 60, 220), "蓝色"),
    "yellow": ((240, 220, 30), "黄色"),
    "white": ((245, 245, 245), "白色"),
    "purple": ((150, 40, 190), "紫色"),
    "black": ((15, 15, 15), "黑色"),
}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
# name -> (centre x, centre y) in pixels of a 64x64 image, Chinese name.
POSITIONS = {
    "centre": ((32, 32), "中间"),
    "left": ((18, 32), "左边"),
    "right": ((46, 32), "右边"),
    "top": ((32, 18), "上方"),
    "bottom": ((32, 46), "下方"),
}
# name -> half extent in pixels (circle radius, half side of the square and of the triangle's box).
SIZES = {"small": (7, "小"), "medium": (11, None), "large": (15, "大")}

ENGLISH_POSITION = {"centre": "in the centre", "left": "on the left", "right": "on the right",
                    "top": "at the top", "bottom": "at the bottom"}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    position: str
    size: str


def all_scenes() -> list[Scene]:
    """Every combination with the shape's colour different from the background's."""
    return [
        Scene(shape, colour, background, position, size)
        for shape, colour, background, position, size in itertools.product(SHAPES, COLOURS, COLOURS, POSITIONS, SIZES)
        if colour != background
    ]


def captions(scene: Scene) -> list[str]:
    """Every caption of the scene (English and Chinese, position/size words left out where
    they are the default)."""
    out = []
    pos_forms = [ENGLISH_POSITION[scene.position]] + ([None] if scene.position == "centre" else [])
    size_forms = [None] if scene.size == "medium" else [scene.size]
    for pos, size in itertools.product(pos_forms, size_forms):
        thing = " ".join(w for w in ("a", size, scene.colour, scene.shape) if w)
        bg = f"on a {scene.background} background"
        out.append(f"{thing} {bg}" if pos is None else f"{thing} {pos} {bg}")
        out.append(f"{thing} {pos}, {bg}" if pos else f"{thing}, {bg}")
    zh_pos = [POSITIONS[scene.position][1]] + ([None] if scene.position == "centre" else [])
    zh_size = SIZES[scene.size][1] or ""
    shape_zh = f"{zh_size}{COLOURS[scene.colour][1]}{SHAPES[scene.shape]}"
    for pos in zh_pos:
        where = f"{COLOURS[scene.background][1]}背景上{pos or ''}"
        out.append(f"{where}有一个{shape_zh}")
        out.append(f"{where}的一个{shape_zh}")
    return out


def render(scene: Scene, supersample: int = 4, jitter: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """HxWx3 float32 in [-1, 1], anti-aliased by supersampling. `jitter` (dx, dy, dsize in
    pixels) is only used to train the VAE on continuous geometry."""
    n = IMAGE_SIZE * supersample
    coords = (np.arange(n, dtype=np.float32) + 0.5) / supersample
    xs, ys = np.meshgrid(coords, coords)
    (cx, cy), _ = POSITIONS[scene.position]
    cx, cy = cx + jitter[0], cy + jitter[1]
    r = SIZES[scene.size][0] + jitter[2]
    if scene.shape == "circle":
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    elif scene.shape == "square":
        mask = (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
    else:  # triangle pointing up, inside the box of half extent r
        top, bottom = cy - r, cy + r
        frac = (ys - top) / (2 * r)
        mask = (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= frac * r)
    fg = np.array(COLOURS[scene.colour][0], dtype=np.float32)
    bg = np.array(COLOURS[scene.background][0], dtype=np.float32)
    big = np.where(mask[..., None], fg, bg)
    img = big.reshape(IMAGE_SIZE, supersample, IMAGE_SIZE, supersample, 3).mean(axis=(1, 3))
    return (img / 127.5 - 1.0).astype(np.float32)


def random_scene(rng: random.Random) -> Scene:
    colour, background = rng.sample(list(COLOURS), 2)
    return Scene(rng.choice(list(SHAPES)), colour, background, rng.choice(list(POSITIONS)), rng.choice(list(SIZES)))


def unplaced_captions(scene: Scene) -> list[str]:
    """The scene's captions without a position word (English and Chinese), for the toy
    ControlNet, whose edge map gives the position: the captions of the same scene centred, less
    those that say "in the centre" / 中间. The size stays named where it is not medium."""
    centred = captions(replace(scene, position="centre"))
    return [c for c in centred if ENGLISH_POSITION["centre"] not in c and POSITIONS["centre"][1] not in c]
