"""The captioning job with its defaults against the defaults it had before refill was the default.

    python benchmarks/bench_job_defaults.py --out docs/benchmarks/job-defaults.md --json docs/benchmarks/job-defaults.json
    python benchmarks/bench_job_defaults.py --rows 64 --repeats 1        # a quick look

Both settings run the real job (`jobs/caption_corpus.py`, a local Ray, the bundled carve-tiny-hard) on
one corpus of fresh hard-scene caption rows (natural lengths: each caption ends at the model's eos),
into a fresh output each run, interleaved `--repeats` times; the job's own rows/s (its summary: the
captioning run, without Ray's start-up) is compared, median against median:

    before      the defaults until 2026-12-06: 8 rows per engine call, as many decode slots as rows
                (`--batch-size 8 --decode-slots 8`): a call's rows wait for its longest one
    default     no options: DEFAULT_SLOTS slots and ROWS_PER_SLOT x that many rows per call, so that a
                finished row's slot is refilled from the same call

Both run on this code, so the comparison is of the defaults alone. Every run's captions are checked
to be the same row for row (greedy decoding: the setting changes the speed, not the captions).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from common import environment, header, markdown_table, write_results  # noqa: E402

from carve_tiny.data import SCHEMA, rows  # noqa: E402
from pipeline.job import ROWS_PER_SLOT  # noqa: E402
from tokencarve.engine import DEFAULT_SLOTS  # noqa: E402

MODEL = ROOT / "models" / "carve-tiny-hard"
SETTINGS = {"before": ["--batch-size", "8", "--decode-slots", "8"], "default": []}
TARGET = 1.2  # issue 38: the default job >= 1.2x the old default's captions/s


def run_job(corpus: Path, output: Path, options: list[str], max_new_tokens: int) -> dict:
    command = [
        sys.executable, str(ROOT / "jobs" / "caption_corpus.py"), "--input", str(corpus), "--output", str(output),
        "--model", str(MODEL), "--progress-every", "0", "--max-new-tokens", str(max_new_tokens), *options,
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=3600)
    return json.loads(done.stdout[done.stdout.index("{") :])


def write_captions(folder: Path, count: int, seed: int) -> None:
    """One shard of `count` fresh hard scenes, every row asking for a caption (1-9 objects each: captions
    of 3 to ~60 tokens)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(list(rows(count, seed, tasks=("caption",), scenes="hard")), schema=SCHEMA)
    pq.write_table(table, folder / "shard-00000.parquet")


def captions(output: Path) -> list[tuple]:
    import pyarrow.parquet as pq

    table = pq.read_table(output, columns=["source_file", "source_row", "caption"])
    return sorted(zip(*(table.column(c).to_pylist() for c in ("source_file", "source_row", "caption"))))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    env = environment()
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / "corpus"
        write_captions(corpus, args.rows, args.seed)
        rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
        seen = None
        for repeat in range(args.repeats):
            for name, options in SETTINGS.items():
                output = Path(scratch) / f"out-{name}-{repeat}"
                summary = run_job(corpus, output, options, args.max_new_tokens)
                rates[name].append(summary["rows_per_s"])
                got = captions(output)
                if seen is not None and got != seen:
                    raise SystemExit(f"{name} (run {repeat}) wrote other captions than the first run")
                seen = got
    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratio = medians["default"] / medians["before"]
    rows = [
        {
            "setting": name,
            "options": " ".join(options)
            or f"(none: {DEFAULT_SLOTS['cpu']} slots, {ROWS_PER_SLOT * DEFAULT_SLOTS['cpu']} rows per call)",
            "rows/s (median)": round(medians[name], 2),
            "runs": ", ".join(f"{v:.2f}" for v in rates[name]),
            "vs before": round(medians[name] / medians["before"], 2),
        }
        for name, options in SETTINGS.items()
    ]
    text = (
        f"# The job's defaults\n\n{header(env)}\n\n"
        f"carve-tiny-hard, {args.rows} fresh hard-scene caption rows (seed {args.seed}, natural lengths: each "
        f"ends at the model's eos, at most {args.max_new_tokens} tokens), the real job on a local Ray, "
        f"{args.repeats} interleaved runs each; captions identical across every run.\n\n"
        + markdown_table(rows, list(rows[0]))
        + f"\n\ndefault / before: {ratio:.2f}x (target >= {TARGET}x: {'met' if ratio >= TARGET else 'missed'})\n"
    )
    print(text)
    write_results(text, {"env": env, "rates": rates, "medians": medians, "ratio": ratio}, args.out, args.json)


if __name__ == "__main__":
    main()
