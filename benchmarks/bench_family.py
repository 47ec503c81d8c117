"""CPU benchmark of TokenCarve on each model family, at small size: carved vs stock.

    python benchmarks/bench_family.py [--batch 4] [--new-tokens 8] [--repeats 2] [--threads 1]

Random tiny models (speed does not depend on the weight values) with the real token geometry:
336 px tiles of 24 x 24 = 576 tokens, so LLaVA-1.5 has 576 tokens per image, LLaVA-NeXT up to
2,928 (base + up to 2 x 2 tiles + a newline per row) and OneVision (anyres_max_9, up to 3 x 3 tiles)
up to 5,832. Qwen2-VL / Qwen2.5-VL / Qwen3-VL take each image at its native resolution (up to 1008 x
1008 px: 1,296 tokens on Qwen2/2.5-VL's 28 px merged patches, 992 on Qwen3-VL's 32 px), mRoPE
decoders. The decoder is 4 layers of width 64 (Llama / Mistral / Qwen2 / Qwen-VL), so the figures show
what carving saves in sequence length, not a 7B model's FLOP balance. Each batch mixes image
sizes, so its images have different token counts. All settings of a family run interleaved in
one process. One thread by default: on a shared 2-core machine, multi-threaded kernels mostly wait
for each other and the timings become noise. Prints Markdown (see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py

from common import environment, header, median_seconds  # noqa: E402

import tokencarve  # noqa: E402
from tokencarve import CarveConfig  # noqa: E402
from tokencarve.testing import (  # noqa: E402
    IMAGE_TOKEN,
    image_token_counts,
    next_image_processor,
    onevision_image_processor,
    qwen_image_processor,
    tiny_llava,
    tiny_llava_next,
    tiny_llava_onevision,
    tiny_qwen_vl,
)

TILE = 336
SETTINGS = [None, 128, 0.25, 0.1]  # None: the stock model
# (width, height) of the images of one batch, cycled over its rows
SIZES = [(672, 672), (336, 672), (500, 300), (336, 336)]
ONEVISION_SIZES = [(1008, 672), (336, 672), (500, 300), (336, 336)]
NATIVE_SIZES = [(1008, 1008), (672, 448), (448, 896), (336, 336)]  # Qwen2.5-VL: 1,296, 384, 512, 144 tokens


def text_ids(batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, min(vocab, IMAGE_TOKEN), (batch, length), generator=torch.Generator().manual_seed(0))


def prompts(counts: list[int], text: torch.Tensor) -> dict:
    """Rows of 8 text tokens, the row's image tokens, the rest of the text; left-padded."""
    rows = [torch.cat([t[:8], torch.full((n,), IMAGE_TOKEN), t[8:]]) for t, n in zip(text, counts)]
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :], mask[i, length - len(r) :] = r, 1
    return dict(input_ids=ids, attention_mask=mask)


def llava15_inputs(model, batch: int) -> dict:
    pixels = torch.randn(batch, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    return dict(prompts([576] * batch, text_ids(batch, 40, 128)), pixel_values=pixels)


def anyres_inputs(model, processor, sizes, batch: int) -> dict:
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for w, h in (sizes[i % len(sizes)] for i in range(batch))
    ]
    image_inputs = dict(processor(images, return_tensors="pt"))
    counts = image_token_counts(model, image_inputs)
    return dict(prompts(counts, text_ids(batch, 40, 128)), **image_inputs)


def native_inputs(model, processor, sizes, batch: int) -> dict:
    """Qwen-VL: each image at its own grid; the prompts carry the modality of every token."""
    inputs = anyres_inputs(model, processor, sizes, batch)
    return dict(inputs, mm_token_type_ids=(inputs["input_ids"] == IMAGE_TOKEN).int())


def bench(model, inputs, new_tokens: int, repeats: int) -> list[dict]:
    rows = []
    for keep in SETTINGS:
        tokencarve.apply(model, CarveConfig(keep=keep if keep is not None else 10**9))  # 10**9: stock figures
        with torch.no_grad():
            prefill = median_seconds(lambda: model(**inputs, use_cache=True), repeats)
            generate = median_seconds(
                lambda: model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False),
                repeats,
            )
            model(**inputs, use_cache=True)
        stats = model.tokencarve.last_stats
        rows.append(
            dict(
                keep="stock" if keep is None else keep,
                prefill=prefill,
                generate=generate,
                visual_in=sum(stats.visual_tokens_in),
                visual_kept=sum(stats.visual_tokens_kept),
                kv=stats.kv_cache_bytes,
                carve=stats.carve_seconds,
            )
        )
        tokencarve.remove(model)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    families = [
        ("LLaVA-1.5 (Llama)", lambda: tiny_llava(), llava15_inputs),
        (
            "LLaVA-NeXT (Mistral)",
            lambda: tiny_llava_next(tile=TILE),
            lambda m, b: anyres_inputs(m, next_image_processor(TILE), SIZES, b),
        ),
        (
            "OneVision (Qwen2)",
            lambda: tiny_llava_onevision(tile=TILE, vision_aspect_ratio="anyres_max_9"),
            lambda m, b: anyres_inputs(m, onevision_image_processor(TILE), ONEVISION_SIZES, b),
        ),
        *(
            (
                name,
                lambda f=family: tiny_qwen_vl(f),
                lambda m, b, f=family: native_inputs(m, qwen_image_processor(f, 1008), NATIVE_SIZES, b),
            )
            for name, family in (("Qwen2-VL", "qwen2-vl"), ("Qwen2.5-VL", "qwen2.5-vl"), ("Qwen3-VL", "qwen3-vl"))
        ),
    ]
    print("# TokenCarve on each model family, CPU\n")
    print(header(environment("cpu")))
    print(
        "\nrandom tiny models (336 px tiles; Qwen-VL at native resolution up to 1008 px; "
        f"decoder 4 x 64), fp32, SDPA; batch {args.batch} (mixed image sizes), 40 text tokens per prompt, "
        f"{args.new_tokens} new tokens, median of {args.repeats}\n"
    )
    print(
        "| family | keep | visual tokens in -> kept (batch) | prefill ms | vs stock | generate ms | vs stock "
        "| KV cache KiB | vs stock | carve step ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, build, make_inputs in families:
        model = build()
        inputs = make_inputs(model, args.batch)
        rows = bench(model, inputs, args.new_tokens, args.repeats)
        stock = rows[0]
        for row in rows:
            print(
                f"| {name} | {row['keep']} | {row['visual_in']} -> {row['visual_kept']} | {row['prefill'] * 1e3:.0f} "
                f"| {row['prefill'] / stock['prefill']:.2f}x | {row['generate'] * 1e3:.0f} "
                f"| {row['generate'] / stock['generate']:.2f}x | {row['kv'] / 1024:.0f} "
                f"| {row['kv'] / stock['kv']:.2f}x | {row['carve'] * 1e3:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
