"""Write generated scene corpora as Parquet shards: id, image (PNG bytes), prompt, answer, task.

    python -m carve_tiny.data --rows 300 --seed 7 --out data/sample --shard-rows 150

Tasks come round-robin, so every task type is equally represented; the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .scenes import TASKS, example, png_bytes

SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("prompt", pa.string()),
                    ("answer", pa.string()), ("task", pa.string())])


def rows(count: int, seed: int, tasks=TASKS):
    rng = random.Random(seed)
    for i in range(count):
        task = tasks[i % len(tasks)]
        image, _, task, prompt, answer = example(rng, task)
        yield {"id": f"s{seed}-{i:07d}", "image": png_bytes(image), "prompt": prompt, "answer": answer, "task": task}


def write_corpus(out: str | Path, count: int, seed: int, shard_rows: int = 1000) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths, shard = [], []
    for row in rows(count, seed):
        shard.append(row)
        if len(shard) == shard_rows:
            paths.append(_write_shard(out, len(paths), shard))
            shard = []
    if shard:
        paths.append(_write_shard(out, len(paths), shard))
    return paths


def _write_shard(out: Path, index: int, shard: list[dict]) -> Path:
    path = out / f"shard-{index:05d}.parquet"
    pq.write_table(pa.Table.from_pylist(shard, schema=SCHEMA), path)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shard-rows", type=int, default=1000)
    args = p.parse_args(argv)
    for path in write_corpus(args.out, args.rows, args.seed, args.shard_rows):
        print(path)


if __name__ == "__main__":
    main()
