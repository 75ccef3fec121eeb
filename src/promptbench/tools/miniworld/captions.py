"""Natural-language captions for scenes: varied wording and word order, never a false statement."""

from __future__ import annotations

from collections import Counter

import numpy as np

from promptbench.tools.miniworld.render import COLOURS, SHAPES, STYLES, TEXTURES, Obj, Scene, position_name

# (singular, plural) nouns per shape; the first is the canonical one, used for class names.
SHAPE_NOUNS: dict[str, tuple[tuple[str, str], ...]] = {
    "arrow": (("arrow", "arrows"),),
    "circle": (("circle", "circles"),),
    "crescent": (("crescent", "crescents"),),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
    "ellipse": (("ellipse", "ellipses"), ("oval", "ovals")),
    "heart": (("heart", "hearts"),),
    "hexagon": (("hexagon", "hexagons"),),
    "pentagon": (("pentagon", "pentagons"),),
    "ring": (("ring", "rings"),),
    "square": (("square", "squares"),),
    "star": (("star", "stars"),),
    "triangle": (("triangle", "triangles"),),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {name: (name,) for name in COLOURS} | {"gray": ("gray", "grey")}
# Vocabulary gap: these shades are usually called by their coarse colour, rarely by their own name.
COARSE_COLOUR = {"maroon": "red", "navy": "blue", "teal": "cyan", "gold": "yellow", "lime": "green"}
FINE_NAME_PROBABILITY = 0.1
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
COUNT_WORDS = {2: ("two", "a pair of"), 3: ("three",)}  # one object: "a"/"an", sometimes "one"
TEXTURE_WORDS: dict[str, tuple[str, ...]] = {name: (name,) for name in TEXTURES} | {
    "checkered": ("checkered", "checkerboard"),
    "dotted": ("dotted", "polka dot"),
    "plain": ("plain", "blank"),
}
STYLE_PREFIXES = {
    "shaded": ("a shaded drawing of", "a shaded picture of", "a 3d rendering of"),
    "flat": ("a flat illustration of", "a simple picture of", "clip art of"),
    "outline": ("an outline drawing of", "a line drawing of", "an outline of"),
    "sketch": ("a sketch of", "a pencil sketch of", "a rough sketch of"),
    "pixelated": ("a pixelated image of", "a low resolution image of", "pixel art of"),
    "noisy": ("a noisy image of", "a grainy picture of", "a noisy photo of"),
}
STYLE_SUFFIXES = {
    "shaded": "with shading",
    "flat": "in a flat style",
    "outline": "drawn in outline",
    "sketch": "sketched in pencil",
    "pixelated": "in pixel art style",
    "noisy": "with heavy noise",
}
GENERIC_PREFIXES = ("a picture of", "an image of", "a photo of", "a drawing of")
POSITION_PHRASES = {
    "center": ("in the center", "in the middle"),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "left": ("on the left",),
    "right": ("on the right",),
}
assert set(SHAPE_NOUNS) == set(SHAPES) and set(STYLE_PREFIXES) == set(STYLE_SUFFIXES) == set(STYLES)


def _pick(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def _chance(rng: np.random.Generator, probability: float) -> bool:
    return bool(rng.random() < probability)


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _position_phrase(obj: Obj, rng: np.random.Generator) -> str:
    position = position_name(obj)
    if position in POSITION_PHRASES:
        return _pick(rng, POSITION_PHRASES[position])
    return _pick(rng, (f"in the {position} corner", f"at the {position}"))


def _groups(scene: Scene) -> list[tuple[Obj, int]]:
    """Identical-looking objects (shape, colour, size) grouped, in order of first appearance."""
    first: dict[tuple[str, str, str], Obj] = {}
    counts: Counter[tuple[str, str, str]] = Counter()
    for obj in scene.objects:
        key = (obj.shape, obj.colour, obj.size)
        first.setdefault(key, obj)
        counts[key] += 1
    return [(obj, counts[key]) for key, obj in first.items()]


def _noun_phrase(obj: Obj, count: int, rng: np.random.Generator, with_colour: bool, with_size: bool) -> str:
    """E.g. "two small blue circles", "a star in red", "three hexagons that are teal"."""
    canonical, *synonyms = SHAPE_NOUNS[obj.shape]
    singular, plural = _pick(rng, synonyms) if synonyms and _chance(rng, 0.3) else canonical
    noun = singular if count == 1 else plural
    colour = _pick(rng, COLOUR_WORDS[obj.colour])
    if obj.colour in COARSE_COLOUR and not _chance(rng, FINE_NAME_PROBABILITY):
        colour = COARSE_COLOUR[obj.colour]
    colour_after_noun = with_colour and _chance(rng, 0.25)
    adjectives = [_pick(rng, SIZE_WORDS[obj.size])] if with_size else []
    if with_colour and not colour_after_noun:
        adjectives.append(colour)
    phrase = " ".join([*adjectives, noun])
    if colour_after_noun:
        phrase += _pick(rng, (f" in {colour}", f" that {'is' if count == 1 else 'are'} {colour}"))
    if count == 1:
        return f"one {phrase}" if _chance(rng, 0.2) else with_article(phrase)
    return f"{_pick(rng, COUNT_WORDS[count])} {phrase}"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random true description of `scene`: every object group is named by shape; colour, size, count,
    style, background and (for a lone object) position are each mentioned or left out at random."""
    groups = _groups(scene)
    if _chance(rng, 0.3):
        groups = [groups[i] for i in rng.permutation(len(groups))]
    with_colour, with_size = _chance(rng, 0.85), _chance(rng, 0.5)
    objects = _join([_noun_phrase(obj, count, rng, with_colour, with_size) for obj, count in groups])
    texture = _pick(rng, TEXTURE_WORDS[scene.texture]) if _chance(rng, 0.5) else None
    position = _position_phrase(scene.objects[0], rng) if len(scene.objects) == 1 and _chance(rng, 0.3) else None
    style_placement = _pick(rng, ("prefix", "suffix", None))

    lead = ""
    if style_placement == "prefix":
        lead = _pick(rng, STYLE_PREFIXES[scene.style]) + " "
    elif _chance(rng, 0.5):
        lead = _pick(rng, GENERIC_PREFIXES) + " "
    if texture and _chance(rng, 0.3):
        # Background first: "a striped background with two blue circles".
        body = f"{with_article(texture)} background with {objects}"
    else:
        if lead == "" and _chance(rng, 0.3):
            lead = "there is " if len(scene.objects) == 1 else "there are "
        background = _pick(rng, ("on {} background", "against {} backdrop", "with {} background"))
        body = objects + (" " + background.format(with_article(texture)) if texture else "")
    text = lead + body
    if position:
        text += " " + position
    if style_placement == "suffix":
        text += ", " + STYLE_SUFFIXES[scene.style]
    return text + ("." if _chance(rng, 0.5) else "")
