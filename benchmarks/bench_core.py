"""CPU benchmark of the TokenCarve library on a tiny LLaVA: prefill, generate and the carve step.

    python benchmarks/bench_core.py [--model PATH] [--batch 4] [--new-tokens 32] [--repeats 5]

All settings run in one process, interleaved, so the ratios compare like with like. Without
--model the script builds a random tiny LLaVA (576 visual tokens per image, 4-layer Llama);
speed does not depend on the weight values. Prints Markdown tables (see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py

from common import environment, header, median_seconds  # noqa: E402

import tokencarve  # noqa: E402
from tokencarve import CarveConfig, carve_tokens, information_scores  # noqa: E402
from tokencarve.testing import IMAGE_TOKEN, tiny_llava  # noqa: E402

BUDGETS = [None, 192, 128, 64]  # None: the stock model


def make_inputs(model, batch: int, text_tokens: int = 40):
    n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    vocab = model.config.text_config.vocab_size
    text = torch.randint(3, min(vocab, IMAGE_TOKEN), (batch, text_tokens), generator=g)
    ids = torch.cat([text[:, :8], torch.full((batch, n), model.config.image_token_id), text[:, 8:]], 1)
    pixels = torch.randn(batch, 3, 336, 336, generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)


def bench_model(model, batch: int, new_tokens: int, repeats: int) -> list[dict]:
    inputs = make_inputs(model, batch)
    rows = []
    for keep in BUDGETS:
        if keep is not None:
            tokencarve.apply(model, CarveConfig(keep=keep))
        with torch.no_grad():
            prefill = median_seconds(lambda: model(**inputs, use_cache=True), repeats)
            gen = median_seconds(
                lambda: model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False),
                repeats,
            )
            model(**inputs, use_cache=True)
        stats = model.tokencarve.last_stats if keep is not None else None
        rows.append(
            dict(
                keep=keep or 576,
                prefill=prefill,
                generate=gen,
                kv=stats.kv_cache_bytes if stats else None,
                carve=stats.carve_seconds if stats else 0.0,
            )
        )
        if keep is not None:
            tokencarve.remove(model)
    kv_stock = rows[1]["kv"] and tokencarve_kv_uncompressed(model, inputs)
    for row in rows:
        row["kv"] = row["kv"] or kv_stock
    return rows


def tokencarve_kv_uncompressed(model, inputs) -> int:
    tokencarve.apply(model, CarveConfig(keep=None))
    with torch.no_grad():
        model(**inputs, use_cache=True)
    kv = model.tokencarve.last_stats.kv_cache_bytes
    tokencarve.remove(model)
    return kv


def reference_information_scores(hidden: torch.Tensor) -> torch.Tensor:
    """The reference's way: full SVD in float32 with full_matrices (a D x D V computed, unused)."""
    u, s, _ = torch.linalg.svd(hidden.float(), full_matrices=True)
    return (u[..., : s.shape[-1]].abs() * s.unsqueeze(-2)).sum(-1)


def bench_carve_step(repeats: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for batch, dim in [(1, 64), (8, 64), (1, 4096), (8, 4096)]:
        hidden = torch.randn(batch, 576, dim, generator=g)
        attention = torch.rand(batch, 576, generator=g).softmax(-1)
        rows.append(
            dict(
                batch=batch,
                dim=dim,
                ours_scores=median_seconds(lambda: information_scores(hidden), repeats),
                reference_scores=median_seconds(lambda: reference_information_scores(hidden), max(1, repeats // 2)),
                ours_carve=median_seconds(lambda: carve_tokens(hidden, attention, 128), repeats),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local LLaVA folder (default: a random tiny LLaVA)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = LlavaForConditionalGeneration.from_pretrained(args.model).eval() if args.model else tiny_llava()

    print("# TokenCarve CPU benchmark\n")
    print(header(environment("cpu")))
    print(f"\nmodel: {args.model or 'random tiny LLaVA (CLIP 336/14, Llama 4x64)'}, fp32, SDPA")
    print(f"\n## Model: batch {args.batch}, 1 image + 40 text tokens each, {args.new_tokens} new tokens\n")
    print(
        "| visual tokens | prefill ms | vs stock | generate ms | vs stock | KV cache KiB | vs stock | carve step ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = bench_model(model, args.batch, args.new_tokens, args.repeats)
    stock = rows[0]
    for row in rows:
        print(
            f"| {row['keep']} | {row['prefill'] * 1e3:.1f} | {row['prefill'] / stock['prefill']:.2f}x "
            f"| {row['generate'] * 1e3:.1f} | {row['generate'] / stock['generate']:.2f}x "
            f"| {row['kv'] / 1024:.0f} | {row['kv'] / stock['kv']:.2f}x | {row['carve'] * 1e3:.2f} |"
        )

    print("\n## Carve step alone: N = 576 tokens, keep 128 (information score: ours vs reference-style SVD)\n")
    print(
        "| batch | D | ours: Gram eigh (float64) ms | reference: full SVD (float32, full_matrices) ms | speedup | whole carve_tokens ms |"
    )
    print("|---|---|---|---|---|---|")
    for row in bench_carve_step(args.repeats):
        print(
            f"| {row['batch']} | {row['dim']} | {row['ours_scores'] * 1e3:.2f} | {row['reference_scores'] * 1e3:.1f} "
            f"| {row['reference_scores'] / row['ours_scores']:.1f}x | {row['ours_carve'] * 1e3:.2f} |"
        )


if __name__ == "__main__":
    main()
