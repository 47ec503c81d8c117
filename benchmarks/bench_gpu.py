"""TokenCarve at LLaVA-1.5-7B size on a GPU: speed, KV memory, and the carve step's cost.

    python benchmarks/bench_gpu.py                      # on an H100/H200: the real 7B architecture, bf16
    python benchmarks/bench_gpu.py --scale tiny         # anywhere: the same code on a scaled-down model

The model is LLaVA-1.5-7B's exact architecture (CLIP ViT-L/14-336, 2-layer MLP projector, 32-layer
4096-wide Llama, vocab 32064) built from a config with random weights: speed does not depend on the
values. Every setting generates exactly the same number of tokens (min = max new tokens) so each does
the same work. Prints Markdown tables; --write docs/BENCHMARKS.md replaces the GPU section there.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
from datetime import date
from pathlib import Path

import torch
import transformers
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import tokencarve
from tokencarve import CarveConfig, carve_tokens, eigh, information_scores

BUDGETS = [None, 192, 128, 64]
IMAGE_TOKEN = 32000
TEXT_TOKENS = 60  # LLaVA-1.5's system prompt + a short question


def llava_config(scale: str) -> LlavaConfig:
    if scale == "7b":
        vision = CLIPVisionConfig(
            image_size=336,
            patch_size=14,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            projection_dim=768,
        )
        text = LlamaConfig(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            eos_token_id=None,
            pad_token_id=0,
        )
    else:
        vision = CLIPVisionConfig(
            image_size=336,
            patch_size=14,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=64,
        )
        text = LlamaConfig(
            vocab_size=32064,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            eos_token_id=None,
            pad_token_id=0,
        )
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2)


def build_model(config: LlavaConfig, device: str, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def inputs_for(batch: int, device: str, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 32000, (batch, TEXT_TOKENS), generator=g)
    ids = torch.cat([text[:, :35], torch.full((batch, 576), IMAGE_TOKEN), text[:, 35:]], 1)
    return dict(
        input_ids=ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        pixel_values=torch.randn(batch, 3, 336, 336, generator=g).to(device, dtype),
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def flop_ratio(config: LlavaConfig, keep: int | None, new_tokens: int, cut: int = 2) -> float:
    """Analytic LM FLOPs (projections, MLP, attention) with carving / without: the best possible speedup^-1."""
    t = config.text_config
    layers, d, ff = t.num_hidden_layers, t.hidden_size, t.intermediate_size
    per_token = 2 * (4 * d * d + 3 * d * ff)  # q,k,v,o + gate/up/down, multiply-add = 2 FLOPs

    def cost(length_before: int, length_after: int) -> float:
        total = 0.0
        for layer in range(layers):
            n = length_before if layer < cut else length_after
            total += n * per_token + 2 * 2 * n * n * d / 2  # causal QK^T and AV
            for step in range(new_tokens):  # decode: one token against the cache
                total += per_token + 2 * 2 * (n + step) * d
        return total

    full = TEXT_TOKENS + 576
    return cost(full, TEXT_TOKENS + (keep or 576)) / cost(full, full)


def kv_bytes(model) -> int:
    return model.tokencarve.last_stats.kv_cache_bytes


def bench_setting(model, keep, device, dtype, new_tokens, repeats, batches) -> dict:
    tokencarve.apply(model, CarveConfig(keep=keep))
    row = {"keep": keep or 576}
    with torch.inference_mode():
        for batch in (1, 8, 64):
            inputs = inputs_for(batch, device, dtype)
            row[f"prefill_b{batch}"] = timed(lambda: model(**inputs, use_cache=True), device, repeats)
            if keep is not None:  # the carve step inside that prefill (the last timed run's)
                row[f"carve_ms_b{batch}"] = model.tokencarve.last_stats.carve_seconds * 1e3
        inputs = inputs_for(8, device, dtype)

        def generate(tokens: int):
            return model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

        # Decode rate: the difference between N and 1 new tokens, so prefill cancels out.
        decode = timed(lambda: generate(new_tokens), device, repeats) - timed(lambda: generate(1), device, repeats)
        row["decode_tok_s"] = 8 * (new_tokens - 1) / decode if decode > 0 else float("nan")
        row["kv_bytes_b8"] = kv_bytes(model)
        row["best_batch"], row["captions_s"], row["peak_gib"], row["tried"] = best_throughput(
            model, device, dtype, new_tokens, batches
        )
    tokencarve.remove(model)
    row["flop_ratio"] = flop_ratio(model.config, keep, new_tokens)
    for batch in (1, 8, 64):
        row.setdefault(f"carve_ms_b{batch}", 0.0)
    return row


def figures(args, device: str, rows: list[dict]) -> dict:
    """The run as JSON (docs/benchmarks/gpu.json): device, date, versions, and per setting the best
    batch, captions/s and ratio vs stock, the carve step and its share of the carved prefill, KV bytes."""
    stock = rows[0]
    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.machine() + " CPU",
        "date": str(date.today()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "eigh_solver": eigh.resolve(
            eigh.default_solver(), device.split(":")[0], eigh.torch_version(), eigh.installed("nvmath")
        ),
        "model": f"LLaVA-1.5 architecture, scale {args.scale}, {args.dtype}, SDPA",
        "prompt": {"text_tokens": TEXT_TOKENS, "visual_tokens": 576, "new_tokens": args.new_tokens},
        "settings": [
            {
                "visual_tokens": r["keep"],
                "best_batch": r["best_batch"],
                "captions_per_s": r["captions_s"],
                "captions_ratio_vs_stock": r["captions_s"] / stock["captions_s"],
                "peak_gib": r["peak_gib"],
                "prefill_ms": {str(b): r[f"prefill_b{b}"] * 1e3 for b in (1, 8, 64)},
                "carve_ms": {str(b): r[f"carve_ms_b{b}"] for b in (1, 8, 64)},
                "carve_share_of_prefill": {str(b): r[f"carve_ms_b{b}"] / 1e3 / r[f"prefill_b{b}"] for b in (1, 8, 64)},
                "kv_bytes_b8": r["kv_bytes_b8"],
                "decode_tokens_per_s_b8": r["decode_tok_s"],
                "analytic_flop_ratio": r["flop_ratio"],
                "batches_tried": r["tried"],
            }
            for r in rows
        ],
    }


def best_throughput(model, device, dtype, new_tokens, batches) -> tuple[int, float, float, str]:
    """The fastest batch among those that fit (doubling until one runs out of memory): its size,
    captions/s and peak memory, and a record of every batch tried."""
    best, tried = (0, 0.0, 0.0), []
    for batch in batches:
        try:
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            inputs = inputs_for(batch, device, dtype)
            seconds = timed(
                lambda: model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False),
                device,
                1,
            )
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
            tried.append(f"{batch}: {batch / seconds:.1f}/s")
            if batch / seconds > best[1]:
                best = (batch, batch / seconds, peak)
        except torch.OutOfMemoryError:
            if device.startswith("cuda"):
                torch.cuda.empty_cache()  # the failed batch's blocks, so the next setting starts clean
            tried.append(f"{batch}: out of memory")
            break
    return (*best, ", ".join(tried))


def bench_carve_step(model, device, dtype, repeats) -> list[dict]:
    """Our scoring vs the reference's (full SVD with full_matrices, eager attention matrix)."""
    d = model.config.text_config.hidden_size
    rows = []
    for batch in (1, 8):
        hidden = torch.randn(batch, 576, d, device=device, dtype=dtype)
        attention = torch.rand(batch, 576, device=device).softmax(-1)
        length = TEXT_TOKENS + 576
        heads, hd = model.config.text_config.num_attention_heads, d // model.config.text_config.num_attention_heads
        q = torch.randn(batch, heads, length, hd, device=device, dtype=dtype)
        k = torch.randn_like(q)

        def reference():
            torch.linalg.svd(hidden.float(), full_matrices=True)
            (q @ k.transpose(-1, -2)).float().softmax(-1)  # eager attention materialises L x L per head

        rows.append(
            {
                "batch": batch,
                "ours_ms": timed(lambda: carve_tokens(hidden, attention, 128), device, repeats) * 1e3,
                "ours_scores_ms": timed(lambda: information_scores(hidden), device, repeats) * 1e3,
                "reference_ms": timed(reference, device, max(1, repeats // 2)) * 1e3,
            }
        )
    return rows


def profile_prefill(model, device, dtype, keep, path: Path) -> None:
    """Where one batch-8 prefill spends its time (torch.profiler's kernel table), to check against the bound."""
    from torch.profiler import ProfilerActivity, profile

    tokencarve.apply(model, CarveConfig(keep=keep))
    inputs = inputs_for(8, device, dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch.inference_mode():
        model(**inputs, use_cache=True)  # warm-up
        sync(device)
        with profile(activities=activities) as prof:
            model(**inputs, use_cache=True)
            sync(device)
    tokencarve.remove(model)
    sort = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=25))


def report(args, device, rows, carve_rows) -> str:
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else platform.machine() + " CPU"
    stock = rows[0]
    lines = [
        f"Device: {gpu}; {date.today()}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"model: LLaVA-1.5 architecture at scale `{args.scale}`, {args.dtype}, SDPA; prompt {TEXT_TOKENS} text + 576 "
        f"visual tokens; {args.new_tokens} new tokens (min = max); command: `python benchmarks/bench_gpu.py "
        f"--scale {args.scale}`",
        "",
        "| visual tokens | prefill b1 ms | prefill b8 ms | vs stock | decode tok/s (b8) | vs stock | KV cache b8 MiB | vs stock "
        "| best batch | captions/s | vs stock | peak GiB | analytic LM FLOPs | carve step ms (b8) | share of prefill "
        "| carve step ms (b64) | share of prefill |",
        "|" + "---|" * 17,
    ]
    for r in rows:
        lines.append(
            f"| {r['keep']} | {r['prefill_b1'] * 1e3:.1f} | {r['prefill_b8'] * 1e3:.1f} | {stock['prefill_b8'] / r['prefill_b8']:.2f}x "
            f"| {r['decode_tok_s']:.0f} | {r['decode_tok_s'] / stock['decode_tok_s']:.2f}x | {r['kv_bytes_b8'] / 2**20:.0f} "
            f"| {r['kv_bytes_b8'] / stock['kv_bytes_b8']:.2f}x | {r['best_batch']} | {r['captions_s']:.2f} "
            f"| {r['captions_s'] / stock['captions_s']:.2f}x | {r['peak_gib']:.1f} | {r['flop_ratio']:.2f} "
            f"(best {1 / r['flop_ratio']:.2f}x) | {r['carve_ms_b8']:.2f} | {100 * r['carve_ms_b8'] / 1e3 / r['prefill_b8']:.1f} % "
            f"| {r['carve_ms_b64']:.2f} | {100 * r['carve_ms_b64'] / 1e3 / r['prefill_b64']:.1f} % |"
        )
    lines += ["", "| visual tokens | batches tried: captions/s |", "|---|---|"]
    lines += [f"| {r['keep']} | {r['tried']} |" for r in rows]
    lines += [
        "",
        "| batch | ours: carve_tokens ms | ours: information score ms | reference: full SVD + eager attention ms |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {c['batch']} | {c['ours_ms']:.2f} | {c['ours_scores_ms']:.2f} | {c['reference_ms']:.2f} |"
        for c in carve_rows
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=["7b", "tiny"], default="7b")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", default="8,16,32,64,128,256,512", help="batch sizes tried for the best throughput")
    p.add_argument(
        "--profile",
        help="also write torch.profiler kernel tables of a batch-8 prefill (stock, keep=128) into this folder",
    )
    p.add_argument("--write", help="replace the GPU section of this Markdown file (e.g. docs/BENCHMARKS.md)")
    p.add_argument("--json", help="also write the figures as JSON (e.g. docs/benchmarks/gpu.json)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    model = build_model(llava_config(args.scale), device, dtype)
    batches = [int(b) for b in args.batches.split(",")]
    rows = [bench_setting(model, keep, device, dtype, args.new_tokens, args.repeats, batches) for keep in BUDGETS]
    text = report(args, device, rows, bench_carve_step(model, device, dtype, args.repeats))
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures(args, device, rows), indent=2) + "\n")
    if args.profile:
        folder = Path(args.profile)
        folder.mkdir(parents=True, exist_ok=True)
        for keep in (None, 128):
            profile_prefill(model, device, dtype, keep, folder / f"profile_prefill_keep{keep or 576}.txt")
    if args.write:
        path = Path(args.write)
        section = f"<!-- gpu-benchmark:start -->\n{text}\n<!-- gpu-benchmark:end -->"
        old = path.read_text() if path.exists() else ""
        pattern = r"<!-- gpu-benchmark:start -->.*<!-- gpu-benchmark:end -->"
        path.write_text(
            re.sub(pattern, lambda _: section, old, flags=re.S)
            if re.search(pattern, old, re.S)
            else old + "\n## LLaVA-1.5-7B on a GPU — `benchmarks/bench_gpu.py`\n\n" + section + "\n"
        )


if __name__ == "__main__":
    main()
