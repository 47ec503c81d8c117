"""What each token-selection method costs at LLaVA-1.5-7B size, against the prefill it shortens.

    python benchmarks/bench_selection.py                          # this machine (CPU, or a GPU if present)
    python benchmarks/bench_selection.py --out docs/benchmarks/selection.md --json docs/benchmarks/selection.json

Every method of tokencarve.METHODS runs `reduce_tokens` on the same [B, 576, 4096] hidden states
(LLaVA-1.5-7B's width; values drawn like LLM hidden states: a few dominant directions, per-channel
outliers) at budgets 128 and 64, in one process, interleaved, median of `--repeats`. The share of
prefill divides by the prefill this device would need for the same images: the LLaVA-1.5-7B prefill's
FLOPs (vision tower + projector + 32 decoder layers on 60 text + 576 visual tokens) over this device's
measured dense GEMM rate at the same precision (float32 here, bf16 on a GPU), an optimistic prefill
time, so the share is if anything overstated.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py

from common import environment, header, median_seconds, write_results  # noqa: E402

import tokencarve  # noqa: E402
from tokencarve import reduce_tokens  # noqa: E402
from tokencarve.selection import square_grid  # noqa: E402
from tokencarve.testing import llava15_config  # noqa: E402

SEVEN_B = llava15_config("7b")
TOKENS, WIDTH, TEXT = 576, SEVEN_B.text_config.hidden_size, 60
BUDGETS = (128, 64)


def hidden_states(batch: int, device: str, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(batch, 8, WIDTH, generator=g) * torch.logspace(1, 0, 8).view(1, 8, 1)
    hidden = torch.randn(batch, TOKENS, 8, generator=g) @ directions + torch.randn(batch, TOKENS, WIDTH, generator=g)
    hidden[..., torch.randperm(WIDTH, generator=g)[:4]] += 50.0  # per-channel outliers
    attention = torch.randn(batch, TOKENS, generator=g).mul(2).softmax(-1)
    return hidden.to(device, dtype), attention.to(device)


def prefill_flops_per_image() -> float:
    """Multiply-adds x 2 of one LLaVA-1.5-7B prefill: CLIP ViT-L/14-336 (24 x 1024, 577 tokens),
    the projector, and 32 Llama layers (4096, MLP 11008) on TEXT + 576 tokens (causal attention)."""

    def transformer(layers, width, mlp, tokens, mlp_matrices, causal):
        dense = 2 * tokens * (4 * width * width + mlp_matrices * width * mlp)
        attention = 2 * 2 * tokens * tokens * width * (0.5 if causal else 1.0)
        return layers * (dense + attention)

    v, t = SEVEN_B.vision_config, SEVEN_B.text_config
    vision = transformer(v.num_hidden_layers, v.hidden_size, v.intermediate_size, TOKENS + 1, 2, causal=False)
    projector = 2 * TOKENS * (v.hidden_size * t.hidden_size + t.hidden_size * t.hidden_size)
    decoder = transformer(t.num_hidden_layers, t.hidden_size, t.intermediate_size, TEXT + TOKENS, 3, causal=True)
    return vision + projector + decoder


def gemm_rate(device: str, dtype) -> float:
    """Dense matmul FLOP/s on this device at this precision (4096^3, median)."""
    a = torch.randn(4096, 4096, device=device, dtype=dtype)
    seconds = median_seconds(lambda: a @ a, 5, device)
    return 2 * 4096**3 / seconds


def run(batches, repeats: int, device: str, dtype) -> tuple[list[dict], float]:
    prefill_seconds = prefill_flops_per_image() / gemm_rate(device, dtype)
    rows = []
    for batch in batches:
        hidden, attention = hidden_states(batch, device, dtype)
        # LLaVA-1.5's 24 x 24 grid, which volume-spatial and pool read (the others ignore it)
        grid = square_grid(math.isqrt(TOKENS), batch, device)
        for keep in BUDGETS:
            for method in tokencarve.METHODS:
                seconds = median_seconds(
                    lambda: reduce_tokens(hidden, attention, keep, method=method, grid=grid), repeats, device
                )
                rows.append(
                    dict(
                        batch=batch,
                        keep=keep,
                        method=method,
                        ms=seconds * 1e3,
                        share=seconds / (prefill_seconds * batch),
                    )
                )
    return rows, prefill_seconds


def report(rows, prefill_seconds, env, dtype, repeats) -> str:
    lines = [
        header(env),
        "",
        f"Hidden states [B, {TOKENS}, {WIDTH}] {str(dtype).removeprefix('torch.')}; median of {repeats}; "
        f"prefill estimate {prefill_seconds * 1e3:.0f} ms per image (LLaVA-1.5-7B FLOPs / this device's GEMM rate); "
        "command: `python benchmarks/bench_selection.py`",
        "",
        "| method | " + " | ".join(f"B={b}, keep {k}: ms (share of prefill)" for b, k in _columns(rows)) + " |",
        "|---|" + "---|" * len(_columns(rows)),
    ]
    for method in tokencarve.METHODS:
        cells = []
        for batch, keep in _columns(rows):
            r = next(r for r in rows if (r["method"], r["batch"], r["keep"]) == (method, batch, keep))
            cells.append(f"{r['ms']:.1f} ({100 * r['share']:.2f} %)")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _columns(rows):
    return sorted({(r["batch"], r["keep"]) for r in rows}, key=lambda c: (c[0], -c[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="also write the table to this Markdown file")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows, prefill = run([int(b) for b in args.batches.split(",")], args.repeats, device, dtype)
    env = environment(device)
    text = report(rows, prefill, env, dtype, args.repeats)
    print(text)
    figures = {"environment": env, "prefill_seconds_per_image": prefill, "rows": rows, "args": vars(args)}
    write_results(text, figures, args.out, args.json)


if __name__ == "__main__":
    main()
