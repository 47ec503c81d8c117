"""The decode paths side by side on this machine: generate(), the static step, the static step with refill.

    python benchmarks/bench_decode.py --out docs/benchmarks/decode.md --json docs/benchmarks/decode.json
    python benchmarks/bench_decode.py --models carve-tiny-hard --batches 32 --rows 96   # one model, one batch
    python benchmarks/bench_decode.py --models llava-1.5-random --llava-scale tiny --batches 2 --llava-rows 4 \\
        --llava-repeats 1 --targets no --compile no                                   # seconds (the test's)

Two models (--models), through one code path (CaptionEngine, preprocessing included, end to end):

    carve-tiny-hard    models/carve-tiny-hard, trained: it captions fresh hard scenes (prompts of 6 to
                       ~55 tokens) and its captions end when it says so (eos), at natural lengths.
    llava-1.5-random   LLaVA-1.5's architecture (CLIP 336 px / 14: 576 visual tokens, 2-layer MLP
                       projector, Llama decoder, vocab 32064) with random weights, at --llava-scale
                       (LLAVA15_SCALES). A random model never ends a caption itself, so row i is capped
                       at its own length L_i, drawn once with --seed from common.caption_lengths'
                       natural distribution (the one bench_gpu.py uses); its prompts are 6 to 55 random
                       words. generate() runs a batch to its longest L_i, as it pads.

Per model, budget (stock, keep 128, keep 64) and batch size B:

    generate        engine.caption in batches of B, Hugging Face generate() (a batch runs until its
                    longest caption ends)
    static          the static path, B slots, batches of B: the fixed-shape step, no refill
    static+refill   the static path, B slots, all rows in one call: slots refill as captions end

Each (B, budget) has its own static engine (one pool shape: B slots x the budget's capacity), warmed
up on the rows with the longest prompts at the longest cap before any timing, so the step is compiled
(`--compile yes`, inductor on a CPU) once and never rebuilt inside a timed run. Settings are
interleaved, `--repeats` times (`--llava-repeats` for the random model), medians kept. Every setting's
captions are checked against generate()'s row for row: the whole caption, or for a row capped shorter
than its generate() batch ran, its first L_i tokens (the random model's words are its tokens, one for one).

`--targets yes` also measures the issue's target setting directly (carve-tiny-hard, keep 64, 32 slots,
--target-rows rows, the three paths interleaved) and prints both ratios next to their targets.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    caption_lengths,
    describe_lengths,
    environment,
    header,
    length_summary,
    markdown_table,
    write_results,
)

from carve_tiny.scenes import example  # noqa: E402
from tokencarve import load_llava  # noqa: E402
from tokencarve.engine import CaptionEngine, EngineConfig  # noqa: E402
from tokencarve.testing import LLAVA15_IMAGE_TOKEN, _word_tokenizer, llava15_config  # noqa: E402

CARVE_TINY_HARD = str(Path(__file__).resolve().parent.parent / "models" / "carve-tiny-hard")
MODELS = ("carve-tiny-hard", "llava-1.5-random")
BUDGETS = {"stock": ("none", 64), "keep 128": ("volume", 128), "keep 64": ("volume", 64)}
PATHS = ("generate", "static", "static+refill")
# The CPU targets: carve-tiny-hard, keep 64, batch / slots 32
TARGET_BUDGET, TARGET_BATCH, TARGET_MS_PER_STEP, TARGET_CAPTIONS = "keep 64", 32, 2.0, 1.3

# The random model's (vision tower, decoder) sizes per --llava-scale, on top of tokencarve.testing's
# llava15_config("tiny"), which keeps LLaVA-1.5's token geometry and vocabulary. "tiny" (CLIP 2 x 64,
# Llama 4 x 256) runs in seconds, for tests; "cpu" (CLIP 4 x 128, Llama 8 x 512, MLP 1376, 8 heads of
# 64: LLaVA-1.5-7B's proportions at 1/8 of its width) is what a 2-core CPU decodes in minutes per grid.
LLAVA15_SCALES = {
    "tiny": ({}, {"head_dim": 64}),
    "cpu": (
        {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 2},
        {
            "hidden_size": 512,
            "intermediate_size": 1376,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "head_dim": 64,
        },
    ),
}
FILLER = re.compile(r"w\d+")  # the word-level tokenizer's filler words, one per id


@dataclass
class Workload:
    """One model, its rows and how many of them each setting captions."""

    name: str
    model: object
    processor: object
    images: list
    prompts: list[str]
    caps: list[int] | None  # each row's own length (a random model's); None: eos or --max-new-tokens ends it
    rows: int
    repeats: int
    about: str  # the model and its captions, for the report


def scene_images(count: int, seed: int):
    """Fresh hard scenes with the caption prompt (a seed the models were not trained on)."""
    rng = random.Random(seed)
    rows = [example(rng, task="caption", variant="hard") for _ in range(count)]
    return [row[0] for row in rows], [row[3] for row in rows]


def random_llava15(scale: str, seed: int):
    """LLaVA-1.5's architecture with random weights, and a processor: CLIP's 336 px preprocessing and
    tokencarve.testing's word-level tokenizer over the 32064 ids (five specials, the rest words). The
    output rows of every id that is not a filler word w<i> are zeroed: a random logit row's maximum is
    > 0, so greedy decoding never picks one, and each generated token is one word of the caption
    (skip_special_tokens drops nothing, punctuation joins nothing)."""
    from transformers import LlavaForConditionalGeneration

    config = llava15_config("tiny")
    # as tokencarve.testing's tiny models: logits with clear margins, so greedy choices are decided by the
    # model and not by float rounding noise (at 0.02, the tie of a repeated word and the next one flips
    # now and then between a row prefilled alone, as refill does, and in its batch)
    config.text_config.initializer_range = 0.2
    for part, sizes in zip((config.vision_config, config.text_config), LLAVA15_SCALES[scale]):
        for name, value in sizes.items():
            setattr(part, name, value)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    return model, filler_word_processor(model)


def filler_word_processor(model):
    """A LLaVA-1.5 processor over tokencarve.testing's word-level tokenizer for a random `model`, whose
    output rows of every id that is not a filler word w<i> it zeroes (so each generated token is a word)."""
    from transformers import LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    specials = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": LLAVA15_IMAGE_TOKEN}
    tokenizer = _word_tokenizer(model.config.text_config.vocab_size, specials)
    never = [index for word, index in tokenizer.get_vocab().items() if not FILLER.fullmatch(word)]
    with torch.no_grad():
        model.get_output_embeddings().weight[never] = 0
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def workload(name: str, args) -> Workload:
    if name == "carve-tiny-hard":
        count = max(args.rows, args.target_rows if args.targets else 0)
        images, prompts = scene_images(count, args.seed)
        model, processor = load_llava(CARVE_TINY_HARD, "cpu", "auto")
        about = (
            f"carve-tiny-hard (models/carve-tiny-hard: CLIP 3 x 96, Llama 8 x 128, vocab 92, trained), "
            f"{args.rows} fresh hard-scene captions per setting (seed {args.seed}), each ending at the "
            f"model's eos or {args.max_new_tokens} tokens, median of {args.repeats} interleaved runs"
        )
        return Workload(name, model, processor, images, prompts, None, args.rows, args.repeats, about)
    images, _ = scene_images(args.llava_rows, args.seed)
    rng = random.Random(args.seed)
    prompts = [" ".join(f"w{rng.randrange(32000)}" for _ in range(rng.randint(6, 55))) for _ in images]
    caps = caption_lengths(args.llava_rows, args.max_new_tokens, "natural", args.seed)
    model, processor = random_llava15(args.llava_scale, args.seed)
    vision, text = model.config.vision_config, model.config.text_config
    about = (
        f"llava-1.5-random (LLaVA-1.5's architecture at scale `{args.llava_scale}`, random weights: CLIP "
        f"{vision.num_hidden_layers} x {vision.hidden_size} at 336 px / 14 = 576 visual tokens, Llama "
        f"{text.num_hidden_layers} x {text.hidden_size} (MLP {text.intermediate_size}, "
        f"{text.num_attention_heads} heads), vocab {text.vocab_size}), {args.llava_rows} rows per setting "
        f"with prompts of 6-55 random words, row i capped at its own length drawn from "
        f"{describe_lengths(args.max_new_tokens)} (seed {args.seed}), median of {args.llava_repeats} "
        f"interleaved run(s)"
    )
    if (args.llava_rows, args.llava_repeats) != (args.rows, args.repeats):
        about += (
            f" ({args.llava_rows} rows x {args.llava_repeats} instead of carve-tiny-hard's "
            f"{args.rows} x {args.repeats}, to fit the grid in this CPU's time: compare the captions/s)"
        )
    return Workload(name, model, processor, images, prompts, caps, args.llava_rows, args.llava_repeats, about)


def build_engines(work: Workload, pools, args) -> dict:
    """One generate() engine, and one static engine per (batch, budget) in `pools`.

    generate() gets a copy of the model of its own: every engine hooks its forward timer on its model,
    and the static engines' timers (~10 us each) would otherwise run at each of generate()'s steps; on
    the static path they run only at each prefill, never in the step."""
    config = EngineConfig(model=work.name, max_new_tokens=args.max_new_tokens, compile_decode=args.compile)
    own_model = copy.deepcopy(work.model)
    engines = {"generate": CaptionEngine(replace(config, decode="generate"), own_model, work.processor)}
    for batch, budget in pools:
        engines[batch, budget] = CaptionEngine(replace(config, decode_slots=batch), work.model, work.processor)
    return engines


def caps_for(work: Workload, rows: range, path: str):
    """max_new_tokens for a call: None (the engine's), or each row's own length (static) or the batch's
    longest (generate(), which takes one)."""
    if work.caps is None:
        return None
    caps = [work.caps[i] for i in rows]
    return max(caps) if path == "generate" else caps


def warm_up(work: Workload, engines: dict, args) -> None:
    """Compile every static pool at the largest shape its timed runs can need (the longest prompts, the
    longest cap), so no pool grows, and no step compiles, inside a timing; one generate() call per budget."""
    by_length = sorted(
        range(len(work.prompts)), key=lambda i: -engines["generate"].inputs.prompt_tokens(work.prompts[i])
    )
    longest = max(work.caps) if work.caps else None
    for key, engine in engines.items():
        count = 4 if key == "generate" else key[0]
        rows = by_length[:count]
        for budget in BUDGETS if key == "generate" else [key[1]]:
            method, keep = BUDGETS[budget]
            caps = None if longest is None else longest if key == "generate" else [longest] * count
            images, prompts = [work.images[i] for i in rows], [work.prompts[i] for i in rows]
            engine.caption(images, prompts, max_new_tokens=caps, method=method, keep=keep)


def run_setting(work: Workload, engines: dict, path: str, budget: str, batch: int, count: int) -> dict:
    """One pass over the first `count` rows; returns wall time, decode time and steps, and the captions."""
    method, keep = BUDGETS[budget]
    engine = engines["generate" if path == "generate" else (batch, budget)]
    step = count if path == "static+refill" else batch
    captions, decode_seconds, steps = [], 0.0, 0
    started = time.perf_counter()
    for first in range(0, count, step):
        rows = range(first, min(first + step, count))
        images, prompts = [work.images[i] for i in rows], [work.prompts[i] for i in rows]
        out = engine.caption(images, prompts, max_new_tokens=caps_for(work, rows, path), method=method, keep=keep)
        captions += out
        decode_seconds += engine.last_timing.decode_seconds
        # generate() runs every row of a batch until its longest caption ends (the first token comes from prefill)
        steps += engine.decoder.stats.steps if engine.decoder else max(c.generated_tokens for c in out) - 1
    return {"seconds": time.perf_counter() - started, "decode": decode_seconds, "steps": steps, "captions": captions}


def measure(work: Workload, engines: dict, settings: list[tuple], count: int, repeats: int) -> list[dict]:
    results: dict[tuple, list[dict]] = {s: [] for s in settings}
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits every setting alike
        for setting in settings:
            results[setting].append(run_setting(work, engines, *setting, count))
            print(f"  {work.name} {setting}: {count / results[setting][-1]['seconds']:.2f}/s", file=sys.stderr)
    return summarise(work, settings, results, count)


def same_caption(row, reference) -> bool:
    """Row's tokens are generate()'s for the same row: the whole caption, or, where generate() ran the
    row past its own cap (its batch's longest cap), the first generated_tokens words (one per token)."""
    if row.generated_tokens == reference.generated_tokens:
        return row.caption == reference.caption
    words = row.caption.split()
    return (
        len(words) == row.generated_tokens < reference.generated_tokens
        and words == reference.caption.split()[: row.generated_tokens]
    )


def matches(work: Workload, path: str, row, reference, index: int) -> bool:
    """A row is generate()'s same row (and, on a static path of a capped model, exactly its cap long)."""
    capped = work.caps is not None and path != "generate"
    return same_caption(row, reference) and (not capped or row.generated_tokens == work.caps[index])


def summarise(work: Workload, settings, results, count: int) -> list[dict]:
    rows = []
    for path, budget, batch in settings:
        runs = results[path, budget, batch]
        reference = results["generate", budget, batch][0]["captions"]
        same = sum(all(matches(work, path, run["captions"][i], reference[i], i) for run in runs) for i in range(count))
        decode, steps = statistics.median(r["decode"] for r in runs), runs[0]["steps"]
        seconds = [r["seconds"] for r in runs]
        rows.append(
            {
                "model": work.name,
                "rows": count,
                "batch": batch,
                "budget": budget,
                "decode": path,
                "captions/s": count / statistics.median(seconds),
                # how far the runs of a setting spread around their median (noise on a shared machine)
                "spread": f"±{50 * (max(seconds) - min(seconds)) / statistics.median(seconds):.0f} %",
                "decode s": decode,
                "steps": steps,
                "ms/step": 1000 * decode / steps,
                "same captions": "yes" if same == count else f"NO: {same}/{count} rows",
                "caption lengths": length_summary([c.generated_tokens for c in runs[0]["captions"]]),
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


def caption_length_summaries(rows: list[dict]) -> dict:
    """Per budget, the distribution of each row's own caption length (tokens, eos included), from the
    static+refill run (generate() pads a random model's rows to their batch's longest)."""
    return {
        row["budget"]: row["caption lengths"]
        for row in rows
        if row["decode"] == "static+refill" and row["batch"] == rows[0]["batch"]
    }


def grid(work: Workload, args) -> tuple[list[dict], list[dict]]:
    """The grid (every batch x budget x path) and, for carve-tiny-hard, the target setting."""
    settings = [(p, b, batch) for batch in args.batches for b in BUDGETS for p in PATHS]
    target = [(p, TARGET_BUDGET, TARGET_BATCH) for p in PATHS] if args.targets and work.caps is None else []
    engines = build_engines(work, sorted({(batch, budget) for _, budget, batch in settings + target}), args)
    warm_up(work, engines, args)
    rows = measure(work, engines, settings, work.rows, work.repeats)
    return rows, measure(work, engines, target, args.target_rows, work.repeats) if target else []


def target_lines(rows: list[dict]) -> list[str]:
    """The issue's two CPU targets against what was measured."""
    by_path = {row["decode"]: row for row in rows}
    step, end_to_end = by_path["static"]["x ms/step"], by_path["static+refill"]["x captions/s"]
    verdict = lambda value, goal: "met" if value >= goal else "missed"  # noqa: E731
    return [
        f"- decode ms per step, static (no refill) vs generate(), batch {TARGET_BATCH}, {TARGET_BUDGET}: "
        f"{by_path['generate']['ms/step']:.2f} -> {by_path['static']['ms/step']:.2f} ms, **{step:.2f}x** "
        f"(target >= {TARGET_MS_PER_STEP}x: {verdict(step, TARGET_MS_PER_STEP)})",
        f"- captions/s end to end, {rows[0]['rows']} captions through {TARGET_BATCH} slots with refill vs "
        f"generate() in batches of {TARGET_BATCH}: {by_path['generate']['captions/s']:.2f} -> "
        f"{by_path['static+refill']['captions/s']:.2f}, **{end_to_end:.2f}x** "
        f"(target >= {TARGET_CAPTIONS}x: {verdict(end_to_end, TARGET_CAPTIONS)})",
    ]


COLUMNS = ["batch", "budget", "decode", "captions/s", "x captions/s", "spread", "ms/step", "x ms/step", "steps"]
COLUMNS += ["steps saved", "same captions"]


def report(env, sections: list[dict], args) -> str:
    lines = ["# Decode paths on this CPU (benchmarks/bench_decode.py)", "", header(env), ""]
    lines += [
        f"Static step compiled: {args.compile}. Ratios are to generate() at the same batch and budget; "
        f"spread: half the range of a setting's run times around their median."
    ]
    for section in sections:
        lengths = "; ".join(
            f"{budget} p50 {s['p50']}, p95 {s['p95']}, max {s['max']}, mean {s['mean']:.1f}"
            for budget, s in section["caption_lengths"].items()
        )
        same = all(r["same captions"] == "yes" for r in section["settings"] + section["targets"])
        lines += ["", f"## {section['model']}", "", section["about"] + "."]
        lines += [f"Caption lengths (tokens, eos included): {lengths}."]
        lines += [f"Same captions as generate(), token for token, in every setting: {'yes' if same else 'NO'}."]
        lines += ["", markdown_table(section["settings"], COLUMNS)]
        if section["targets"]:
            lines += [
                "",
                f"### The issue's targets ({section['model']}, {args.target_rows} rows, median of {args.repeats} runs)",
            ]
            lines += ["", markdown_table(section["targets"], COLUMNS), "", *target_lines(section["targets"])]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--batches", default="8,32,64", help="batch sizes (= slots), comma-separated")
    p.add_argument("--rows", type=int, default=192, help="carve-tiny-hard: captions per setting (a multiple of B)")
    p.add_argument("--repeats", type=int, default=3, help="carve-tiny-hard: interleaved runs per setting")
    p.add_argument("--llava-scale", choices=sorted(LLAVA15_SCALES), default="cpu")
    p.add_argument("--llava-rows", type=int, default=64, help="llava-1.5-random: captions per setting")
    p.add_argument("--llava-repeats", type=int, default=3, help="llava-1.5-random: interleaved runs per setting")
    p.add_argument("--targets", choices=["yes", "no"], default="yes", help="also run the issue's target setting")
    p.add_argument("--target-rows", type=int, default=96, help="rows of the target setting (through 32 slots)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--compile", choices=["yes", "no"], default="yes", help="compile the static step")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--out", help="write the Markdown here (e.g. docs/benchmarks/decode.md)")
    p.add_argument("--json", help="write the figures here (e.g. docs/benchmarks/decode.json)")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    if set(args.models) - set(MODELS):
        p.error(f"--models takes {', '.join(MODELS)}")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.targets = args.targets == "yes"
    for rows in (args.rows, args.llava_rows):  # a short last batch would run with fewer slots
        if any(rows % batch for batch in args.batches):
            p.error(f"--rows / --llava-rows must be multiples of every batch ({args.batches})")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.compile == "yes":  # every pool (model x batch x budget) compiles the step anew; past 8, dynamo refuses
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    env = environment("cpu")
    load = os.getloadavg()[0]  # other work on the same cores shows here
    sections = []
    for name in args.models:
        work = workload(name, args)
        settings, targets = grid(work, args)
        sections.append(
            {
                "model": name,
                "about": work.about,
                "caption_lengths": caption_length_summaries(settings),
                "settings": settings,
                "targets": targets,
            }
        )
        del work  # one model in memory at a time
    env["load average, start / end"] = f"{load:.1f} / {os.getloadavg()[0]:.1f}"
    text = report(env, sections, args)
    print(text)
    record = {"environment": env, "models": sections, "args": vars(args)}
    write_results(text, record, args.out, args.json)
    return record


if __name__ == "__main__":
    main()
