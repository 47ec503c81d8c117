"""Images of every kind a corpus throws at the pipeline: valid odd ones and broken ones."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1))


def animated_gif() -> bytes:
    frames = [Image.new("P", (40, 40), i) for i in (10, 200, 90)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def png_bomb(side: int = 30_000) -> bytes:
    """A valid 1-bit PNG header claiming side x side pixels, with a tiny compressed body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * (side // 8 + 1) * 8, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def valid_images() -> dict[str, bytes]:
    """Valid inputs in modes and shapes Pillow reads; each must be captioned."""
    base = gradient(120, 90)
    grey16 = Image.fromarray((np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16))
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    return {
        "rgb-jpeg": encode(base, "JPEG"),
        "cmyk-jpeg": encode(base.convert("CMYK"), "JPEG"),
        "grey16-png": encode(grey16, "PNG"),
        "palette-png": encode(base.convert("P"), "PNG"),
        "rgba-png": encode(rgba, "PNG"),
        "la-png": encode(base.convert("LA"), "PNG"),
        "animated-gif": animated_gif(),
        "webp": encode(base, "WEBP"),
        "bmp": encode(base, "BMP"),
        "tiny-1x1": encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "wide-3000x4": encode(gradient(3000, 4), "PNG"),
        "tall-4x3000": encode(gradient(4, 3000), "PNG"),
        "square-336": encode(gradient(336, 336), "PNG"),
    }


def broken_images() -> dict[str, tuple[object, str]]:
    """Broken inputs and the error code each must produce."""
    png = encode(gradient(200, 200), "PNG")
    return {
        "undecodable": (b"this is not an image at all", "undecodable_image"),
        "truncated-png": (png[: len(png) // 2], "truncated_image"),
        "zero-bytes": (b"", "empty_image"),
        "missing": (None, "missing_image"),
        "bomb": (png_bomb(), "decompression_bomb"),
        "too-many-bytes": (b"\xff\xd8" + b"\x00" * (3 * 1024 * 1024), "image_too_large"),
    }
