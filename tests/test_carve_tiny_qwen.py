"""carve-tiny-qwen: native-size corpora, the Qwen2.5-VL-architecture model, its training layout (offline, CPU)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib
import io
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from carve_tiny import data, scenes


def _digest(rows) -> str:
    h = hashlib.sha256()
    for r in rows:
        for key in ("id", "image", "prompt", "answer", "task"):
            h.update(r[key] if isinstance(r[key], bytes) else r[key].encode())
    return h.hexdigest()


def test_default_corpora_are_byte_identical_to_before_native_sizes():
    """Digests taken before `--sizes` existed (24 rows, seed 11): the 336 x 336 path is unchanged."""
    assert _digest(data.rows(24, seed=11)) == "fcaa2b732c8a650f75c9ead92874cca60b5642934d9309ca2b2ea2263b81dbfb"
    assert (
        _digest(data.rows(24, seed=11, scenes="hard"))
        == "70491ea311c86ff12571668083f5812b73eb05bb22dee17f1bae7eb5b83a757b"
    )


def test_native_sizes_keep_answers_and_vary_the_image(tmp_path):
    data.main(["--scenes", "hard", "--sizes", "224-448", "--rows", "36", "--seed", "5", "--out", str(tmp_path)])
    sized = pq.read_table(tmp_path / "shard-00000.parquet").to_pylist()
    plain = list(data.rows(36, seed=5, scenes="hard"))
    for key in ("id", "prompt", "answer", "task"):  # the size draws nothing from the scenes' stream
        assert [r[key] for r in sized] == [r[key] for r in plain]
    dims = [Image.open(io.BytesIO(r["image"])).size for r in sized]
    assert all(224 <= side <= 448 and side % 28 == 0 for size in dims for side in size)
    assert len(set(dims)) > 10 and any(w > h for w, h in dims) and any(w < h for w, h in dims)
    tokens = [(w // 28) * (h // 28) for w, h in dims]  # Qwen2.5-VL: one token per 28 x 28 px
    assert 64 <= min(tokens) < max(tokens) <= 256
    assert sized == list(data.rows(36, seed=5, scenes="hard", sizes=(224, 448)))  # seeded
    with pytest.raises(ValueError, match="multiples of 28"):
        scenes.parse_sizes("200-448")


@pytest.mark.parametrize("size", [(224, 448), (448, 224), (336, 336), (252, 392)])
def test_native_render_puts_every_object_in_its_cell(size):
    """Rendered at the size, not resized: objects in their cell of the 3 x 3 grid of that image, in
    their exact colour (shapes keep their aspect: the radius scales with the shorter side)."""
    rng = random.Random(4)
    width, height = size
    for _ in range(6):
        scene = scenes.random_scene(rng, variant="hard")
        image, mask = scenes.render(scene, rng, with_masks=True, size=size)
        assert image.size == mask.size == size
        pixels, labels = np.asarray(image, dtype=np.float32), np.asarray(mask)
        for k, thing in enumerate(scene.things):
            ys, xs = np.nonzero(labels == k + 1)
            assert len(ys) > 20
            cells = set((3 * ys // height) * 3 + 3 * xs // width)
            assert cells == {thing.cell}
            colour = pixels[ys, xs].mean(0)  # the sensor noise averages out
            assert np.abs(colour - np.array(scenes.COLOURS[thing.colour])).max() < 4
            extent = (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
            if thing.shape in ("circle", "square", "diamond"):
                assert abs(extent[0] - extent[1]) <= 1
