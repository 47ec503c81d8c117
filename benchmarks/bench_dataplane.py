"""Data-plane benchmark: the real job on corpora of growing size, first run and resume, with the peak
resident memory of the driver and of the Ray worker processes.

    python benchmarks/bench_dataplane.py [--sizes 10000 100000 1000000] [--out docs/benchmarks/dataplane.md]

Prints the report as Markdown; `--out` also writes it to a file (nothing is written unless asked).

Each corpus is img2dataset-style Parquet shards of 10,000 rows (key, jpg, url, caption). Most rows have no
image (a failed download), so millions of rows go through reading, checking, writing and the books
without the model dominating; every 5,000th row is a real image, captioned by the bundled carve-tiny.
Each (size, phase) runs in a fresh process with a fresh local Ray (2 CPUs), so every peak is its own.
"resume" reruns into the same output after half of the unit records are deleted: those shards are
re-checked (their rows read back by id columns only) and the rest skipped from the listing.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/common.py

ROWS_PER_SHARD = 10_000
REAL_EVERY = 5_000


def worker_peaks(seen: dict[int, int]) -> None:
    """Record each Ray worker process' peak RSS (VmHWM, kB) by pid."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            cmdline = (status.parent / "cmdline").read_bytes()
            if not cmdline.startswith(b"ray::"):
                continue
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    pid = int(status.parent.name)
                    seen[pid] = max(seen.get(pid, 0), int(line.split()[1]))
        except (OSError, ValueError):
            continue


def child(args) -> None:
    """One run of the job in this process; prints a JSON line of figures."""
    import ray

    from jobs.caption_corpus import build_job, parse_args
    from pipeline.batch import run

    job = build_job(
        parse_args(
            [
                "--input",
                args.input,
                "--output",
                args.output,
                "--model",
                str(ROOT / "models" / "carve-tiny"),
                "--keep",
                "64",
                "--max-new-tokens",
                "16",
                "--carry",
                "url,caption",
                "--progress-every",
                "0",
            ]
        )
    )
    ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)
    seen: dict[int, int] = {}
    stop = threading.Event()

    def sample():
        while not stop.wait(0.5):
            worker_peaks(seen)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    summary = run(job)
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    worker_peaks(seen)
    ray.shutdown()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rows_total": summary["rows_total"],
                "rows_this_run": summary["rows_this_run"],
                "rows_ok": summary["rows_ok"],
                "units": summary["units_total"],
                "driver_peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "worker_peak_kb": max(seen.values(), default=0),
                "workers": len(seen),
            }
        )
    )


def measure(corpus: str, output: str) -> dict:
    command = [sys.executable, __file__, "--child", "--input", corpus, "--output", output]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def drop_half_the_records(output: str) -> None:
    records = sorted((Path(output) / "_units").glob("*.json"))
    for record in records[::2]:
        record.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--out", help="also write the report here (e.g. docs/benchmarks/dataplane.md)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import pyarrow
    import ray
    from common import environment, header, write_results

    from pipeline.synthetic import write_parquet_corpus

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            corpus, output = f"{scratch}/corpus-{size}", f"{scratch}/out-{size}"
            write_parquet_corpus(corpus, max(size // ROWS_PER_SHARD, 1), min(size, ROWS_PER_SHARD), REAL_EVERY)
            first = measure(corpus, output)
            drop_half_the_records(output)
            resumed = measure(corpus, output)
            results.append((size, first, resumed))
            print(f"{size:,} rows: first {first['seconds']:.1f} s, resume {resumed['seconds']:.1f} s", file=sys.stderr)
            shutil.rmtree(corpus)
            shutil.rmtree(output)

    lines = [
        "# Data-plane benchmark",
        "",
        header(environment("cpu") | {"ray": ray.__version__, "pyarrow": pyarrow.__version__}),
        "",
        "2 CPUs for Ray (a fresh local Ray per run). "
        f"Shards of {ROWS_PER_SHARD:,} rows; one row in {REAL_EVERY:,} is a real image captioned by carve-tiny "
        f"(keep=64, 16 new tokens), the others have no image. `resume`: a rerun after half the unit records "
        f"were deleted (those shards re-checked, the rest skipped).",
        "",
        "| rows | run | seconds | rows/s | driver peak RSS | Ray worker peak RSS (largest process) | worker processes |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, first, resumed in results:
        for phase, r in (("first", first), ("resume", resumed)):
            rate = r["rows_this_run"] / r["seconds"] if phase == "first" else r["rows_total"] / r["seconds"]
            lines.append(
                f"| {size:,} | {phase} | {r['seconds']:.1f} | {rate:,.0f} | {r['driver_peak_kb'] / 1024:.0f} MiB "
                f"| {r['worker_peak_kb'] / 1024:.0f} MiB | {r['workers']} |"
            )
    if len(results) >= 2:
        lines += [
            "",
            "Slope between consecutive sizes (peak bytes per added row; a per-row structure would show as a "
            "constant positive slope):",
            "",
        ]
        for (small, a, ar), (large, b, br) in zip(results, results[1:]):
            slopes = [
                f"{name} {(y[key] - x[key]) * 1024 / (large - small):+.2f} B/row"
                for name, x, y in (
                    ("first run: driver", a, b),
                    ("workers", a, b),
                    ("resume: driver", ar, br),
                    ("workers", ar, br),
                )
                for key in ["driver_peak_kb" if name.endswith("driver") else "worker_peak_kb"]
            ]
            lines.append(f"- {small:,} -> {large:,}: " + ", ".join(slopes))
    lines.append("")
    lines.append("(The rows/s of a resume counts every row of the output: skipped and re-checked.)")
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(text, {"sizes": [{"rows": n, "first": a, "resume": b} for n, a, b in results]}, args.out, args.json)


if __name__ == "__main__":
    main()
