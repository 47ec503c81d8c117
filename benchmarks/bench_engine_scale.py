"""The engine's default path at scale: what a job's actor runs, with every default, on >= 1,000 rows.

    python benchmarks/bench_engine_scale.py --scale 7b --rows 1024 --out $OUT/engine-scale.md --json $OUT/engine-scale.json
    python benchmarks/bench_engine_scale.py --scale tiny --rows 48 --keep 64     # the same code on a CPU, seconds

LLaVA-1.5's architecture with random weights (gpu_models.py: "7b" is LLaVA-1.5-7B's sizes, bf16 on a GPU)
and the word-level processor of bench_decode.random_llava15, through `CaptionEngine` with the job's
defaults: the static path, compiled on a GPU (`compile_decode=auto`), DEFAULT_SLOTS slots in the default
KV-cache budget, and ROWS_PER_SLOT x slots rows per call (the job's default block). Rows have prompts of
6-55 random words and their own caption lengths drawn from common.caption_lengths' natural distribution
(the random model never ends a caption: row i stops at its length L_i, passed per row). Reported: the
engine's warm-up (pool allocation and every compiled shape), shapes compiled against the allowance,
eager fallbacks, the pool's bytes against its budget, peak device memory, captions/s and tokens/s, and
whether every row generated exactly its length (no row failed).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_decode import filler_word_processor, scene_images  # noqa: E402
from common import caption_lengths, describe_lengths, environment, header, markdown_table, write_results  # noqa: E402
from gpu_models import ARCHITECTURES  # noqa: E402

from pipeline.job import ROWS_PER_SLOT  # noqa: E402
from tokencarve.decode import shape_count  # noqa: E402
from tokencarve.engine import CaptionEngine, EngineConfig, parse_budget  # noqa: E402


def build(scale: str, device: str, dtype: torch.dtype):
    """LLaVA-1.5 at `scale`, random weights, and a processor whose every generated token is one word."""
    model = ARCHITECTURES["llava-1.5"].build(scale, device, dtype)
    return model, filler_word_processor(model)


def peak_memory(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=["7b", "tiny"], default="7b")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--keep", default="64", help="the budget (a count, a fraction, auto:N) or 'stock'")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    env = environment(device)
    model, processor = build(args.scale, device, dtype)
    stock = args.keep == "stock"
    config = EngineConfig(
        model=f"llava-1.5-{args.scale}-random",
        method="none" if stock else EngineConfig.__dataclass_fields__["method"].default,
        keep=64 if stock else parse_budget(args.keep),
        max_new_tokens=args.max_new_tokens,
    )
    started = time.perf_counter()
    engine = CaptionEngine(config, model=model, processor=processor)  # the warm-up happens here
    ready = time.perf_counter() - started
    decoder = engine.decoder
    stats = decoder.stats
    allowance = shape_count(decoder.shape, decoder.slots, decoder.budget, decoder.features) if decoder.compile else 0
    images, _ = scene_images(min(args.rows, 64), args.seed)  # the pixels do not change the speed: reused
    rng = random.Random(args.seed)
    prompts = [" ".join(f"w{rng.randrange(4, 32000)}" for _ in range(rng.randint(6, 55))) for _ in range(args.rows)]
    lengths = caption_lengths(args.rows, args.max_new_tokens, "natural", args.seed)
    block = ROWS_PER_SLOT * decoder.slots
    exact, generated = True, 0
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    begun = time.perf_counter()
    for first in range(0, args.rows, block):
        rows = range(first, min(first + block, args.rows))
        captions = engine.caption(
            [images[i % len(images)] for i in rows],
            [prompts[i] for i in rows],
            max_new_tokens=[lengths[i] for i in rows],
        )
        exact &= [c.generated_tokens for c in captions] == [lengths[i] for i in rows]
        generated += sum(c.generated_tokens for c in captions)
    seconds = time.perf_counter() - begun
    figures = {
        "rows": args.rows,
        "budget": "stock" if stock else args.keep,
        "slots": decoder.slots,
        "rows per call": block,
        "capacity": decoder.pool.capacity,
        "compiled": decoder.compile,
        "engine ready s": round(ready, 1),
        "warm-up s": round(stats.warmup_seconds, 1),
        "shapes compiled": stats.shapes_compiled,
        "shape allowance": allowance,
        "eager fallbacks": stats.eager_fallbacks,
        "relayouts": stats.relayouts,
        "pool GiB": round(stats.peak_pool_bytes / 2**30, 3),
        "budget GiB": round(stats.budget_bytes / 2**30, 3),
        "peak memory GiB": round(peak_memory(device) / 2**30, 2),
        "captions/s": round(args.rows / seconds, 2),
        "tokens/s": round(generated / seconds, 1),
        "every row its length": exact,
    }
    text = (
        f"# The engine's default path at scale\n\n{header(env)}\n\n"
        f"LLaVA-1.5 architecture at scale `{args.scale}` (random weights, {dtype}), {args.rows} rows, prompts of "
        f"6-55 words, lengths {describe_lengths(args.max_new_tokens)}, every engine default.\n\n"
        + markdown_table([figures], list(figures))
        + "\n"
    )
    print(text)
    write_results(text, {"env": env, "figures": figures}, args.out, args.json)
    return figures


if __name__ == "__main__":
    main()
