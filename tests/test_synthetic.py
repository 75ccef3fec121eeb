"""The synthetic world: renderer, captions, pretraining pairs and materialised downstream tasks."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from itertools import islice

import numpy as np
import pytest
from PIL import Image

from promptbench.tools.miniworld import (
    COLOURS,
    SHAPES,
    STYLES,
    TASKS,
    TASKS_VERSION,
    TEXTURES,
    Obj,
    Scene,
    TaskSpec,
    caption,
    class_folder,
    iter_pairs,
    make_pair,
    materialize,
    render,
    sample_pretraining_scene,
    sample_scene,
    task_scene,
)
from promptbench.tools.miniworld import tasks as tasks_module
from promptbench.tools.miniworld.captions import COARSE_COLOUR, COLOUR_WORDS, FINE_NAME_PROBABILITY, SHAPE_NOUNS, SIZE_WORDS, STYLE_PREFIXES, STYLE_SUFFIXES

TINY_SPLITS = {"train": 2, "val": 1, "test": 1}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def lone_object_scene(style="flat", texture="plain", **attributes) -> Scene:
    obj = Obj(**{"shape": "star", "colour": "red", "size": "large", "x": 0.5, "y": 0.5, "rotation": 0.0} | attributes)
    return Scene(objects=(obj,), texture=texture, background=(128, 128, 128), style=style, seed=7)


def object_pixels(scene: Scene) -> np.ndarray:
    """Where the scene's objects change the image, compared with the same scene without objects."""
    empty = dataclasses.replace(scene, objects=())
    return np.abs(pixels(render(scene)) - pixels(render(empty))).max(axis=2) > 30


def has_phrase(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", text) is not None


# ---------------------------------------------------------------------------------------------- render


@pytest.mark.parametrize("style", STYLES)
def test_render_is_deterministic_per_scene_seed(style):
    scene = sample_scene(np.random.default_rng(0), style=style, count=2, distractors=1)
    first = render(scene).tobytes()
    np.random.seed(123)  # global random state must play no part
    random.seed(123)
    assert render(scene).tobytes() == first
    assert render(sample_scene(np.random.default_rng(0), style=style, count=2, distractors=1)).tobytes() == first
    assert render(dataclasses.replace(scene, seed=scene.seed + 1)).tobytes() != first


def test_render_size_and_mode():
    image = render(sample_scene(np.random.default_rng(1)), size=96)
    assert image.mode == "RGB" and image.size == (96, 96)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_renders_an_object(shape):
    assert object_pixels(lone_object_scene(shape=shape)).sum() > 100


def test_shapes_are_distinguishable():
    masks = {shape: object_pixels(lone_object_scene(shape=shape)) for shape in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.95, (a, b, iou)  # circle and hexagon are close on purpose


@pytest.mark.parametrize("colour", COLOURS)
def test_every_colour_renders_close_to_its_rgb(colour):
    scene = dataclasses.replace(lone_object_scene(colour=colour, shape="square"), background=(0, 128, 255))
    inside = pixels(render(scene))[24:40, 24:40].reshape(-1, 3)
    assert np.abs(inside - np.array(COLOURS[colour])).max() <= 13


@pytest.mark.parametrize("texture", TEXTURES)
def test_every_texture_renders(texture):
    empty = dataclasses.replace(lone_object_scene(texture=texture), objects=())
    spread = pixels(render(empty)).std()
    assert (spread == 0) if texture == "plain" else (spread > 5)
    assert object_pixels(lone_object_scene(texture=texture)).sum() > 100


@pytest.mark.parametrize("style", STYLES)
def test_every_style_renders_an_object(style):
    assert object_pixels(lone_object_scene(style=style)).sum() > 40


def test_styles_look_different():
    images = {style: pixels(render(lone_object_scene(style=style))) for style in STYLES}
    for a in STYLES:
        for b in STYLES:
            if a < b:
                assert np.abs(images[a] - images[b]).mean() > 1, (a, b)


def test_sample_scene_keeps_constraints():
    rng = np.random.default_rng(2)
    for _ in range(20):
        scene = sample_scene(
            rng, shape="heart", colour="teal", size="small", count=3, texture="wavy", style="outline", distractors=1
        )
        main, distractor = scene.objects[:3], scene.objects[3]
        assert all((obj.shape, obj.colour, obj.size) == ("heart", "teal", "small") for obj in main)
        assert distractor.shape != "heart" and distractor.size == "small"
        assert (scene.texture, scene.style, len(scene.objects)) == ("wavy", "outline", 4)
        assert all(0.1 <= obj.x <= 0.9 and 0.1 <= obj.y <= 0.9 for obj in scene.objects)  # small: radius 0.1, wholly inside


def test_sample_scene_style_weights_and_bad_names():
    rng = np.random.default_rng(3)
    styles = {sample_scene(rng, style_weights={"flat": 1.0, "sketch": 0.0}).style for _ in range(30)}
    assert styles == {"flat"}
    for bad in ({"shape": "blob"}, {"colour": "crimson"}, {"style_weights": {"watercolour": 1.0}}, {"count": 4}):
        with pytest.raises(ValueError):
            sample_scene(rng, **bad)


# ---------------------------------------------------------------------------------------------- captions


def assert_caption_matches(text: str, scene: Scene) -> None:
    groups = {(obj.shape, obj.colour, obj.size) for obj in scene.objects}
    for shape in {obj.shape for obj in scene.objects}:
        assert any(has_phrase(text, noun) for pair in SHAPE_NOUNS[shape] for noun in pair), (text, shape)
    # A shade may go by its coarse colour (the vocabulary gap): maroon is also truly "red".
    described_as = {COARSE_COLOUR.get(obj.colour) for obj in scene.objects} | {obj.colour for obj in scene.objects}
    for colour, words in COLOUR_WORDS.items():
        if any(has_phrase(text, word) for word in words):
            assert colour in described_as, (text, colour)
    for size, words in SIZE_WORDS.items():
        if any(has_phrase(text, word) for word in words):
            assert size in {obj.size for obj in scene.objects}, (text, size)
    for style in STYLES:
        if style != scene.style:
            assert not any(phrase in text for phrase in (*STYLE_PREFIXES[style], STYLE_SUFFIXES[style])), (text, style)
    for texture in TEXTURES:
        if texture != scene.texture:
            assert not has_phrase(text, f"{texture} background"), (text, texture)
    if len(groups) == 1:
        count_words = {"two": 2, "pair": 2, "three": 3}
        mentioned = {n for word, n in count_words.items() if has_phrase(text, word)}
        assert mentioned == (set() if len(scene.objects) == 1 else {len(scene.objects)}), text


def test_captions_describe_their_scene():
    rng = np.random.default_rng(4)
    for _ in range(400):
        scene = sample_scene(rng, distractors=int(rng.integers(2)))
        assert_caption_matches(caption(scene, rng), scene)


def test_shades_are_rarely_called_by_their_own_name():
    rng = np.random.default_rng(6)
    own, coarse = 0, 0
    for _ in range(600):
        scene = sample_scene(rng, colour="navy", count=1)
        text = caption(scene, rng)
        own += has_phrase(text, "navy")
        coarse += has_phrase(text, "blue")
    # Colour is mentioned in ~85% of captions; "navy" in FINE_NAME_PROBABILITY of those.
    assert 0.5 * FINE_NAME_PROBABILITY < own / (own + coarse) < 2 * FINE_NAME_PROBABILITY, (own, coarse)
    assert own > 0, "the fine name must still occur, or zero-shot could never know it"


def test_captions_vary():
    scene = sample_scene(np.random.default_rng(5), count=2)
    rng = np.random.default_rng(6)
    texts = {caption(scene, rng) for _ in range(60)}
    assert len(texts) >= 30


def test_caption_counts_in_words():
    rng = np.random.default_rng(7)
    scene = sample_scene(rng, shape="circle", colour="blue", size="small", count=2)
    texts = [caption(scene, rng) for _ in range(100)]
    assert any("two small blue circles" in text for text in texts)
    assert all(has_phrase(text, "two") or has_phrase(text, "pair") for text in texts)


# ---------------------------------------------------------------------------------------------- pairs


def test_make_pair_depends_only_on_seed_and_index():
    image, text = make_pair(3, 17)
    np.random.seed(0)
    again_image, again_text = make_pair(3, 17)
    assert (again_image.tobytes(), again_text) == (image.tobytes(), text)
    assert make_pair(3, 18)[0].tobytes() != image.tobytes()
    assert make_pair(4, 17)[0].tobytes() != image.tobytes()


def test_iter_pairs_resumes_and_shards():
    resumed = next(iter_pairs(3, start_index=17))
    assert (resumed[0].tobytes(), resumed[1]) == (make_pair(3, 17)[0].tobytes(), make_pair(3, 17)[1])
    shard = [text for _, text in islice(iter_pairs(3, start_index=1, stride=2), 3)]
    assert shard == [make_pair(3, index)[1] for index in (1, 3, 5)]


def test_pretraining_holds_out_sketch_and_keeps_rare_styles_rare():
    styles = [sample_pretraining_scene(np.random.default_rng([0, index])).style for index in range(1000)]
    assert "sketch" not in styles
    rare = sum(style in ("pixelated", "noisy") for style in styles) / len(styles)
    assert 0.03 < rare < 0.2
    assert {"shaded", "flat", "outline"} <= set(styles)
    texts = [make_pair(0, index)[1] for index in range(100)]
    assert not any("sketch" in text for text in texts)


def test_pretraining_style_weights_can_be_overridden():
    rng = np.random.default_rng(8)
    assert {sample_pretraining_scene(rng, {"sketch": 1.0}).style for _ in range(10)} == {"sketch"}


# ---------------------------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("name", TASKS)
def test_task_classes_are_sorted_and_scenes_match_their_class(name):
    spec = TASKS[name]
    folders = [class_folder(classname) for classname in spec.classnames]
    assert list(spec.classnames) == sorted(spec.classnames) and folders == sorted(folders)
    assert len(set(spec.classnames)) == len(spec.classnames)
    assert all("{}" in template for template in spec.templates)
    for label, classname in enumerate(spec.classnames):
        scene = spec.scene_for_class(label, np.random.default_rng(label))
        target = scene.objects[0]
        described = {
            "synth_shapes": target.shape,
            "synth_sketch": target.shape,
            "synth_shape_colour": f"{target.colour} {target.shape}",
            "synth_textures": scene.texture,
            "synth_shades": target.colour,
            "synth_swatches": target.colour,
            "synth_swatches_sketch": target.colour,
        }[name]
        assert described == classname
        assert (scene.style == "sketch") == name.endswith("sketch")


def test_required_tasks_and_sizes():
    assert {"synth_shapes", "synth_textures", "synth_shape_colour", "synth_shades", "synth_sketch"} <= set(TASKS)
    # synth_shades holds every shade with a coarse name beside that coarse colour: the gap is what it tests.
    assert set(COARSE_COLOUR) | set(COARSE_COLOUR.values()) == set(TASKS["synth_shades"].classnames)
    assert len(TASKS["synth_shapes"].classnames) >= 12
    assert len(TASKS["synth_shape_colour"].classnames) >= 48
    assert TASKS["synth_sketch"].classnames == TASKS["synth_shapes"].classnames
    for spec in TASKS.values():
        assert sum(spec.images_per_class.values()) * len(spec.classnames) < 5000


def test_sketch_task_is_the_shapes_task_drawn_as_sketches():
    shapes, sketch = TASKS["synth_shapes"], TASKS["synth_sketch"]
    for label in range(len(shapes.classnames)):
        plain = shapes.scene_for_class(label, np.random.default_rng([0, label]))
        sketched = sketch.scene_for_class(label, np.random.default_rng([0, label]))
        assert dataclasses.replace(plain, style="sketch") == sketched


def test_swatches_are_the_shades_alone_and_their_sketch_is_the_same_draws():
    swatches, sketch = TASKS["synth_swatches"], TASKS["synth_swatches_sketch"]
    assert swatches.classnames == sketch.classnames == TASKS["synth_shades"].classnames
    for label in range(len(swatches.classnames)):
        for index in range(20):
            scene = task_scene(swatches, "train", label, index)
            assert [(obj.shape, obj.size) for obj in scene.objects] == [("circle", "large")]
            assert scene.texture == "plain" and scene.style in ("shaded", "flat")
            assert dataclasses.replace(scene, style="sketch") == task_scene(sketch, "train", label, index)


def test_task_scene_is_the_scene_of_the_rendered_file(tmp_path):
    task_dir = materialize("synth_swatches", tmp_path, seed=3, image_size=32, images_per_class=TINY_SPLITS)
    spec = TASKS["synth_swatches"]
    for label, classname in enumerate(spec.classnames[:3]):
        with Image.open(task_dir / "train" / class_folder(classname) / "0001.png") as image:
            assert np.array_equal(pixels(image), pixels(render(task_scene(spec, "train", label, 1, seed=3), 32)))


def test_task_spec_rejects_unsorted_classnames():
    with pytest.raises(ValueError):
        TaskSpec("bad", ("zebra", "apple"), ("a {}.",), lambda label, rng: None, TINY_SPLITS)


def test_materialize_writes_the_task_tree_and_meta(tmp_path):
    task_dir = materialize("synth_textures", tmp_path, seed=5, image_size=32, images_per_class=TINY_SPLITS)
    spec = TASKS["synth_textures"]
    assert task_dir == tmp_path / "synth_textures"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth_textures"]  # no staging left behind
    for split, count in TINY_SPLITS.items():
        folders = sorted(p.name for p in (task_dir / split).iterdir())
        assert folders == [class_folder(name) for name in spec.classnames]
        for folder in folders:
            files = sorted((task_dir / split / folder).iterdir())
            assert [p.name for p in files] == [f"{i:04d}.png" for i in range(count)]
            with Image.open(files[0]) as image:
                assert image.mode == "RGB" and image.size == (32, 32)
    meta = json.loads((task_dir / "meta.json").read_text())
    assert meta == {
        "name": "synth_textures",
        "classnames": list(spec.classnames),
        "templates": list(spec.templates),
        "seed": 5,
        "image_size": 32,
        "counts": TINY_SPLITS,
        "version": TASKS_VERSION,
    }


def test_materialize_is_idempotent_and_rebuilds_on_change(tmp_path, monkeypatch):
    task_dir = materialize("synth_shapes", tmp_path, images_per_class=TINY_SPLITS)
    mtimes = {path: path.stat().st_mtime_ns for path in task_dir.rglob("*")}

    def no_rendering(*args, **kwargs):
        raise AssertionError("a complete task must not be rendered again")

    with monkeypatch.context() as patch:
        patch.setattr(tasks_module, "render", no_rendering)
        assert materialize("synth_shapes", tmp_path, images_per_class=TINY_SPLITS) == task_dir
    assert {path: path.stat().st_mtime_ns for path in task_dir.rglob("*")} == mtimes

    first_image = (task_dir / "test" / "star" / "0000.png").read_bytes()
    materialize("synth_shapes", tmp_path, seed=1, images_per_class=TINY_SPLITS)
    assert json.loads((task_dir / "meta.json").read_text())["seed"] == 1
    assert (task_dir / "test" / "star" / "0000.png").read_bytes() != first_image
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth_shapes"]


def test_materialize_crash_leaves_no_partial_task(tmp_path, monkeypatch):
    complete = materialize("synth_sketch", tmp_path, images_per_class=TINY_SPLITS)
    before = sorted(str(p.relative_to(complete)) for p in complete.rglob("*"))
    calls = []

    def crash_midway(scene, size):
        calls.append(scene)
        if len(calls) > 5:
            raise RuntimeError("simulated crash")
        return render(scene, size)

    monkeypatch.setattr(tasks_module, "render", crash_midway)
    with pytest.raises(RuntimeError):
        materialize("synth_sketch", tmp_path, force=True, images_per_class=TINY_SPLITS)
    with pytest.raises(RuntimeError):
        materialize("synth_shapes", tmp_path, images_per_class=TINY_SPLITS)
    # The old complete task is intact, the crashed new one never appeared, and no staging folder is left.
    assert sorted(str(p.relative_to(complete)) for p in complete.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth_sketch"]


def test_materialize_unknown_task(tmp_path):
    with pytest.raises(KeyError):
        materialize("synth_nothing", tmp_path)
