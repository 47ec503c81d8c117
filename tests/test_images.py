"""Image decoding and validation: odd-but-valid inputs decode to RGB, broken ones get a reason."""

import numpy as np
import pytest
from PIL import Image

from tokencarve.images import RowError, decode_image, square

from .bad_images import broken_images, valid_images

LIMIT = 2 * 1024 * 1024  # the tests' byte limit, so "too-many-bytes" stays small


@pytest.mark.parametrize("name,data", list(valid_images().items()))
def test_valid_images_decode_to_rgb(name, data):
    image = decode_image(data, max_bytes=LIMIT)
    assert isinstance(image, Image.Image), image
    assert image.mode == "RGB"
    squared = square(image, 336, (122, 116, 104))
    assert squared.size == (336, 336) and squared.mode == "RGB"


@pytest.mark.parametrize("name", list(broken_images()))
def test_broken_images_get_a_reason(name):
    data, code = broken_images()[name]
    error = decode_image(data, max_bytes=LIMIT, max_pixels=50_000_000)
    assert isinstance(error, RowError) and error.code == code, error
    assert str(error).startswith(code + ": ")


def test_wrong_type_and_pixel_limit():
    assert decode_image(12345).code == "wrong_type"
    big = valid_images()["wide-3000x4"]
    assert decode_image(big, max_pixels=1000).code == "too_many_pixels"


def test_sixteen_bit_grey_is_scaled_not_clipped():
    image = decode_image(valid_images()["grey16-png"])
    values = sorted(set(np.asarray(image.convert("L")).ravel().tolist()))
    assert values[0] < 10 and values[-1] > 245 and len(values) > 100


def test_alpha_is_composited_on_white():
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    import io

    buffer = io.BytesIO()
    transparent.save(buffer, "PNG")
    assert decode_image(buffer.getvalue()).getpixel((0, 0)) == (255, 255, 255)
