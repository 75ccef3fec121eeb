"""The synthetic world: attribute vocabularies, scene sampling and a deterministic renderer.

A `Scene` is plain data (objects, background, style and a render seed); `render` turns it into pixels.
Every random choice made while rendering (texture phase, colour jitter, sketch jitter, noise) is drawn
from `Scene.seed`, so one scene always gives the same image.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

Colour = tuple[int, int, int]

# Close pairs on purpose (red/maroon, blue/navy, cyan/teal, yellow/gold, green/lime) for fine-grained tasks.
COLOURS: dict[str, Colour] = {
    "black": (20, 20, 20),
    "blue": (35, 80, 225),
    "brown": (125, 75, 35),
    "cyan": (40, 215, 225),
    "gold": (205, 160, 25),
    "gray": (128, 128, 128),
    "green": (35, 150, 55),
    "lime": (150, 225, 45),
    "maroon": (125, 20, 35),
    "navy": (25, 35, 115),
    "orange": (245, 125, 20),
    "pink": (245, 135, 190),
    "purple": (125, 50, 175),
    "red": (220, 35, 35),
    "teal": (20, 125, 125),
    "white": (245, 245, 245),
    "yellow": (245, 225, 45),
}
SIZES = ("large", "small")
# Circumradius as a fraction of the image side.
SIZE_RADIUS = {"large": 0.21, "small": 0.1}
MAX_COUNT = 3
TEXTURES = ("checkered", "dotted", "gradient", "grid", "plain", "speckled", "striped", "wavy", "zigzag")
STYLES = ("shaded", "flat", "outline", "sketch", "pixelated", "noisy")
MAX_ROTATION = 30.0  # degrees; small enough that a square never turns into a diamond

SUPERSAMPLE = 2  # object masks are drawn at 2x and box-filtered down, which antialiases edges for free
MIN_BACKGROUND_CONTRAST = 90.0  # RGB distance between the background and every object colour


# ---------------------------------------------------------------------------------------------- shapes
# Each shape is a tuple of closed paths in unit coordinates (y up, fits the unit circle):
# the first path is the outline, any further paths are holes.


def _circle(radius: float = 1.0, y_radius: float | None = None, points: int = 40) -> np.ndarray:
    angles = np.linspace(0.0, 2.0 * math.pi, points, endpoint=False)
    return np.stack([radius * np.cos(angles), (y_radius or radius) * np.sin(angles)], axis=1)


def _regular_polygon(vertices: int, radius: float = 1.0) -> np.ndarray:
    angles = math.pi / 2 + np.arange(vertices) * 2.0 * math.pi / vertices
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star(points: int = 5, inner_radius: float = 0.42) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner_radius)
    angles = math.pi / 2 + np.arange(2 * points) * math.pi / points
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _centred(path: np.ndarray) -> np.ndarray:
    """Centre a path's bounding box on the origin and scale it into the unit circle."""
    path = path - (path.min(axis=0) + path.max(axis=0)) / 2
    return path / np.linalg.norm(path, axis=1).max()


def _heart(points: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, points, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return _centred(np.stack([x, y], axis=1))


def _crescent(inner_radius: float = 0.8, offset: float = 0.45, points: int = 24) -> np.ndarray:
    """The unit disc minus a disc of `inner_radius` shifted right by `offset`, as one closed path."""
    # Where the two circles cross: (x0, +-y0).
    x0 = (1.0 - inner_radius**2 + offset**2) / (2.0 * offset)
    y0 = math.sqrt(1.0 - x0**2)
    outer_start = math.atan2(y0, x0)
    inner_start = math.atan2(y0, x0 - offset)
    outer = np.linspace(outer_start, 2.0 * math.pi - outer_start, points)
    inner = np.linspace(2.0 * math.pi - inner_start, inner_start, points)[1:-1]
    outer_arc = np.stack([np.cos(outer), np.sin(outer)], axis=1)
    inner_arc = np.stack([offset + inner_radius * np.cos(inner), inner_radius * np.sin(inner)], axis=1)
    return _centred(np.concatenate([outer_arc, inner_arc]))


def _arrow() -> np.ndarray:
    return np.array([(-1.0, 0.2), (0.15, 0.2), (0.15, 0.55), (1.0, 0.0), (0.15, -0.55), (0.15, -0.2), (-1.0, -0.2)])


def _cross(arm: float = 0.9, half_width: float = 0.3) -> np.ndarray:
    a, w = arm, half_width
    return np.array(
        [(-w, a), (w, a), (w, w), (a, w), (a, -w), (w, -w), (w, -a), (-w, -a), (-w, -w), (-a, -w), (-a, w), (-w, w)]
    )


SHAPE_PATHS: dict[str, tuple[np.ndarray, ...]] = {
    "arrow": (_arrow(),),
    "circle": (_circle(0.9),),
    "crescent": (_crescent(),),
    "cross": (_cross(),),
    "diamond": (np.array([(0.0, 1.0), (0.6, 0.0), (0.0, -1.0), (-0.6, 0.0)]),),
    "ellipse": (_circle(1.0, y_radius=0.55),),
    "heart": (_heart(),),
    "hexagon": (_regular_polygon(6),),
    "pentagon": (_regular_polygon(5),),
    "ring": (_circle(0.95), _circle(0.55)),
    "square": (np.array([(-0.72, 0.72), (0.72, 0.72), (0.72, -0.72), (-0.72, -0.72)]),),
    "star": (_star(),),
    "triangle": (_regular_polygon(3),),
}
SHAPES = tuple(sorted(SHAPE_PATHS))


# ---------------------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Obj:
    """One object; `x`, `y` are its centre in [0, 1] image coordinates (y down), `rotation` in degrees."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    rotation: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    texture: str
    background: Colour
    style: str
    seed: int


def position_name(obj: Obj) -> str:
    """Where an object sits: "center", "left", "top", ..., or a corner such as "top left"."""
    vertical = "top" if obj.y < 0.4 else "bottom" if obj.y > 0.6 else ""
    horizontal = "left" if obj.x < 0.4 else "right" if obj.x > 0.6 else ""
    return " ".join(word for word in (vertical, horizontal) if word) or "center"


def _require(value: str | None, vocabulary, kind: str) -> None:
    if value is not None and value not in vocabulary:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {sorted(vocabulary)}")


def _choose(rng: np.random.Generator, options) -> str:
    return options[rng.integers(len(options))]


def _choose_style(rng: np.random.Generator, style_weights: Mapping[str, float] | None) -> str:
    if style_weights is None:
        return _choose(rng, STYLES)
    for style in style_weights:
        _require(style, STYLES, "style")
    names = list(style_weights)
    weights = np.array([style_weights[name] for name in names], dtype=float)
    if weights.sum() <= 0:
        raise ValueError(f"style_weights must give some style a positive weight, got {dict(style_weights)}")
    return names[rng.choice(len(names), p=weights / weights.sum())]


def _place(rng: np.random.Generator, radii: list[float], tries: int = 64) -> list[tuple[float, float]]:
    """Centres inside the image, without overlaps where random tries find room (overlap otherwise)."""
    centres: list[tuple[float, float]] = []
    for radius in radii:
        candidates = rng.uniform(radius, 1.0 - radius, size=(tries, 2))
        fits = np.ones(tries, dtype=bool)
        for (x, y), other in zip(centres, radii[: len(centres)], strict=True):
            fits &= np.hypot(candidates[:, 0] - x, candidates[:, 1] - y) > radius + other
        x, y = candidates[np.argmax(fits)]
        centres.append((float(x), float(y)))
    return centres


def _background_colour(rng: np.random.Generator, object_colours: list[str], tries: int = 16) -> Colour:
    """A muted colour, far (in RGB) from every object colour when random tries allow it."""
    hues, saturations, values = rng.random(tries), rng.uniform(0.0, 0.4, tries), rng.uniform(0.25, 0.95, tries)
    candidates = 255.0 * np.array([colorsys.hsv_to_rgb(*hsv) for hsv in zip(hues, saturations, values, strict=True)])
    targets = np.array([COLOURS[name] for name in object_colours], dtype=float)
    contrast = np.linalg.norm(candidates[:, None, :] - targets[None, :, :], axis=2).min(axis=1)
    good = contrast >= MIN_BACKGROUND_CONTRAST
    best = int(np.argmax(good)) if good.any() else int(np.argmax(contrast))
    return tuple(int(round(channel)) for channel in candidates[best])


def sample_scene(
    rng: np.random.Generator,
    *,
    shape: str | None = None,
    colour: str | None = None,
    size: str | None = None,
    count: int | None = None,
    texture: str | None = None,
    style: str | None = None,
    style_weights: Mapping[str, float] | None = None,
    distractors: int = 0,
) -> Scene:
    """Sample a scene: `count` identical objects (shape, colour, size) plus `distractors` small objects.

    Fixed attributes are kept; the rest are drawn uniformly, the style from `style_weights` (style -> weight,
    weight 0 holds a style out) when `style` is not given. Distractors always have a different shape.
    """
    _require(shape, SHAPES, "shape")
    _require(colour, COLOURS, "colour")
    _require(size, SIZES, "size")
    _require(texture, TEXTURES, "texture")
    _require(style, STYLES, "style")
    if count is not None and not 1 <= count <= MAX_COUNT:
        raise ValueError(f"count must be in 1..{MAX_COUNT}, got {count}")
    style = style or _choose_style(rng, style_weights)
    count = count or int(rng.integers(1, MAX_COUNT + 1))
    main = (shape or _choose(rng, SHAPES), colour or _choose(rng, list(COLOURS)), size or _choose(rng, SIZES))
    other_shapes = [name for name in SHAPES if name != main[0]]
    specs = [main] * count + [
        (_choose(rng, other_shapes), _choose(rng, list(COLOURS)), "small") for _ in range(distractors)
    ]
    centres = _place(rng, [SIZE_RADIUS[spec_size] for _, _, spec_size in specs])
    rotations = rng.uniform(-MAX_ROTATION, MAX_ROTATION, len(specs))
    objects = tuple(
        Obj(obj_shape, obj_colour, obj_size, x, y, float(rotation))
        for (obj_shape, obj_colour, obj_size), (x, y), rotation in zip(specs, centres, rotations, strict=True)
    )
    return Scene(
        objects=objects,
        texture=texture or _choose(rng, TEXTURES),
        background=_background_colour(rng, [obj.colour for obj in objects]),
        style=style,
        seed=int(rng.integers(2**32)),
    )


# ---------------------------------------------------------------------------------------------- textures


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    ys.flags.writeable = xs.flags.writeable = False
    return xs, ys


def _texture_weights(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Per-pixel weight in [0, 1] of the texture's second colour over the background colour."""
    xs, ys = _pixel_grid(size)
    angle = rng.uniform(0.0, math.pi)
    along = xs * math.cos(angle) + ys * math.sin(angle) + rng.uniform(0.0, size)
    across = -xs * math.sin(angle) + ys * math.cos(angle) + rng.uniform(0.0, size)
    period = size * rng.uniform(0.1, 0.2)
    if texture == "plain":
        return np.zeros((size, size), np.float32)
    if texture == "striped":
        return (along % period < period / 2).astype(np.float32)
    if texture == "checkered":
        return ((np.floor(along / period) + np.floor(across / period)) % 2).astype(np.float32)
    if texture == "grid":
        line_width = max(1.0, size / 48)
        return ((along % period < line_width) | (across % period < line_width)).astype(np.float32)
    if texture == "dotted":
        offset_along = along % period - period / 2
        offset_across = across % period - period / 2
        return (np.hypot(offset_along, offset_across) < period * 0.25).astype(np.float32)
    if texture == "speckled":
        speckles = rng.random((size, size)) < 0.3
        return (speckles * rng.uniform(0.5, 1.0, (size, size))).astype(np.float32)
    if texture == "gradient":
        return (along - along.min()) / (along.max() - along.min())
    wavelength = period * rng.uniform(1.5, 3.0)
    amplitude = period * rng.uniform(0.3, 0.6)
    if texture == "wavy":
        displacement = amplitude * np.sin(2.0 * math.pi * across / wavelength)
    elif texture == "zigzag":
        displacement = amplitude * (2.0 * np.abs(2.0 * ((across / wavelength) % 1.0) - 1.0) - 1.0)
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return ((along + displacement) % period < period / 2).astype(np.float32)


def _render_background(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    background = np.array(scene.background, dtype=np.float32)
    shift = rng.uniform(50.0, 90.0)
    second = np.clip(background - shift if background.mean() > 128 else background + shift, 0, 255)
    weights = _texture_weights(scene.texture, size, rng)[..., None]
    pixels = background + weights * (second - background)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------- objects


def _object_paths(obj: Obj, canvas: int) -> list[np.ndarray]:
    """The object's paths in canvas pixel coordinates."""
    radius = SIZE_RADIUS[obj.size] * canvas
    theta = math.radians(obj.rotation)
    # Rotate counter-clockwise in y-up unit space, then flip y for the y-down image.
    rotation = np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
    flip = np.array([1.0, -1.0])
    centre = np.array([obj.x, obj.y]) * canvas
    return [centre + radius * (path @ rotation) * flip for path in SHAPE_PATHS[obj.shape]]


def _closed(path: np.ndarray) -> np.ndarray:
    return np.concatenate([path, path[:1]])


def _fill_mask(paths: list[np.ndarray], canvas: int) -> Image.Image:
    mask = Image.new("L", (canvas, canvas))
    draw = ImageDraw.Draw(mask)
    outline, *holes = paths
    draw.polygon(outline.ravel().tolist(), fill=255)
    for hole in holes:
        draw.polygon(hole.ravel().tolist(), fill=0)
    return mask


def _stroke_mask(paths: list[np.ndarray], canvas: int, width: int) -> Image.Image:
    mask = Image.new("L", (canvas, canvas))
    draw = ImageDraw.Draw(mask)
    for path in paths:
        draw.line(_closed(path).ravel().tolist(), fill=255, width=width, joint="curve")
    return mask


def _resample(path: np.ndarray, spacing: float) -> np.ndarray:
    """Points every `spacing` pixels along a closed path (first point repeated at the end)."""
    closed = _closed(path)
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(closed, axis=0).T))])
    positions = np.linspace(0.0, arc[-1], max(8, int(arc[-1] / spacing)) + 1)
    return np.stack([np.interp(positions, arc, closed[:, 0]), np.interp(positions, arc, closed[:, 1])], axis=1)


def _sketch_mask(paths: list[np.ndarray], canvas: int, rng: np.random.Generator) -> Image.Image:
    """Two jittered passes of a pencil over each path, each broken into strokes by random gaps."""
    mask = Image.new("L", (canvas, canvas))
    draw = ImageDraw.Draw(mask)
    unit = canvas / 64  # jitter in 64px-image pixels, whatever the resolution
    for path in paths:
        dense = _resample(path, spacing=1.5 * unit)
        for _ in range(2):
            drift = np.cumsum(rng.normal(0.0, 0.25 * unit, dense.shape), axis=0)
            drift -= np.linspace(0.0, 1.0, len(dense))[:, None] * drift[-1]  # the stroke ends where it began
            stroke = dense + drift + rng.normal(0.0, 0.8 * unit, 2)
            drawn = rng.random(len(stroke) - 1) > 0.12  # segment i joins points i and i + 1
            edges = np.flatnonzero(np.diff(np.concatenate([[False], drawn, [False]]).astype(np.int8)))
            for start, stop in zip(edges[::2], edges[1::2], strict=True):
                draw.line(stroke[start : stop + 1].ravel().tolist(), fill=255, width=max(1, round(unit)))
    return mask


def _jittered(colour: str, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.array(COLOURS[colour], dtype=np.float32) + rng.uniform(-12.0, 12.0, 3), 0, 255)


def _shading(obj: Obj, rgb: np.ndarray, size: int) -> Image.Image:
    """The object's colour lit from the top left: brighter there, darker towards the bottom right."""
    xs, ys = _pixel_grid(size)
    radius = SIZE_RADIUS[obj.size] * size
    towards_light = ((obj.x * size - xs) + (obj.y * size - ys)) / (math.sqrt(2.0) * radius)
    light = 1.0 + 0.35 * np.clip(towards_light, -1.0, 1.0)
    return Image.fromarray(np.clip(rgb * light[..., None], 0, 255).astype(np.uint8), "RGB")


def _paint(image: Image.Image, obj: Obj, style: str, rng: np.random.Generator) -> None:
    size = image.width
    canvas = size * SUPERSAMPLE
    paths = _object_paths(obj, canvas)
    rgb = _jittered(obj.colour, rng)
    if style == "outline":
        mask = _stroke_mask(paths, canvas, width=max(1, round(size / 32)) * SUPERSAMPLE)
    elif style == "sketch":
        mask = _sketch_mask(paths, canvas, rng)
    else:
        mask = _fill_mask(paths, canvas)
    mask = mask.reduce(SUPERSAMPLE)
    if style == "shaded":
        image.paste(_shading(obj, rgb, size), mask=mask)
        rim = _stroke_mask(paths, canvas, width=SUPERSAMPLE).reduce(SUPERSAMPLE)
        image.paste(tuple(int(c) for c in rgb * 0.6), mask=rim)
    else:
        image.paste(tuple(int(c) for c in rgb), mask=mask)


def _pixelate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    block = rng.uniform(3.0, 5.0) * image.width / 64
    blocks = max(4, round(image.width / block))
    return image.resize((blocks, blocks), Image.Resampling.BOX).resize(image.size, Image.Resampling.NEAREST)


def _add_noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 40.0, (image.height, image.width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


# Styles that are a whole-image filter over flat objects.
POSTPROCESS = {"pixelated": _pixelate, "noisy": _add_noise}


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Render a scene as an RGB image of `size` x `size` pixels; the same scene always gives the same pixels."""
    rng = np.random.default_rng(scene.seed)
    image = _render_background(scene, size, rng)
    object_style = "flat" if scene.style in POSTPROCESS else scene.style
    for obj in scene.objects:
        _paint(image, obj, object_style, rng)
    if scene.style in POSTPROCESS:
        image = POSTPROCESS[scene.style](image, rng)
    return image
