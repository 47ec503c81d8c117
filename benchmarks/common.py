"""What every benchmark shares: the environment header, a synchronised timer, how results are written,
and the caption lengths a random-weight model is given.

A benchmark prints its table and, when asked (`--out`, `--json`), writes its own results file; none
edits a hand-written document (docs/BENCHMARKS.md links to, or quotes, the files these write).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def environment(device: str = "cpu") -> dict:
    """Machine, date and versions: what a figure is only meaningful next to."""
    import transformers

    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({_cpu_name()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = "cpu"
    return env


def header(env: dict) -> str:
    """The environment as the Markdown line under a benchmark's title."""
    return "; ".join(f"{key} {value}" for key, value in env.items())


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, device: str = "cpu", warmup: int = 1) -> float:
    """The median wall time of `fn()` over `repeats` runs after `warmup` ones, the device synchronised."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(text: str, figures: dict, out: str | None, json_path: str | None) -> None:
    """The Markdown to `out` and the figures to `json_path`, each only if asked for."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n")


# The natural caption-length distribution: a random-weight model never ends a caption itself, so a
# benchmark gives row i its own length, drawn once from this log-normal (p95 ~ 49, mean ~ 23 tokens:
# short web-style captions with a long tail), rounded and clipped to [LENGTH_MIN, max new tokens].
LENGTH_MEDIAN, LENGTH_SIGMA, LENGTH_MIN = 20, 0.55, 4


def caption_lengths(count: int, max_new_tokens: int, mode: str, seed: int) -> list[int]:
    """Each row's output length: the cap (fixed) or a seeded draw of the log-normal above (natural)."""
    if mode == "fixed":
        return [max_new_tokens] * count
    rng = random.Random(seed)
    draws = (rng.lognormvariate(math.log(LENGTH_MEDIAN), LENGTH_SIGMA) for _ in range(count))
    return [min(max_new_tokens, max(LENGTH_MIN, round(d))) for d in draws]


def describe_lengths(max_new_tokens: int) -> str:
    """The natural distribution in words, for a report."""
    return f"log-normal, median {LENGTH_MEDIAN}, sigma {LENGTH_SIGMA}, clipped to [{LENGTH_MIN}, {max_new_tokens}]"


def length_summary(lengths: list[int]) -> dict:
    """min, p50, p95, max and mean of caption lengths (tokens)."""
    ordered = sorted(lengths)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "min": ordered[0],
        "p50": pick(0.5),
        "p95": pick(0.95),
        "max": ordered[-1],
        "mean": statistics.mean(ordered),
    }


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
