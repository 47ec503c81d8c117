"""Decode and validate untrusted image bytes: every input becomes an RGB square or a clear reason.

Used by the batch pipeline's CPU stage and by the Serve endpoint, so that both accept and reject
exactly the same inputs. Nothing here raises for bad data: callers get a `RowError` value.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Limits a demanding user can override; defaults fit LLaVA-style captioning at 336 px.
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 64_000_000  # 64 MP; Pillow's decompression-bomb guard trips at 2x this


@dataclass(frozen=True)
class RowError:
    """Why one input row gets no caption (an image that cannot be used, a prompt too long, ...).
    `code` is stable and low-cardinality (a metrics label, the output's `error_code`); `message` is
    for people (`error_message`)."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def decode_image(
    data,
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Image.Image | RowError:
    """Bytes of any format Pillow reads -> an RGB image (first frame, EXIF orientation applied)."""
    if data is None:
        return RowError("missing_image", "the row has no image")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return RowError("wrong_type", f"expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        return RowError("empty_image", "the image has zero bytes")
    if len(data) > max_bytes:
        return RowError("image_too_large", f"{len(data)} bytes is over the limit of {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(bytes(data)))
            width, height = image.size
            if width * height > max_pixels:
                return RowError("too_many_pixels", f"{width}x{height} is over the limit of {max_pixels} pixels")
            image.seek(0)  # animated images: the first frame
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return RowError("decompression_bomb", str(err))
    except OSError as err:
        reason = "truncated_image" if "truncated" in str(err).lower() else "undecodable_image"
        return RowError(reason, str(err) or type(err).__name__)
    except Exception as err:  # Pillow raises many types on hostile input (SyntaxError, ValueError, ...)
        return RowError("undecodable_image", f"{type(err).__name__}: {err}")
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: EXIF rotation, alpha composited on white, 16-bit and float scaled."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit grey: scale to 8 bits, don't clip
        values = np.asarray(image.convert("F"))
        peak = float(values.max()) if values.size else 0.0
        scale = 255.0 / peak if peak > 255 else 1.0
        image = Image.fromarray((values * scale).clip(0, 255).astype(np.uint8), mode="L")
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def square(image: Image.Image, size: int, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's `pad` preprocessing: pad to a square with `fill`, then resize to size x size.
    Keeps the whole image (no centre crop), and turns extreme aspect ratios into a bounded input."""
    width, height = image.size
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas.resize((size, size), Image.Resampling.BICUBIC)


# Truncated files must fail, not be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
