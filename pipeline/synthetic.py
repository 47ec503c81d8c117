"""Synthetic corpora in img2dataset's layouts, for the tests and the data-plane benchmark.

Most rows carry no image (img2dataset writes such rows for URLs that failed to download): they go
through every stage of the job but the model, so millions of rows cost seconds. Every
`real_every`-th row carries a small real image, which keeps the model in the loop.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image


def small_png(seed: int, side: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def shard_table(shard: int, rows: int, real_every: int = 0) -> pa.Table:
    """One img2dataset-style Parquet shard: key, jpg (bytes or null), url, caption, width."""
    keys = [f"{shard:05d}{i:06d}" for i in range(rows)]
    image = small_png(shard) if real_every else None
    images = [image if real_every and i % real_every == 0 else None for i in range(rows)]
    return pa.table(
        {
            "key": keys,
            "jpg": pa.array(images, pa.binary()),
            "url": [f"https://example.com/{k}.jpg" for k in keys],
            "caption": [f"alt text {k}" for k in keys],
            "width": pa.array(np.full(rows, 24), pa.int64()),
        }
    )


def write_parquet_corpus(
    location: str, shards: int, rows_per_shard: int, real_every: int = 0, filesystem: pafs.FileSystem | None = None
) -> int:
    """Write `shards` Parquet shards under `location` (a local folder, or a path on `filesystem`)."""
    fs = filesystem or pafs.LocalFileSystem()
    fs.create_dir(location, recursive=True)
    for shard in range(shards):
        pq.write_table(
            shard_table(shard, rows_per_shard, real_every),
            f"{location}/{shard:05d}.parquet",
            filesystem=fs,
            row_group_size=min(rows_per_shard, 4096),
        )
    return shards * rows_per_shard


def tar_bytes(samples: list[dict[str, bytes]]) -> bytes:
    """A WebDataset tar: each sample a dict of member suffix -> bytes, plus `__key__`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for sample in samples:
            for suffix, data in sample.items():
                if suffix == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def img2dataset_samples(shard: int, rows: int) -> list[dict[str, bytes]]:
    """img2dataset's WebDataset members: .jpg, .txt (the alt-text), .json (key, url, caption, ...)."""
    samples = []
    for i in range(rows):
        key = f"{shard:05d}{i:04d}"
        meta = {"key": key, "url": f"https://example.com/{key}.jpg", "caption": f"alt {key}", "width": 24}
        samples.append(
            {
                "__key__": key,
                "jpg": small_png(shard * 1000 + i),
                "txt": f"alt {key}".encode(),
                "json": json.dumps(meta).encode(),
            }
        )
    return samples
