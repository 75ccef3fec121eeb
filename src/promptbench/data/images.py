"""Image decoding: Pillow, always 8-bit RGB holding the values the file means, and a clear error that names the file.

Pillow's own `convert("RGB")` clips deeper pixels to 0..255 (a 16-bit image comes out almost all white), so
these modes follow fixed rules instead:

- 16-bit unsigned (`I;16`, `I;16L`, `I;16B`, `I;16N`: 16-bit grayscale PNG and TIFF): scaled by the type's
  range, 65535 -> 255.
- 32-bit signed `I` (32-bit TIFF; older Pillow versions open 16-bit PNGs as `I` too): an image whose values
  all lie in 0..255 is taken as 8-bit data, one with values up to 65535 as 16-bit data (scaled by 65535).
- 32-bit float `F`: an image whose values all lie in [0, 1] is scaled by 255, one within [0, 255] is taken
  as it is.
- Transparency (`LA`, `PA`, `RGBA`, palettes with transparent entries): composited on white, as a viewer
  shows it, instead of on black.
Every other mode is converted by Pillow (CMYK and YCbCr by their standard formulas, LAB to sRGB by LittleCMS).
`I` and `F` images outside those ranges (negative, beyond 16 bits, NaN) and modes without a known mapping
raise BadImageError naming the mode: no fixed scale gives them meaningful 8-bit values.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError

from promptbench.errors import PromptbenchError

UINT8_MAX = 255
UINT16_MAX = 65535
# Modes whose conversion by Pillow keeps their meaning (CMYK and YCbCr by the standard formulas, LAB by LittleCMS).
PILLOW_RGB_MODES = frozenset({"1", "L", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
# Modes with an alpha band, and "P", whose palette may hold transparent entries.
TRANSPARENT_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa", "P"})
UNSIGNED_16_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class BadImageError(PromptbenchError):
    def __init__(self, message: str, reason: str = ""):
        # A DataLoader worker re-raises us with its formatted traceback as the message: keep our own line.
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)
        # What is wrong with the file, without the advice around it (for lists of skipped files).
        self.reason = reason

    @classmethod
    def for_file(cls, path: str, reason: str) -> "BadImageError":
        return cls(
            f"cannot read image {path}: {reason}. Fix or remove the file, or set dataset.skip_bad_images=true "
            f"to skip unreadable images (they are counted in results.json).",
            reason,
        )


def load_rgb(path: str) -> Image.Image:
    """Decode any Pillow-readable image to 8-bit RGB (deep and transparent modes: the module docstring's rules)."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image, path)
    except FileNotFoundError:
        raise BadImageError.for_file(path, "file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise BadImageError.for_file(path, f"{type(error).__name__}: {error}") from None


def to_rgb(image: Image.Image, path: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in TRANSPARENT_MODES:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if mode in PILLOW_RGB_MODES:
        return image.convert("RGB")
    if mode in UNSIGNED_16_BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(deep_to_uint8(np.asarray(image), mode, path)).convert("RGB")
    raise BadImageError.for_file(path, f"Pillow opens it in mode {mode}, which has no known mapping to RGB; "
                                       f"save it as an 8-bit RGB or grayscale image")


def deep_to_uint8(values: np.ndarray, mode: str, path: str) -> np.ndarray:
    """The one channel of a 16-bit, 32-bit integer or float image in 0..255 (rules: module docstring)."""
    if mode in UNSIGNED_16_BIT_MODES:
        scale = UINT16_MAX
    else:
        low, high = values.min(), values.max()
        if mode == "I" and 0 <= low and high <= UINT16_MAX:
            scale = UINT8_MAX if high <= UINT8_MAX else UINT16_MAX
        elif mode == "F" and 0 <= low and high <= UINT8_MAX:
            scale = 1.0 if high <= 1.0 else UINT8_MAX
        else:
            raise BadImageError.for_file(
                path,
                f"its mode {mode} pixels range from {low} to {high}, which no fixed scale maps to 8 bits (integer "
                f"images must lie in 0..{UINT16_MAX}, float images in [0, 1] or [0, {UINT8_MAX}]); save it as an "
                f"8- or 16-bit image",
            )
    return np.rint(values.astype(np.float64) * (UINT8_MAX / scale)).astype(np.uint8)
