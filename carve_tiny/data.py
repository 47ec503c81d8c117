"""Write generated scene corpora as Parquet shards (read them with tokencarve.eval.read_parquet).

    python -m carve_tiny.data --rows 300 --seed 7 --out data/sample --shard-rows 150
    python -m carve_tiny.data --scenes hard --rows 600 --seed 1234 --out results/hard-eval   # carve-tiny-hard's scenes
    python -m carve_tiny.data --scenes hard --sizes 224-448 --rows 120 --seed 7 --out data/sample-qwen   # native sizes

Columns: id (string), image (PNG bytes, 336 x 336 RGB; with --sizes LOW-HIGH each image's width and
height are drawn independently from the multiples of 28 px in that range, and the scene is rendered
natively at that size: carve-tiny-qwen's corpora), prompt (the question, without the chat
template), answer, task. Tasks come round-robin (caption, colour, count, exist, position, ocr, ...),
so every task type is equally represented, and existence questions alternate yes / no; each row has
its own scene. The same seed and row count give byte-identical shards.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .scenes import TASKS, VARIANTS, draw_size, example, parse_sizes, png_bytes

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("prompt", pa.string()),
        ("answer", pa.string()),
        ("task", pa.string()),
    ]
)


def size_rng(seed: int) -> random.Random:
    """The image sizes' own stream: drawing sizes leaves the scenes' stream (so every answer) as it is."""
    return random.Random(f"{seed}-sizes")


def rows(
    count: int, seed: int, tasks=TASKS, scenes: str = "simple", sizes: tuple[int, int] | None = None
) -> Iterator[dict]:
    rng, sizing = random.Random(seed), size_rng(seed)
    for i in range(count):
        # exist questions alternate yes / no: an exact 50/50 split, as in POPE
        yes = (i // len(tasks)) % 2 == 0
        size = draw_size(sizing, sizes) if sizes else None
        image, _, task, prompt, answer = example(rng, tasks[i % len(tasks)], exist_yes=yes, variant=scenes, size=size)
        yield {"id": f"s{seed}-{i:07d}", "image": png_bytes(image), "prompt": prompt, "answer": answer, "task": task}


def write_corpus(
    out: str | Path,
    count: int,
    seed: int,
    shard_rows: int = 1000,
    scenes: str = "simple",
    sizes: tuple[int, int] | None = None,
) -> list[Path]:
    """Write `count` rows of `scenes` ("simple" or "hard") as shard-00000.parquet, ... under `out`;
    `sizes` (low, high): native-size images (see `rows`), None: 336 x 336."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths, shard = [], []
    for row in rows(count, seed, scenes=scenes, sizes=sizes):
        shard.append(row)
        if len(shard) == shard_rows:
            paths.append(_write_shard(out, len(paths), shard))
            shard = []
    if shard:
        paths.append(_write_shard(out, len(paths), shard))
    return paths


def _write_shard(out: Path, index: int, shard: list[dict]) -> Path:
    path = out / f"shard-{index:05d}.parquet"
    pq.write_table(pa.Table.from_pylist(shard, schema=SCHEMA), path, compression="zstd")
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shard-rows", type=int, default=1000)
    p.add_argument("--scenes", choices=sorted(VARIANTS), default="simple", help="scene variant (carve_tiny.scenes)")
    p.add_argument(
        "--sizes",
        type=parse_sizes,
        default=None,
        help="LOW-HIGH px (e.g. 224-448): each image's width and height drawn from the multiples of 28 in "
        "that range, rendered natively (default: 336 x 336)",
    )
    args = p.parse_args(argv)
    for path in write_corpus(args.out, args.rows, args.seed, args.shard_rows, args.scenes, args.sizes):
        print(path)


if __name__ == "__main__":
    main()
