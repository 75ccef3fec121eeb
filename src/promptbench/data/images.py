"""Image decoding: Pillow, always RGB, and a clear error that names the file."""

from __future__ import annotations

from PIL import Image, UnidentifiedImageError

from promptbench.errors import PromptbenchError


class BadImageError(PromptbenchError):
    def __init__(self, message: str):
        # A DataLoader worker re-raises us with its formatted traceback as the message: keep our own line.
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)

    @classmethod
    def for_file(cls, path: str, reason: str) -> "BadImageError":
        return cls(
            f"cannot read image {path}: {reason}. Fix or remove the file, or set dataset.skip_bad_images=true "
            f"to skip unreadable images (they are counted in results.json)."
        )


def load_rgb(path: str) -> Image.Image:
    """Decode any Pillow-readable image (grayscale, palette, RGBA, CMYK) to RGB."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == "RGB":
                return image.copy()
            if image.mode in ("P", "LA", "PA") or (image.mode == "RGBA"):
                # Composite transparency on white, as a viewer shows it, instead of on black garbage.
                rgba = image.convert("RGBA")
                canvas = Image.new("RGB", rgba.size, (255, 255, 255))
                canvas.paste(rgba, mask=rgba.getchannel("A"))
                return canvas
            return image.convert("RGB")
    except FileNotFoundError:
        raise BadImageError.for_file(path, "file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise BadImageError.for_file(path, f"{type(error).__name__}: {error}") from None
