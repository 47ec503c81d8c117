"""Pipeline throughput with and without TokenCarve, on the same corpus, in one Ray session.

    python benchmarks/bench_pipeline.py [--input data/sample] [--model models/carve-tiny] [--repeats 2]

Runs jobs/caption_corpus.py's pipeline once per setting (stock, then TokenCarve budgets), each into a
fresh output folder, alternating settings across repeats, and prints rows/s, visual tokens/s
(visual tokens entering the model per second) and KV bytes as a Markdown table with ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/common.py

import ray  # noqa: E402
from common import environment, header  # noqa: E402

from jobs.caption_corpus import build_job, parse_args, ray_address  # noqa: E402
from pipeline.batch import run  # noqa: E402

SETTINGS = [("none", None), ("tokencarve", 128), ("tokencarve", 64)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    known, rest = parser.parse_known_args()
    args = parse_args(rest)  # the job's own options (--input, --model, --batch-size, ...)
    base = build_job(args)
    ray.init(address=ray_address(args.address), log_to_driver=False)
    results: dict[tuple, list[dict]] = {s: [] for s in SETTINGS}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(known.repeats):
            for method, keep in SETTINGS:
                engine = replace(base.engine, method=method, keep=keep or base.engine.keep)
                job = replace(base, engine=engine, output=f"{scratch}/{method}-{keep}-{repeat}")
                results[(method, keep)].append(run(job))

    print("# Pipeline benchmark\n")
    print(header(environment(base.engine.device or "cpu")))
    print(
        f"\n{ray.cluster_resources().get('CPU', 0):.0f} CPUs for Ray, "
        f"{ray.cluster_resources().get('GPU', 0):.0f} GPUs; model {base.engine.model}; "
        f"input {base.inputs}; batch {base.batch_size}, {base.max_actors} actor(s), "
        f"{base.engine.max_new_tokens} max new tokens; median of {known.repeats} runs per setting\n"
    )
    print("| setting | rows | rows/s | vs stock | visual tokens/s | visual tokens kept | KV bytes held | vs stock |")
    print("|---|---|---|---|---|---|---|---|")
    stock = None
    for (method, keep), runs in results.items():
        rate = statistics.median(r["rows_per_s"] for r in runs)
        last = runs[-1]
        tokens_rate = rate * last["visual_tokens_in"] / max(last["rows_ok"], 1)
        stock = stock or (rate, last["kv_bytes_held"])
        label = "stock (--no-carve)" if method == "none" else f"TokenCarve keep={keep}"
        print(
            f"| {label} | {last['rows_total']} | {rate:.2f} | {rate / stock[0]:.2f}x | {tokens_rate:.0f} "
            f"| {last['visual_tokens_kept_pct']}% | {last['kv_bytes_held'] / 2**20:.1f} MiB "
            f"| {last['kv_bytes_held'] / stock[1]:.2f}x |"
        )


if __name__ == "__main__":
    main()
