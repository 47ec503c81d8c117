"""Captions/s of a fixed budget and an adaptive one of the same mean, through the engine, on this machine.

    python benchmarks/bench_adaptive.py --out docs/benchmarks/adaptive.md --json docs/benchmarks/adaptive.json
    python benchmarks/bench_adaptive.py --models carve-tiny-hard --rows 32 --repeats 1     # a quick look

Per model (the bundled trained carve-tiny and carve-tiny-hard: their captions end at their own eos, so
rows of one batch finish at different steps, as a corpus' do): fresh caption scenes of the model's own
variant; an adaptive budget `auto:<mean>` calibrated as the job calibrates it, on the first
--calibration-rows scenes, then the next --rows scenes captioned under `volume` at the fixed budget
<mean> and at the adaptive one, each by its own engine (its own slot pool: a pool never shrinks, so a
shared one would hand the fixed budget the adaptive one's capacity), in calls of --block rows through
--slots decode slots (the static path with refill, as a job's actor runs a block). Settings are
interleaved, --repeats times, after one untimed warm-up call each; medians kept.

What a variable count costs: rows of one prefill chunk are padded to its longest kept row in the
layers after the cut ("prefill pad": the share of the positions those layers run on that are padding,
measured from each prefill's kept prompt lengths), and the slot pool's capacity (every decode step
attends over all of it) is set by the longest row it has held. The table shows both, with prefill and
decode seconds, decode steps and ms per step, next to the kept counts' mean / p50 / p95 / max. Each
mean in --means is one pair of settings (a larger mean's adaptive rows can need a larger pool).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import environment, header, markdown_table, write_results  # noqa: E402

import tokencarve  # noqa: E402
from carve_tiny.scenes import example  # noqa: E402
from tokencarve import load_llava  # noqa: E402
from tokencarve.budgets import Adaptive  # noqa: E402
from tokencarve.engine import CaptionEngine, EngineConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"carve-tiny": "simple", "carve-tiny-hard": "hard"}  # model -> its scene variant
COLUMNS = [
    "model",
    "budget",
    "captions/s",
    "vs fixed",
    "kept mean",
    "kept p50",
    "kept p95",
    "kept max",
    "generated tokens",
    "prefill s",
    "carve s",
    "decode s",
    "steps",
    "ms/step",
    "prefill pad",
    "pool capacity",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {','.join(MODELS)}")
    p.add_argument("--means", default="64,96", help="fixed budgets, and the adaptive ones' means (comma-separated)")
    p.add_argument("--rows", type=int, default=192, help="timed rows per setting and repeat")
    p.add_argument("--calibration-rows", type=int, default=EngineConfig.calibration_rows)
    p.add_argument("--block", type=int, default=64, help="rows per engine.caption() call (a job's block)")
    p.add_argument("--slots", type=int, default=16, help="decode slots (--decode-slots)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=2719, help="the scenes' (one no model was trained or evaluated on)")
    p.add_argument("--out", help="write the Markdown table here")
    p.add_argument("--json", help="write the figures here")
    return p.parse_args(argv)


def scenes(count: int, variant: str, seed: int):
    rng = random.Random(seed)
    rows = [example(rng, task="caption", variant=variant) for _ in range(count)]
    return [row[0] for row in rows], [row[3] for row in rows]


def percentile(values: list[int], q: float) -> int:
    """Nearest rank: the smallest value with at least a share q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class PrefillPadding:
    """Counts, over every prefill forward, the positions the layers after the cut run on and how many of
    them are padding (a row shorter than its chunk's longest kept row): a hook after the language
    model's forward, where the carver's figures of that forward are final. Decode steps call the
    layers directly, so only prefills are seen."""

    def __init__(self, model):
        self.carver, self.padded, self.total = model.tokencarve, 0, 0
        self.carver.language_model.register_forward_hook(self._count)

    def _count(self, module, args, output):
        kept = self.carver.last_stats.prompt_tokens_kept
        self.padded += len(kept) * max(kept) - sum(kept)
        self.total += len(kept) * max(kept)

    def share(self) -> float:
        return self.padded / self.total if self.total else 0.0


def timed(engine: CaptionEngine, images, prompts, keep, block: int, padding: PrefillPadding) -> dict:
    """One pass over the rows in calls of `block`: wall time and where it went."""
    captions, prefill, carve, decode, steps = [], 0.0, 0.0, 0.0, 0
    padding.padded = padding.total = 0
    started = time.perf_counter()
    for start in range(0, len(images), block):
        rows = slice(start, start + block)
        captions += engine.caption(images[rows], prompts[rows], keep=keep)
        prefill += engine.last_timing.prefill_seconds
        carve += engine.last_timing.carve_seconds
        decode += engine.last_timing.decode_seconds
        steps += engine.decoder.stats.steps
    seconds = time.perf_counter() - started
    kept = [c.visual_tokens_kept for c in captions]
    return {
        "seconds": seconds,
        "prefill_s": prefill,
        "carve_s": carve,
        "decode_s": decode,
        "steps": steps,
        "kept": kept,
        "generated": sum(c.generated_tokens for c in captions),
        "capacity": engine.decoder.pool.capacity,
        "pad": padding.share(),
    }


def measure(name: str, mean: int, model, processor, padding, images, prompts, args) -> list[dict]:
    """Fixed `mean` and auto:<mean> on one model, each through its own engine, interleaved."""
    config = EngineConfig(
        model=name, method="volume", keep=mean, max_new_tokens=args.max_new_tokens, decode_slots=args.slots
    )
    fixed, adaptive = CaptionEngine(config, model, processor), CaptionEngine(config, model, processor)
    sample = slice(0, args.calibration_rows)
    budget = adaptive.calibrate(images[sample], prompts[sample], Adaptive(mean=mean))
    print(f"{name}: {budget} (calibrated on {args.calibration_rows} scenes)", file=sys.stderr)
    settings = {f"fixed {mean}": (fixed, mean), str(budget.uncalibrated): (adaptive, budget)}
    timed_images, timed_prompts = images[args.calibration_rows :], prompts[args.calibration_rows :]
    for engine, keep in settings.values():  # warm-up: the pools' shapes, the allocator
        timed(engine, timed_images[: args.block], timed_prompts[: args.block], keep, args.block, padding)
    runs = {label: [] for label in settings}
    for _ in range(args.repeats):
        for label, (engine, keep) in settings.items():
            runs[label].append(timed(engine, timed_images, timed_prompts, keep, args.block, padding))
    rows = []
    for label, measured in runs.items():
        median = lambda key: statistics.median(r[key] for r in measured)  # noqa: E731
        kept, steps, decode = measured[0]["kept"], measured[0]["steps"], median("decode_s")
        rows.append(
            {
                "model": name,
                "budget": label,
                "tau": budget.tau if label != f"fixed {mean}" else None,
                "captions/s": args.rows / median("seconds"),
                "kept mean": statistics.mean(kept),
                "kept p50": percentile(kept, 0.5),
                "kept p95": percentile(kept, 0.95),
                "kept max": max(kept),
                "generated tokens": measured[0]["generated"],
                "prefill s": median("prefill_s"),
                "carve s": median("carve_s"),
                "decode s": decode,
                "steps": steps,
                "ms/step": 1000 * decode / steps,
                "prefill pad": f"{100 * measured[0]['pad']:.1f} %",
                "pool capacity": measured[0]["capacity"],
                "seconds": [r["seconds"] for r in measured],
            }
        )
    rows[1]["vs fixed"] = f"{rows[1]['captions/s'] / rows[0]['captions/s']:.3f}x"
    rows[0]["vs fixed"] = "1x"
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment()
    rows = []
    for name in args.models.split(","):
        images, prompts = scenes(args.calibration_rows + args.rows, MODELS[name], args.seed)
        model, processor = load_llava(str(ROOT / "models" / name), "cpu", "auto")
        tokencarve.apply(model)  # the engines find it applied; the padding hook needs the carver first
        padding = PrefillPadding(model)
        for mean in (int(m) for m in args.means.split(",")):
            rows += measure(name, mean, model, processor, padding, images, prompts, args)
    text = (
        f"Device: {header(env)}; command: `python benchmarks/{Path(__file__).name} "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        f"{args.rows} fresh caption scenes per model (seed {args.seed}, after the {args.calibration_rows} each "
        f"adaptive budget is calibrated on), `volume`, calls of {args.block} rows through {args.slots} decode "
        f"slots (static path, refill), at most {args.max_new_tokens} new tokens, median of {args.repeats} "
        f"interleaved runs\n\n{markdown_table(rows, COLUMNS)}"
    )
    print(text)
    figures = {"environment": env, "arguments": vars(args), "results": rows}
    write_results(text, figures, args.out, args.json)
    return figures


if __name__ == "__main__":
    main()
