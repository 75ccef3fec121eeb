"""Datasets, image decoding and few-shot sampling."""

from __future__ import annotations

import random
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageCms

from conftest import COLOURS, draw_disc, write_split_dataset
from promptbench.data.datasets import FolderDataset
from promptbench.data.fewshot import sample_fewshot, val_shots
from promptbench.data.images import BadImageError, load_rgb, to_rgb
from promptbench.data.items import Item
from promptbench.errors import PromptbenchError
from promptbench.protocols import FewShot


def test_folder_dataset_reads_split_folders(toy_root):
    dataset = FolderDataset(toy_root)
    assert dataset.classnames == sorted(COLOURS)
    assert [len(dataset[s]) for s in ("train", "val", "test")] == [24, 9, 18]
    for item in dataset["test"].items:
        assert dataset.classnames[item.label] == item.classname
        assert f"/{item.classname}/" in item.path


def test_single_folder_is_split_deterministically(tmp_path):
    rng = random.Random(1)
    for name, rgb in COLOURS.items():
        (tmp_path / name).mkdir()
        for index in range(10):
            draw_disc(rgb, rng).save(tmp_path / name / f"{index}.png")
    first, second = FolderDataset(tmp_path), FolderDataset(tmp_path)
    assert [len(first[s]) for s in ("train", "val", "test")] == [15, 6, 9]
    assert first["train"].items == second["train"].items
    paths = [{i.path for i in first[s].items} for s in ("train", "val", "test")]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])


def test_missing_root_says_how_to_fix(tmp_path):
    with pytest.raises(PromptbenchError, match=r"does not exist\. Set dataset\.root="):
        FolderDataset(tmp_path / "nowhere")


def decoded(path) -> np.ndarray:
    image = load_rgb(str(path))
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def gray(values) -> np.ndarray:
    """The RGB pixels of one row of gray values."""
    return np.repeat(np.asarray(values, dtype=int)[None, :, None], 3, axis=2)


def on_white(values, alpha) -> np.ndarray:
    values, alpha = np.asarray(values, dtype=float), np.asarray(alpha, dtype=float)[..., None] / 255
    return np.rint(values * alpha + 255 * (1 - alpha)).astype(int)


ROW = [0, 1, 64, 128, 200, 255]
ALPHA = [255, 0, 128, 255, 64, 255]
COLOURS_ROW = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 100, 200), (0, 0, 0), (255, 255, 255)]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_8_bit_modes_decode_to_their_values(tmp_path, suffix):
    row = np.array([ROW], dtype=np.uint8)
    colours = np.array([COLOURS_ROW], dtype=np.uint8)
    alpha = np.array([ALPHA], dtype=np.uint8)
    cases = {
        "1": (Image.fromarray(row > 100), gray([0, 0, 0, 255, 255, 255])),
        "L": (Image.fromarray(row), gray(ROW)),
        "LA": (Image.fromarray(np.stack([row, alpha], axis=-1), "LA"), on_white(gray(ROW), alpha)),
        "RGB": (Image.fromarray(colours), colours.astype(int)),
        "RGBA": (Image.fromarray(np.concatenate([colours, alpha[..., None]], axis=-1)), on_white(colours, alpha)),
        "P": (Image.fromarray(colours).quantize(8), colours.astype(int)),
    }
    if suffix == ".png":  # a transparent palette entry (PNG's tRNS chunk; TIFF has none)
        transparent = Image.fromarray(colours).quantize(8)
        transparent.info["transparency"] = transparent.getpixel((0, 0))  # the entry of pure red
        cases["P with transparency"] = (transparent, np.array([[(255, 255, 255), *COLOURS_ROW[1:]]]))
    else:  # a palette with an alpha band (PNG cannot hold one)
        with_alpha = Image.fromarray(colours).quantize(8).convert("PA")
        with_alpha.putalpha(Image.fromarray(alpha))
        cases["PA"] = (with_alpha, on_white(colours, alpha))
    for name, (image, expected) in cases.items():
        path = tmp_path / f"{name}{suffix}"
        image.save(path, **image.info)
        np.testing.assert_allclose(decoded(path), expected, atol=1, err_msg=name)


def test_colour_conversions_follow_their_standard_formulas(tmp_path):
    cmyk = np.array([[(0, 0, 0, 0), (255, 0, 0, 0), (0, 128, 0, 0), (0, 0, 0, 255), (40, 80, 120, 60)]], dtype=np.uint8)
    c, m, y, k = (cmyk[..., i].astype(float) for i in range(4))
    expected_rgb = np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], axis=-1) / 255
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    np.testing.assert_allclose(decoded(tmp_path / "cmyk.tif"), expected_rgb, atol=1)
    # JPEG, where CMYK files usually come from, is lossy: a flat patch of one colour.
    Image.new("CMYK", (16, 16), (40, 80, 120, 60)).save(tmp_path / "cmyk.jpg", quality=100)
    flat = np.broadcast_to(expected_rgb[0, -1], (16, 16, 3))
    np.testing.assert_allclose(decoded(tmp_path / "cmyk.jpg"), flat, atol=3)

    ycbcr = np.array([[(0, 128, 128), (255, 128, 128), (81, 90, 240), (145, 54, 34), (41, 240, 110)]], dtype=np.uint8)
    luma, cb, cr = (ycbcr[..., i].astype(float) for i in range(3))
    jfif = np.stack([luma + 1.402 * (cr - 128), luma - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                     luma + 1.772 * (cb - 128)], axis=-1).clip(0, 255)
    Image.fromarray(ycbcr, "YCbCr").save(tmp_path / "ycbcr.tif")
    np.testing.assert_allclose(decoded(tmp_path / "ycbcr.tif"), jfif, atol=2)

    # LAB grays (L* 0, 50, 100; a* = b* = 0) are sRGB 0, 119, 255; colours survive 8-bit LAB roughly.
    lab_grays = np.array([[(0, 0, 0), (128, 0, 0), (255, 0, 0)]], dtype=np.uint8)
    Image.frombytes("LAB", (3, 1), lab_grays.tobytes()).save(tmp_path / "lab_grays.tif")
    np.testing.assert_allclose(decoded(tmp_path / "lab_grays.tif"), gray([0, 119, 255]), atol=2)
    srgb, lab = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
    colours = Image.fromarray(np.array([COLOURS_ROW], dtype=np.uint8))
    ImageCms.applyTransform(colours, ImageCms.buildTransform(srgb, lab, "RGB", "LAB")).save(tmp_path / "lab.tif")
    np.testing.assert_allclose(decoded(tmp_path / "lab.tif"), np.array([COLOURS_ROW]), atol=25)


SIXTEEN_BIT = [0, 257, 1000, 32896, 50000, 65535]


@pytest.mark.parametrize("dtype, suffix", [("<u2", ".png"), ("<u2", ".tif"), (">u2", ".png"), (">u2", ".tif")])
def test_16_bit_images_scale_by_their_range(tmp_path, dtype, suffix):
    """16-bit grayscale (I;16, I;16B) maps 65535 to 255; Pillow's own conversion clips it almost all to white."""
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(np.array([SIXTEEN_BIT], dtype=dtype)).save(path)
    assert Image.open(path).mode.startswith("I;16")
    np.testing.assert_array_equal(decoded(path), gray([0, 1, 4, 128, 195, 255]))


def test_little_endian_16_bit_mode_scales_by_its_range(tmp_path):
    raw = np.array([SIXTEEN_BIT], dtype="<u2").tobytes()
    Image.frombytes("I;16L", (len(SIXTEEN_BIT), 1), raw).save(tmp_path / "deep.tif")
    np.testing.assert_array_equal(decoded(tmp_path / "deep.tif"), gray([0, 1, 4, 128, 195, 255]))


def test_32_bit_integer_images_are_8_or_16_bit_data(tmp_path):
    """Mode I: values within 0..255 are 8-bit data, values up to 65535 16-bit data; anything else is refused."""
    for name, values, expected in (("eight", [0, 10, 128, 255], [0, 10, 128, 255]),
                                   ("sixteen", [0, 257, 32896, 65535], [0, 1, 128, 255])):
        Image.fromarray(np.array([values], dtype=np.int32)).save(tmp_path / f"{name}.tif")
        assert Image.open(tmp_path / f"{name}.tif").mode == "I"
        np.testing.assert_array_equal(decoded(tmp_path / f"{name}.tif"), gray(expected), err_msg=name)
    for name, values in (("negative", [-5, 0, 100]), ("wide", [0, 70000])):
        Image.fromarray(np.array([values], dtype=np.int32)).save(tmp_path / f"{name}.tif")
        with pytest.raises(BadImageError, match=rf"{name}\.tif: its mode I pixels range from"):
            load_rgb(str(tmp_path / f"{name}.tif"))


def test_float_images_are_unit_or_8_bit_ranges(tmp_path):
    """Mode F: values within [0, 1] are scaled by 255, values within [0, 255] kept; anything else is refused."""
    for name, values, expected in (("unit", [0.0, 0.25, 0.5, 1.0], [0, 64, 128, 255]),
                                   ("eight", [0.0, 12.4, 200.0, 255.0], [0, 12, 200, 255])):
        Image.fromarray(np.array([values], dtype=np.float32)).save(tmp_path / f"{name}.tif")
        assert Image.open(tmp_path / f"{name}.tif").mode == "F"
        np.testing.assert_array_equal(decoded(tmp_path / f"{name}.tif"), gray(expected), err_msg=name)
    for name, values in (("negative", [-0.5, 0.5]), ("wide", [0.0, 300.0]), ("nan", [0.0, float("nan")])):
        Image.fromarray(np.array([values], dtype=np.float32)).save(tmp_path / f"{name}.tif")
        with pytest.raises(BadImageError, match=rf"{name}\.tif: its mode F pixels range from"):
            load_rgb(str(tmp_path / f"{name}.tif"))


def test_a_mode_without_a_mapping_is_refused_by_name():
    with pytest.raises(BadImageError, match=r"x\.png: Pillow opens it in mode BGR;32, which has no known mapping"):
        to_rgb(SimpleNamespace(mode="BGR;32"), "x.png")


def test_corrupt_and_missing_images_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(BadImageError, match="broken.png"):
        load_rgb(str(bad))
    with pytest.raises(BadImageError, match="file not found"):
        load_rgb(str(tmp_path / "absent.png"))


def reference_generate_fewshot(data_source: list[Item], num_shots: int) -> list[Item]:
    """Dassl's DatasetBase.generate_fewshot_dataset (repeat=False), restated independently."""
    tracker = defaultdict(list)
    for item in data_source:
        tracker[item.label].append(item)
    dataset = []
    for label, items in tracker.items():
        if len(items) >= num_shots:
            sampled_items = random.sample(items, num_shots)
        else:
            sampled_items = items
        dataset.extend(sampled_items)
    return dataset


def shuffled_items(n_classes=7, per_class=(3, 9), seed=5) -> list[Item]:
    rng = random.Random(seed)
    items = [Item(f"/d/{c}/{i}.jpg", c, f"class{c}") for c in range(n_classes) for i in range(rng.randint(*per_class))]
    rng.shuffle(items)  # labels appear in a non-sorted order, as in real split files
    return items


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fewshot_sampling_matches_the_reference(shots, seed):
    train, val = shuffled_items(seed=seed), shuffled_items(seed=seed + 100)
    random.seed(seed)
    expected_train = reference_generate_fewshot(train, shots)
    expected_val = reference_generate_fewshot(val, min(shots, 4))
    rng = random.Random(seed)
    assert sample_fewshot(train, shots, rng) == expected_train
    assert sample_fewshot(val, val_shots(shots), rng) == expected_val


def test_fewshot_protocol_continues_one_stream_from_the_run_seed(toy_root):
    dataset = FolderDataset(toy_root)
    random.seed(3)
    task = FewShot().build(dataset, 2)
    random.seed(3)
    expected_train = reference_generate_fewshot(dataset["train"].items, 2)
    expected_val = reference_generate_fewshot(dataset["val"].items, 2)
    assert task.train.items == expected_train and task.val.items == expected_val
    assert task.evals["test"].items == dataset["test"].items


def test_all_shots_and_bad_shots():
    items = shuffled_items()
    assert sample_fewshot(items, -1) == items
    with pytest.raises(PromptbenchError, match="shots must be >= 0"):
        sample_fewshot(items, -3)
