"""TokenCarve at 7B size on a GPU: captions/s per decode path, prefill, KV memory, the carve step.

    python benchmarks/bench_gpu.py                      # on an H100/H200: the real 7B architecture, bf16
    python benchmarks/bench_gpu.py --scale tiny --batches 2 --repeats 1     # anywhere, in seconds
    python benchmarks/bench_gpu.py --json $OUT/gpu.json --out $OUT/gpu.md  # also write the results

The model (--arch, benchmarks/gpu_models.py) is LLaVA-1.5-7B's exact architecture
(`tokencarve.testing.llava15_config`: CLIP ViT-L/14-336, 2-layer MLP projector, 32-layer 4096-wide Llama,
vocab 32064; every prompt 60 text + 576 visual tokens) or Qwen2.5-VL-7B's (`qwen25vl_config`: a 32-block
windowed ViT, 28-layer 3584-wide mRoPE decoder with GQA 28 / 4; every prompt 60 text + one 1008 x 1008 px
image of 1,296 tokens), with random weights: speed does not depend on the values, and with no eos token
every row generates exactly the tokens asked of it.

Throughput, for every --budgets entry (stock: the uncarved model; 128, 64: visual tokens kept per
image) x --method (carved budgets only) x --decode:

    generate        Hugging Face generate() in batches of B: every row of a batch runs as long as the
                    batch's longest row (min = max new tokens = that length), as generate() pads
    static          tokencarve.decode.StaticDecoder, B slots, fed one batch of B rows at a time
    static-refill   the same B slots fed all the rows at once: a slot refills as soon as its row ends

Each of them captions the same --blocks x B rows (the same prompts, the same output lengths), so the
captions/s compare like with like. B runs over --batches (--stock-batches for the stock model, which
fits fewer rows), ascending; a batch that runs out of memory ends that setting's search, and the
fastest batch is reported. The static step is compiled on a GPU (CUDA graphs; --compile) and every
pool shape is compiled and run once before any timing, so the one-time compile is not in the figures.

Output lengths (--lengths):

    fixed     every row generates --max-new-tokens tokens (the benchmark before issue 23)
    natural   row i generates L_i tokens, drawn once with --seed from a log-normal caption-length
              distribution: median 20 tokens, sigma 0.55 (p95 ~ 49, mean ~ 23), rounded and clipped
              to [4, --max-new-tokens], so ~2 % of the rows reach the cap of 64: short web-style
              captions with a long tail. The same draw for every setting; its p50 / p95 / mean are
              printed with the results.

Also measured, per budget and method: the prefill alone at --prefill-batches (as generate() runs it:
logits of the last position only), the carve step inside it and its share, the KV cache bytes; and
our information score against the reference code's (full SVD, eager attention matrix).
Prints Markdown; --out and --json write it and the figures (device, date, versions, per setting).
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, also when imported by a test

from common import (  # noqa: E402
    caption_lengths,
    describe_lengths,
    environment,
    header,
    length_summary,
    markdown_table,
    median_seconds,
    sync,
    write_results,
)
from gpu_models import ARCHITECTURES, TEXT_TOKENS, Prompts  # noqa: E402

import tokencarve  # noqa: E402
from tokencarve import CarveConfig, carve_tokens, eigh, information_scores  # noqa: E402
from tokencarve.decode import StaticDecoder, prefill  # noqa: E402
from tokencarve.engine import DEFAULT_METHOD, kv_cache_bytes  # noqa: E402

DECODES = ("generate", "static", "static-refill")


@contextmanager
def forward_timer(model, device: str):
    """The wall time of every forward of `model` (synchronised), in a list, while inside."""
    durations, started = [], [0.0]

    def start(module, args):
        sync(device)
        started[0] = time.perf_counter()

    def stop(module, args, output):
        sync(device)
        durations.append(time.perf_counter() - started[0])

    handles = [model.register_forward_pre_hook(start), model.register_forward_hook(stop)]
    try:
        yield durations
    finally:
        for handle in handles:
            handle.remove()


def run_generate(model, prompts: Prompts, lengths: list[int], batch: int, device: str) -> dict:
    """generate() in batches of `batch`; each batch runs to its longest row (generate pads the rest)."""
    figures = {"prefill": 0.0, "carve": 0.0, "steps": 0, "lengths_exact": None}
    with forward_timer(model, device) as durations:
        sync(device)
        started = time.perf_counter()
        for first in range(0, len(lengths), batch):
            rows = range(first, min(first + batch, len(lengths)))
            longest = max(lengths[row] for row in rows)
            before = len(durations)
            model.generate(**prompts.take(rows), max_new_tokens=longest, min_new_tokens=longest, do_sample=False)
            figures["prefill"] += durations[before]
            figures["carve"] += model.tokencarve.last_stats.carve_seconds
            figures["steps"] += longest - 1  # the first token comes from the prefill
        sync(device)
        figures["seconds"] = time.perf_counter() - started
    figures["tokens"] = sum(
        max(lengths[f : f + batch]) * len(lengths[f : f + batch]) for f in range(0, len(lengths), batch)
    )
    return figures


def run_static(model, decoder, prompts: Prompts, lengths: list[int], slots: int, refill: bool, device: str) -> dict:
    """The static decoder with `slots` slots: batches of `slots` rows one after another, or (refill)
    every row in one call. Checks that every row generated exactly its own length."""
    figures = {"prefill": 0.0, "carve": 0.0, "steps": 0, "tokens": 0, "lengths_exact": True}
    groups = (
        [list(range(len(lengths)))]
        if refill
        else [list(range(first, min(first + slots, len(lengths)))) for first in range(0, len(lengths), slots)]
    )
    sync(device)
    started = time.perf_counter()
    for group in groups:

        def prefill_rows(chunk: list[int], group=group):
            sync(device)
            begun = time.perf_counter()
            filled = prefill(model, prompts.take(group[i] for i in chunk))
            sync(device)
            figures["prefill"] += time.perf_counter() - begun
            figures["carve"] += model.tokencarve.last_stats.carve_seconds
            return filled

        decoded = decoder.run(len(group), [lengths[row] for row in group], prefill_rows)
        figures["steps"] += decoder.stats.steps
        figures["tokens"] += sum(len(row.tokens) for row in decoded)
        figures["lengths_exact"] &= [len(row.tokens) for row in decoded] == [lengths[row] for row in group]
    sync(device)
    figures["seconds"] = time.perf_counter() - started
    return figures


def measure(model, decoder, prompts, decode: str, lengths: list[int], batch: int, device: str) -> dict:
    """One timed pass of a decode path over the rows, after a short warm-up of the same shapes
    (the static pool is compiled and captured there, generate's kernels are loaded)."""
    cap = max(lengths)
    if decode == "generate":
        run_generate(model, prompts, [2] * min(batch, 8), batch, device)
    else:
        run_static(model, decoder, prompts, [cap] * min(batch, 4), batch, False, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if decode == "generate":
        figures = run_generate(model, prompts, lengths, batch, device)
    else:
        figures = run_static(model, decoder, prompts, lengths, batch, decode == "static-refill", device)
    figures["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
    figures["decode"] = figures["seconds"] - figures["prefill"]  # the steps and everything around them
    figures["captions_per_s"] = len(lengths) / figures["seconds"]
    return figures


def throughput(model, args, prompts, lengths_for, device: str) -> list[dict]:
    """Every budget x method x decode at each batch size; the fastest batch of each setting."""
    results: dict[tuple, dict] = {}
    for keep in args.budgets:
        methods = [None] if keep is None else args.methods
        for batch in args.stock_batches if keep is None else args.batches:
            # one decoder (one pool shape: slots x this budget's cache length) per budget and batch
            decoder = static_decoder(model, batch, args.compile, device)
            for method in methods:
                config = CarveConfig(keep=keep, method=method or DEFAULT_METHOD)
                for decode in args.decodes:
                    key = (keep, method, decode)
                    best = results.setdefault(key, {"tried": [], "out_of_memory": False})
                    if best["out_of_memory"]:
                        continue
                    try:
                        with model.tokencarve.using(config):
                            run = measure(model, decoder, prompts, decode, lengths_for(batch), batch, device)
                    except torch.OutOfMemoryError:
                        best["out_of_memory"] = True
                        best["tried"].append(f"{batch}: out of memory")
                        del decoder
                        free_memory(device)
                        decoder = static_decoder(model, batch, args.compile, device)
                        continue
                    best["tried"].append(f"{batch}: {run['captions_per_s']:.1f}/s")
                    if run["captions_per_s"] > best.get("captions_per_s", 0.0):
                        best.update(run, batch=batch)
                    print(
                        f"  {decode} keep={keep or 'stock'} {method or ''} batch {batch}: "
                        f"{run['captions_per_s']:.2f} captions/s",
                        file=sys.stderr,
                        flush=True,
                    )
                    args.progress(rows_of(results, args.arch.visual_tokens))  # partial results survive a timeout
            del decoder
            free_memory(device)
    return rows_of(results, args.arch.visual_tokens)


def static_decoder(model, slots: int, compile: bool, device: str) -> StaticDecoder:
    """A decoder of `slots` slots in the engine's default KV-cache budget (eos ignored: rows run to their
    lengths), warmed up: its pool allocated and, compiled, every read bucket compiled."""
    budget = kv_cache_bytes(None, torch.device(device))
    decoder = StaticDecoder(
        model, model.tokencarve.language_model, [], slots=slots, kv_cache_bytes=budget, compile=compile
    )
    decoder.warm_up()
    return decoder


def free_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def rows_of(results: dict, visual_tokens: int) -> list[dict]:
    """One row per setting that ran, with its ratios to the stock model's generate() and same decode."""
    rows = []
    for (keep, method, decode), best in results.items():
        rows.append(
            {
                "decode": decode,
                "visual tokens": keep or visual_tokens,
                "method": method or "stock",
                "best batch": best.get("batch", "out of memory"),
                "captions/s": best.get("captions_per_s", 0.0),
                "prefill s": best.get("prefill", 0.0),
                "decode s": best.get("decode", 0.0),
                "carve s": best.get("carve", 0.0),
                "steps": best.get("steps", 0),
                "tokens": best.get("tokens", 0),
                "lengths exact": best.get("lengths_exact"),
                "peak GiB": best.get("peak_gib", 0.0),
                "batches tried": ", ".join(best["tried"]),
            }
        )
    for row in rows:
        seconds = row["prefill s"] + row["decode s"]
        row["prefill share"] = row["prefill s"] / seconds if seconds else 0.0
        row["carve share of prefill"] = row["carve s"] / row["prefill s"] if row["prefill s"] else 0.0
        row["decode ms/step"] = 1e3 * row["decode s"] / row["steps"] if row["steps"] else 0.0
        row["vs stock generate"] = ratio(row, rows, "generate")
        row["vs stock, same decode"] = ratio(row, rows, row["decode"])
    return rows


def ratio(row: dict, rows: list[dict], decode: str) -> float | None:
    stock = next((r for r in rows if r["method"] == "stock" and r["decode"] == decode), None)
    return row["captions/s"] / stock["captions/s"] if stock and stock["captions/s"] else None


def bench_prefill(model, args, prompts, device: str) -> list[dict]:
    """The prefill alone per budget and method at each --prefill-batches size: its time, the carve
    step inside it (the last timed run's) and the KV cache it leaves. None with no --prefill-batches."""
    if not args.prefill_batches:
        return []
    rows = []
    for keep in args.budgets:
        for method in [None] if keep is None else args.methods:
            row = {"visual tokens": keep or args.arch.visual_tokens, "method": method or "stock"}
            with model.tokencarve.using(CarveConfig(keep=keep, method=method or DEFAULT_METHOD)):
                for batch in args.prefill_batches:
                    inputs = prompts.take(range(batch))
                    seconds = median_seconds(lambda: prefill(model, inputs), args.repeats, device)
                    stats = model.tokencarve.last_stats
                    row[f"prefill b{batch} ms"] = seconds * 1e3
                    row[f"carve b{batch} ms"] = stats.carve_seconds * 1e3
                    row[f"carve share b{batch}"] = stats.carve_seconds / seconds
                    row[f"KV b{batch} MiB"] = stats.kv_cache_bytes / 2**20
            row["analytic LM FLOPs"] = flop_ratio(model.config, keep, args.mean_length, args.arch.visual_tokens)
            rows.append(row)
    return rows


def flop_ratio(config, keep: int | None, new_tokens: int, visual_tokens: int, cut: int = 2) -> float:
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

    full = TEXT_TOKENS + visual_tokens
    return cost(full, TEXT_TOKENS + (keep or visual_tokens)) / cost(full, full)


def bench_carve_step(model, device, dtype, repeats, visual_tokens: int) -> list[dict]:
    """Our scoring vs the reference's (full SVD with full_matrices, eager attention matrix)."""
    text = model.config.text_config
    d, heads = text.hidden_size, text.num_attention_heads
    rows = []
    for batch in (1, 8):
        hidden = torch.randn(batch, visual_tokens, d, device=device, dtype=dtype)
        attention = torch.rand(batch, visual_tokens, device=device).softmax(-1)
        q = torch.randn(batch, heads, TEXT_TOKENS + visual_tokens, d // heads, device=device, dtype=dtype)
        k = torch.randn_like(q)

        def reference():
            torch.linalg.svd(hidden.float(), full_matrices=True)
            (q @ k.transpose(-1, -2)).float().softmax(-1)  # eager attention materialises L x L per head

        rows.append(
            {
                "batch": batch,
                "ours: carve_tokens ms": median_seconds(lambda: carve_tokens(hidden, attention, 128), repeats, device)
                * 1e3,
                "ours: information score ms": median_seconds(lambda: information_scores(hidden), repeats, device) * 1e3,
                "reference: full SVD + eager attention ms": median_seconds(reference, max(1, repeats // 2), device)
                * 1e3,
            }
        )
    return rows


def profile_prefill(model, device, prompts, keep, path: Path) -> None:
    """Where one batch-8 prefill spends its time (torch.profiler's kernel table), to check against the bound."""
    from torch.profiler import ProfilerActivity, profile

    inputs = prompts.take(range(8))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with model.tokencarve.using(CarveConfig(keep=keep, method=DEFAULT_METHOD)):
        prefill(model, inputs)  # warm-up
        sync(device)
        with profile(activities=activities) as prof:
            prefill(model, inputs)
            sync(device)
    sort = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=25))


DECODE_COLUMNS = [
    "decode",
    "visual tokens",
    "method",
    "best batch",
    "captions/s",
    "vs stock generate",
    "vs stock, same decode",
    "prefill s",
    "decode s",
    "prefill share",
    "carve share of prefill",
    "decode ms/step",
    "steps",
    "peak GiB",
    "lengths exact",
]


def report(args, env, lengths: dict, decode_rows, prefill_rows, carve_rows) -> str:
    sizes = f"{args.batches}" + (f" (stock: {args.stock_batches})" if args.stock_batches != args.batches else "")
    lines = [
        f"# {args.arch.name} architecture: decode paths, prefill and the carve step (benchmarks/bench_gpu.py)",
        "",
        header(env),
        "",
        f"Model: {args.arch.name} at scale `{args.scale}`, {args.dtype}, SDPA, random weights, no eos; prompt "
        f"{TEXT_TOKENS} text + {args.arch.visual_tokens} visual tokens; eigh route {args.eigh_solver}; static step compiled: {args.compile}. "
        f"Output lengths: {args.lengths}"
        + (f" ({describe_lengths(args.max_new_tokens)}, seed {args.seed})" if args.lengths == "natural" else "")
        + f": p50 {lengths['p50']}, p95 {lengths['p95']}, mean {lengths['mean']:.1f}, max {lengths['max']} tokens. "
        f"Each setting captions {args.blocks} x B rows; B among {sizes}, the fastest shown. "
        f"Command: `python benchmarks/bench_gpu.py {' '.join(args.argv)}`",
        "",
        markdown_table(decode_rows, DECODE_COLUMNS),
        "",
        markdown_table(decode_rows, ["decode", "visual tokens", "method", "batches tried"]),
    ]
    if prefill_rows:
        columns = ["visual tokens", "method"]
        for b in args.prefill_batches:
            columns += [f"prefill b{b} ms", f"carve b{b} ms", f"carve share b{b}"]
        columns += [f"KV b{args.prefill_batches[-1]} MiB", "analytic LM FLOPs"]
        lines += ["", markdown_table(prefill_rows, columns)]
    if carve_rows:
        lines += ["", markdown_table(carve_rows, list(carve_rows[0]))]
    return "\n".join(lines)


def figures(args, env, lengths, decode_rows, prefill_rows, carve_rows) -> dict:
    """The run as JSON: environment (device, date, versions), settings and every table's rows."""
    return {
        "environment": env,
        "eigh_solver": args.eigh_solver,
        "model": {"architecture": args.arch.name, "scale": args.scale, "dtype": args.dtype, "attention": "sdpa"},
        "prompt": {"text_tokens": TEXT_TOKENS, "visual_tokens": args.arch.visual_tokens},
        "lengths": {
            "mode": args.lengths,
            "distribution": describe_lengths(args.max_new_tokens)
            if args.lengths == "natural"
            else f"fixed {args.max_new_tokens}",
            "seed": args.seed,
            **lengths,
        },
        "args": {key: value for key, value in vars(args).items() if key not in ("progress", "argv", "arch")},
        "command": "python benchmarks/bench_gpu.py " + " ".join(args.argv),
        "settings": decode_rows,
        "prefill": prefill_rows,
        "carve_step": carve_rows,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=list(ARCHITECTURES), default="llava-1.5", help="the model (gpu_models.py)")
    p.add_argument("--scale", choices=["7b", "tiny"], default="7b")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    p.add_argument("--decode", default=",".join(DECODES), help=f"comma list of {', '.join(DECODES)}")
    p.add_argument("--method", default=f"{DEFAULT_METHOD},tokencarve", help="comma list of methods (carved budgets)")
    p.add_argument("--budgets", default="stock,128,64", help="comma list: stock and/or visual tokens kept")
    p.add_argument("--lengths", choices=["natural", "fixed"], default="natural")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="the draw of natural lengths")
    p.add_argument("--batches", default="64,128,256", help="batch sizes (= slots) tried, carved budgets")
    p.add_argument("--stock-batches", default=None, help="batch sizes tried for the stock model (default: --batches)")
    p.add_argument("--blocks", type=int, default=4, help="rows per setting: this many batches' worth")
    p.add_argument("--prefill-batches", default="1,8,64", help="batch sizes of the prefill table ('' to skip)")
    p.add_argument("--repeats", type=int, default=5, help="runs per prefill and carve-step figure (median)")
    p.add_argument("--compile", choices=["auto", "yes", "no"], default="auto", help="auto: on a GPU")
    p.add_argument("--profile", help="write torch.profiler tables of a batch-8 prefill (stock, keep 128) here")
    p.add_argument("--out", help="write the Markdown here")
    p.add_argument("--json", help="write the figures here (e.g. docs/benchmarks/gpu.json)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.arch = ARCHITECTURES[args.arch]
    args.decodes = [d for d in args.decode.split(",") if d]
    if set(args.decodes) - set(DECODES):
        p.error(f"--decode takes {', '.join(DECODES)}")
    args.methods = [m for m in args.method.split(",") if m]
    args.budgets = [None if b == "stock" else int(b) for b in args.budgets.split(",") if b]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.stock_batches = [int(b) for b in args.stock_batches.split(",")] if args.stock_batches else args.batches
    args.prefill_batches = [int(b) for b in args.prefill_batches.split(",") if b]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    args.compile = args.compile == "yes" or args.compile == "auto" and device == "cuda"
    args.eigh_solver = eigh.resolve(eigh.default_solver(), device, eigh.torch_version(), eigh.installed("nvmath"))
    if args.compile:  # every pool (budget x batch) compiles the step anew: past dynamo's default 8 it would run eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    env = environment(device)
    model = args.arch.build(args.scale, device, getattr(torch, args.dtype))
    tokencarve.apply(model, CarveConfig(keep=None))  # the budget of each setting comes through `using`
    prompts = args.arch.prompts(64, device, getattr(torch, args.dtype))
    longest = max(args.batches + args.stock_batches) * args.blocks
    all_lengths = caption_lengths(longest, args.max_new_tokens, args.lengths, args.seed)
    lengths = length_summary(all_lengths)
    args.mean_length = round(lengths["mean"])
    print(f"output lengths ({args.lengths}): p50 {lengths['p50']}, p95 {lengths['p95']}, mean {lengths['mean']:.1f}")
    tables = {"decode": [], "prefill": [], "carve": []}

    def write() -> dict:
        text = report(args, env, lengths, tables["decode"], tables["prefill"], tables["carve"])
        record = figures(args, env, lengths, tables["decode"], tables["prefill"], tables["carve"])
        write_results(text, record, args.out, args.json)
        return text, record

    args.progress = lambda rows: (tables.__setitem__("decode", rows), write())
    with torch.inference_mode():
        tables["decode"] = throughput(model, args, prompts, lambda batch: all_lengths[: args.blocks * batch], device)
        write()
        tables["prefill"] = bench_prefill(model, args, prompts, device)
        tables["carve"] = bench_carve_step(
            model, device, getattr(torch, args.dtype), args.repeats, args.arch.visual_tokens
        )
        text, record = write()
        print(text)
        if args.profile:
            folder = Path(args.profile)
            folder.mkdir(parents=True, exist_ok=True)
            for keep in (None, 128):
                profile_prefill(
                    model, device, prompts, keep, folder / f"profile_prefill_keep{keep or args.arch.visual_tokens}.txt"
                )
    return record


if __name__ == "__main__":
    main()
