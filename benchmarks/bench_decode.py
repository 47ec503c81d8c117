"""The decode paths side by side on this machine: generate(), the static step, the static step with refill.

    python benchmarks/bench_decode.py                       # carve-tiny-hard, batch 8 / 32 / 64
    python benchmarks/bench_decode.py --batches 32 --rows 96 --out docs/benchmarks/decode.md \\
        --json docs/benchmarks/decode.json

carve-tiny-hard (models/carve-tiny-hard) captions fresh hard scenes: its captions end when the model
says so (eos), at natural lengths (6 to ~55 tokens), so the rows of a batch finish at different steps.
Per budget (stock, keep 128, keep 64) and batch size B, through one CaptionEngine and one loaded model:

    generate        engine.caption in batches of B, Hugging Face generate() (a batch runs until its
                    longest caption ends)
    static          the static path, B slots, batches of B: the fixed-shape step, no refill
    static+refill   the static path, B slots, all rows in one call: slots refill as captions end

The static step is compiled (`--compile yes`, inductor on a CPU) or run eagerly (`no`); the compile is
paid in a warm-up call before any timing. Settings are interleaved, `--repeats` times, medians kept.
Every setting's captions are checked equal, token for token, to generate()'s.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import environment, header, markdown_table, write_results  # noqa: E402

from carve_tiny.scenes import example  # noqa: E402
from tokencarve.engine import CaptionEngine, EngineConfig  # noqa: E402

MODEL = str(Path(__file__).resolve().parent.parent / "models" / "carve-tiny-hard")
BUDGETS = {"stock": ("none", 64), "keep 128": ("volume", 128), "keep 64": ("volume", 64)}
PATHS = ("generate", "static", "static+refill")


def caption_rows(count: int, seed: int):
    """Fresh hard scenes with the caption prompt (a seed the models were not trained on)."""
    rng = random.Random(seed)
    rows = [example(rng, task="caption", variant="hard") for _ in range(count)]
    return [row[0] for row in rows], [row[3] for row in rows]


def run_setting(engines, path: str, budget: str, batch: int, images, prompts) -> dict:
    """One pass over the rows; returns wall time, decode time and steps, and the captions."""
    method, keep = BUDGETS[budget]
    engine = engines["generate" if path == "generate" else "static", batch]
    step = len(images) if path == "static+refill" else batch
    captions, decode_seconds, steps = [], 0.0, 0
    started = time.perf_counter()
    for first in range(0, len(images), step):
        out = engine.caption(images[first : first + step], prompts[first : first + step], method=method, keep=keep)
        captions += out
        decode_seconds += engine.last_timing.decode_seconds
        # generate() runs every row of a batch until its longest caption ends (the first token comes from prefill)
        steps += engine.decoder.steps if engine.decoder else max(c.generated_tokens for c in out) - 1
    return {"seconds": time.perf_counter() - started, "decode": decode_seconds, "steps": steps, "captions": captions}


def measure(args) -> tuple[list[dict], dict]:
    images, prompts = caption_rows(args.rows, args.seed)
    reference = CaptionEngine(EngineConfig(model=MODEL, decode="generate", max_new_tokens=args.max_new_tokens))
    engines = {}
    for batch in args.batches:
        engines["generate", batch] = reference
        config = EngineConfig(
            model=MODEL, max_new_tokens=args.max_new_tokens, decode_slots=batch, compile_decode=args.compile
        )
        engines["static", batch] = CaptionEngine(config, model=reference.model, processor=reference.processor)
    settings = [(p, b, batch) for batch in args.batches for b in BUDGETS for p in PATHS]
    for path, budget, batch in settings:  # warm-up: compiles every pool shape before any timing
        run_setting(engines, path, budget, batch, images[: 2 * batch], prompts[: 2 * batch])
    results: dict[tuple, list[dict]] = {s: [] for s in settings}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every setting alike
        for setting in settings:
            results[setting].append(run_setting(engines, *setting, images, prompts))
    return summarise(settings, results, args), lengths_of(results)


def summarise(settings, results, args) -> list[dict]:
    rows = []
    for path, budget, batch in settings:
        runs = results[path, budget, batch]
        reference = results["generate", budget, batch][0]["captions"]
        same = all([c.caption for c in run["captions"]] == [c.caption for c in reference] for run in runs)
        seconds = statistics.median(r["seconds"] for r in runs)
        decode = statistics.median(r["decode"] for r in runs)
        steps = runs[0]["steps"]
        rows.append(
            {
                "model": "carve-tiny-hard",
                "batch": batch,
                "budget": budget,
                "decode": path,
                "captions/s": args.rows / seconds,
                "decode s": decode,
                "steps": steps,
                "ms/step": 1000 * decode / steps,
                "same captions": "yes" if same else "NO",
            }
        )
    for row in rows:  # ratios to generate() at the same batch and budget
        base = next(
            r for r in rows if r["decode"] == "generate" and (r["batch"], r["budget"]) == (row["batch"], row["budget"])
        )
        row["x captions/s"] = row["captions/s"] / base["captions/s"]
        row["x ms/step"] = base["ms/step"] / row["ms/step"]
        row["steps saved"] = base["steps"] - row["steps"]
    return rows


def lengths_of(results) -> dict:
    """The caption-length distribution (tokens, eos included) of the stock model's captions."""
    runs = next(runs for (path, budget, _), runs in results.items() if path == "generate" and budget == "stock")
    lengths = sorted(c.generated_tokens for c in runs[0]["captions"])
    pick = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]  # noqa: E731
    return {
        "min": lengths[0],
        "p50": pick(0.5),
        "p95": pick(0.95),
        "max": lengths[-1],
        "mean": statistics.mean(lengths),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="8,32,64", help="batch sizes (= slots), comma-separated")
    p.add_argument("--rows", type=int, default=192, help="captions per setting (a multiple of every batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--compile", choices=["yes", "no"], default="yes", help="compile the static step")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--out", help="write the Markdown here (e.g. docs/benchmarks/decode.md)")
    p.add_argument("--json", help="write the figures here (e.g. docs/benchmarks/decode.json)")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    env = environment("cpu")
    rows, lengths = measure(args)
    columns = [
        "batch",
        "budget",
        "decode",
        "captions/s",
        "x captions/s",
        "ms/step",
        "x ms/step",
        "steps",
        "steps saved",
    ]
    text = "\n".join(
        [
            "# Decode paths on carve-tiny-hard (benchmarks/bench_decode.py)",
            "",
            header(env),
            "",
            f"{args.rows} fresh hard-scene captions per setting (seed {args.seed}), max {args.max_new_tokens} new "
            f"tokens, static step compiled: {args.compile}, median of {args.repeats} interleaved runs. Caption "
            f"lengths (tokens, eos included): min {lengths['min']}, p50 {lengths['p50']}, p95 {lengths['p95']}, "
            f"max {lengths['max']}, mean {lengths['mean']:.1f}. Ratios are to generate() at the same batch and budget. "
            f"Same captions as generate(), token for token, in every setting: "
            f"{'yes' if all(r['same captions'] == 'yes' for r in rows) else 'NO'}.",
            "",
            markdown_table(rows, columns),
        ]
    )
    print(text)
    write_results(
        text,
        {"environment": env, "caption_lengths": lengths, "settings": rows, "args": vars(args)},
        args.out,
        args.json,
    )


if __name__ == "__main__":
    main()
