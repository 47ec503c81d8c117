"""The static decode path (tokencarve.decode) gives generate()'s greedy tokens, row for row, in a bounded pool.

Every family we support, stock and carved, mixed prompt lengths (left padding), rows finishing at
different steps, refill (more rows than slots: each row's tokens equal its own single-row
generation), a long row that lays the pool out again within its budget; the compiled step compiles
its read buckets whole, at start and never after, keeps the pool's buffers, and falls back to eager
where a shape cannot compile."""

from __future__ import annotations

import io
from dataclasses import replace
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tokencarve import CarveConfig
from tokencarve.decode import Layout, StaticDecoder
from tokencarve.engine import GENERATION_FIELDS, CaptionEngine, EngineConfig

ROOT = Path(__file__).resolve().parent.parent
HARD = str(ROOT / "models" / "carve-tiny-hard")
PROMPTS = [None, "What colour is the large object in the top left corner of the picture?", "How many?", None]


def sample_rows(count: int):
    """Images and prompts of the bundled sample corpus: captions and questions, natural lengths."""
    table = pq.read_table(ROOT / "data" / "sample" / "shard-00000.parquet").slice(0, count)
    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in table.column("image").to_pylist()]
    return images, table.column("prompt").to_pylist()


def pictures(sizes):
    return [
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=torch.Generator().manual_seed(i)).byte().numpy())
        for i, (w, h) in enumerate(sizes)
    ]


def engines(path: str, **static):
    """A generate() engine and a static one on the same loaded model (eager step unless told); the
    generation settings, max_new_tokens and keep among `static` go to both."""
    shared = {"max_new_tokens": 12} | {
        name: static.pop(name) for name in list(static) if name in (*GENERATION_FIELDS, "max_new_tokens", "keep")
    }
    reference = CaptionEngine(EngineConfig(model=path, decode="generate", **shared))
    config = EngineConfig(model=path, decode="static", **{"compile_decode": "no", **shared, **static})
    return reference, CaptionEngine(config, model=reference.model, processor=reference.processor)


def same_tokens(expected, got):
    assert [c.caption for c in got] == [c.caption for c in expected]
    assert [c.generated_tokens for c in got] == [c.generated_tokens for c in expected]
    assert [(c.visual_tokens_in, c.visual_tokens_kept, c.prompt_tokens) for c in got] == [
        (c.visual_tokens_in, c.visual_tokens_kept, c.prompt_tokens) for c in expected
    ]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from tokencarve.testing import (
        QWEN_FAMILIES,
        save_tiny_llava_next_with_processor,
        save_tiny_llava_onevision_with_processor,
        save_tiny_llava_with_processor,
        save_tiny_qwen_vl_with_processor,
    )

    dirs = {}
    for name, save in [
        ("llava", save_tiny_llava_with_processor),
        ("next", save_tiny_llava_next_with_processor),
        ("onevision", save_tiny_llava_onevision_with_processor),
        *((family, partial(save_tiny_qwen_vl_with_processor, family=family)) for family in QWEN_FAMILIES),
    ]:
        dirs[name] = str(tmp_path_factory.mktemp(f"decode-{name}"))
        save(dirs[name])
    return dirs


@pytest.mark.parametrize("family", ["next", "onevision"])
@pytest.mark.parametrize("keep", [None, 0.3])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_the_decoder_gives_generates_tokens_on_the_model_alone(family_dirs, family, keep, penalty):
    """Below the engine, on the model and the family's own image processor (OneVision's full processor
    needs torchvision): several images per prompt, text-only rows, left padding, refill through 2 slots,
    with and without a repetition penalty."""
    import tokencarve
    from tokencarve.decode import Features, GenerationSettings, eos_ids, prefill

    from .tiny_family import Prompt, load, make_batch

    path = family_dirs[family]
    model = tokencarve.apply(load(path, family), tokencarve.CarveConfig(keep=keep, method="volume"))
    prompts = [Prompt(2, [(90, 40)], 3), Prompt(5, [], 2, seed=1), Prompt(1, [(40, 40), (60, 30)], 4, seed=2)]
    prompts.append(Prompt(3, [(50, 80)], 1, seed=3))
    batch = make_batch(model, path, family, prompts)
    with torch.inference_mode():
        sequences = model.generate(**batch.inputs, max_new_tokens=10, do_sample=False, repetition_penalty=penalty)
    expected = sequences[:, batch.inputs["input_ids"].shape[1] :].tolist()
    eos = eos_ids(model.generation_config)
    settings = GenerationSettings(repetition_penalty=penalty)
    decoder = StaticDecoder(
        model, model.tokencarve.language_model, eos, slots=2, kv_cache_bytes=1 << 26, compile=False,
        features=Features.of([settings]),
    )  # fmt: skip
    with torch.inference_mode():
        decoded = decoder.run(
            len(prompts),
            10,
            lambda rows: prefill(model, make_batch(model, path, family, [prompts[i] for i in rows]).inputs),
            settings,
        )
    for row, result in zip(expected, decoded):
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        assert result.tokens == row[:cut]


@pytest.fixture(scope="module")
def hard():
    return engines(HARD, decode_slots=4)


# LLaVA-1.5 and NeXT with a slot per row and with refill (2 slots, 4 rows); the Qwen-VL family refills
@pytest.mark.parametrize(
    "family, slots",
    [("llava", 4), ("llava", 2), ("next", 4), ("next", 2), ("qwen2-vl", 2), ("qwen2.5-vl", 2), ("qwen3-vl", 2)],
)
@pytest.mark.parametrize("method,keep", [("none", 64), ("volume", 16), ("tokencarve", 0.25)])
def test_the_engine_gives_generates_tokens(family_dirs, family, method, keep, slots):
    reference, static = engines(family_dirs[family], decode_slots=slots)
    # any-resolution families: different counts (Qwen2-VL: native grids of 9 to 40 tokens at these sizes)
    images = pictures([(180, 80), (80, 80), (120, 240), (100, 100)])
    expected = reference.caption(images, PROMPTS, method=method, keep=keep)
    got = static.caption(images, PROMPTS, method=method, keep=keep)
    same_tokens(expected, got)
    if method != "none":  # each image its own budget; an image with fewer tokens stays whole
        budget = CarveConfig(keep=keep).budget
        assert [c.visual_tokens_kept for c in got] == [min(c.visual_tokens_in, budget(c.visual_tokens_in)) for c in got]
        assert any(c.visual_tokens_kept < c.visual_tokens_in for c in got)


@pytest.mark.parametrize("method", ["none", "volume", "tokencarve"])
def test_rows_of_natural_length_finish_on_their_own_step(hard, method):
    reference, static = hard
    images, prompts = sample_rows(12)
    expected = reference.caption(images, prompts, max_new_tokens=48, method=method)
    got = static.caption(images, prompts, max_new_tokens=48, method=method)  # 12 rows through 4 slots
    same_tokens(expected, got)
    lengths = [c.generated_tokens for c in got]
    assert len(set(lengths)) >= 3 and max(lengths) < 48  # eos ends rows at different steps
    # refill: a row's tokens are its own, whoever shared the pool with it
    alone = [
        static.caption([image], [prompt], max_new_tokens=48, method=method)[0] for image, prompt in zip(images, prompts)
    ]
    assert [c.caption for c in alone] == [c.caption for c in got]


def test_figures_and_timing_on_the_static_path(hard):
    reference, static = hard
    images, prompts = sample_rows(6)
    expected = reference.caption(images, prompts, max_new_tokens=48, keep=32)
    got = static.caption(images, prompts, max_new_tokens=48, keep=32)
    timing = static.last_timing
    assert (
        timing.prefill_seconds > 0 and timing.decode_seconds > 0 and 0 < timing.carve_seconds < timing.prefill_seconds
    )
    for mine, theirs in zip(got, expected):
        # a row's cache: its prompt and what it generated before its last token (generate() holds the
        # longest row's steps for every row of its batch)
        steps = max(c.generated_tokens for c in expected) - 1
        per_token = theirs.kv_bytes_uncompressed // (theirs.prompt_tokens + steps)
        assert mine.kv_bytes_uncompressed == per_token * (mine.prompt_tokens + mine.generated_tokens - 1)
        assert mine.kv_bytes_held < mine.kv_bytes_uncompressed and mine.latency_s > 0


def test_one_new_token_and_a_long_row_that_lays_the_pool_out_again(hard):
    """A row longer than the pool's capacity waits for the pool to drain; the pool is released, then laid
    out again with half the slots and twice the capacity (within the same budget), and as before at the
    next call; tokens stay generate()'s throughout and the pool never holds more than its budget."""
    import weakref

    reference, static = hard
    images, prompts = sample_rows(8)
    same_tokens(reference.caption(images, prompts, max_new_tokens=1), static.caption(images, prompts, max_new_tokens=1))
    # a budget whose 4 slots hold 128 entries each: a 120-token answer does not fit beside its prompt
    budget = static.decoder.shape.pool_bytes(Layout(4, 128), static.decoder.features)
    tight = CaptionEngine(
        replace(static.config, kv_cache_memory=budget), model=static.model, processor=static.processor
    )
    assert (tight.decoder.pool.slots, tight.decoder.pool.capacity) == (4, 128)
    released = weakref.ref(tight.decoder.pool.cache.keys[0])
    prompts = [None, "How many?", None, "How many?", None, None]
    caps = [8, 8, 8, 8, 120, 8]  # the long one arrives on refill, while the others decode
    expected = [reference.caption([i], [p], max_new_tokens=c)[0] for i, p, c in zip(images, prompts, caps)]
    decoder = tight.decoder
    got = [None] * len(caps)
    for cap in sorted(set(caps)):  # one call per cap; the long row's call relays the pool out
        rows = [i for i, c in enumerate(caps) if c == cap]
        for row, caption in zip(
            rows, tight.caption([images[i] for i in rows], [prompts[i] for i in rows], max_new_tokens=cap)
        ):
            got[row] = caption
        if cap == 120:
            assert (decoder.pool.slots, decoder.pool.capacity) == (2, 256) and released() is None
    same_tokens(expected, got)
    assert decoder.stats.relayouts == 1 and decoder.stats.peak_pool_bytes <= budget
    tight.caption(images[:2], prompts[:2], max_new_tokens=8)
    assert (decoder.pool.slots, decoder.pool.capacity) == (4, 128)  # the first layout again, for rows that fit


def test_settings_the_step_cannot_apply_are_refused_naming_them(family_dirs):
    reference, _ = engines(family_dirs["llava"])
    reference.model.generation_config.no_repeat_ngram_size = 3
    try:
        with pytest.raises(ValueError, match="no_repeat_ngram_size=3.*--decode generate"):
            CaptionEngine(
                EngineConfig(model=family_dirs["llava"], decode="static"),
                model=reference.model,
                processor=reference.processor,
            )
    finally:
        reference.model.generation_config.no_repeat_ngram_size = None


def compiled_engines(path: str, capacity: int, **settings):
    """generate() and a compiled static engine (4 slots, a budget of `capacity` entries per slot), from
    a fresh compile cache."""
    torch._dynamo.reset()
    reference = CaptionEngine(EngineConfig(model=path, decode="generate"))
    probe = CaptionEngine(
        EngineConfig(model=path, decode_slots=4, compile_decode="no", kv_cache_memory=1 << 30),
        model=reference.model,
        processor=reference.processor,
    )
    budget = probe.decoder.shape.pool_bytes(Layout(4, capacity), probe.decoder.features)
    config = EngineConfig(model=path, decode_slots=4, compile_decode="yes", kv_cache_memory=budget, **settings)
    return reference, CaptionEngine(config, model=reference.model, processor=reference.processor)


@pytest.mark.slow
def test_the_compiled_step_compiles_its_buckets_at_start_and_nothing_after(family_dirs):
    """Batches of 1 to 16 rows with mixed max_new_tokens (a Serve replica's, a job's ragged blocks): every
    shape is compiled at start (one per read bucket of the pool), whole (fullgraph), none after; no row
    fails, tokens are generate()'s, and the pool keeps its buffers."""
    from tokencarve.decode import buckets_up_to

    reference, static = compiled_engines(family_dirs["llava"], 256)
    decoder = static.decoder
    assert decoder.stats.shapes_compiled == len(buckets_up_to(256)) == 3 and decoder.stats.warmup_seconds > 0
    pool, addresses = decoder.pool, [t.data_ptr() for t in decoder.pool.buffers()]
    images = pictures([(40 + 8 * i, 40) for i in range(16)])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in range(1, 17):
            cap = (4, 24, 60, 120)[rows % 4]
            expected = reference.caption(images[:rows], (PROMPTS * 4)[:rows], max_new_tokens=cap, keep=16)
            same_tokens(expected, static.caption(images[:rows], (PROMPTS * 4)[:rows], max_new_tokens=cap, keep=16))
    assert decoder.pool is pool and [t.data_ptr() for t in pool.buffers()] == addresses
    assert decoder.stats.shapes_compiled == 3 and decoder.stats.eager_fallbacks == 0


@pytest.mark.slow
def test_a_shape_that_cannot_compile_runs_eagerly_with_a_warning(family_dirs, monkeypatch):
    """A recompile limit hit (here: a long row's new layout once the allowance is spent) is no row's
    failure: that shape runs eagerly, warned and counted, and the tokens are still generate()'s."""
    reference, static = compiled_engines(family_dirs["llava"], 128)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", static.decoder.stats.shapes_compiled)
    images = pictures([(60, 40), (40, 60)])
    expected = reference.caption(images, PROMPTS[:2], max_new_tokens=150, keep=16)
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        got = static.caption(images, PROMPTS[:2], max_new_tokens=150, keep=16)
    same_tokens(expected, got)
    assert static.decoder.stats.eager_fallbacks >= 1 and static.decoder.stats.relayouts == 1


def test_refill_prefills_a_few_rows_at_a_time(hard, monkeypatch):
    """An 8-slot pool refills in chunks of at least 4 rows (a prefill call has a fixed cost), and
    the rows keep generate()'s tokens whichever chunk they entered with."""
    import tokencarve.engine as engine_module

    reference, static = hard
    images, prompts = sample_rows(20)
    expected = reference.caption(images, prompts, max_new_tokens=48)
    chunks, original = [], engine_module.prefill_rows

    def counted(model, inputs):
        chunks.append(inputs["input_ids"].shape[0])
        return original(model, inputs)

    monkeypatch.setattr(engine_module, "prefill_rows", counted)
    eight = CaptionEngine(replace(static.config, decode_slots=8), model=static.model, processor=static.processor)
    same_tokens(expected, eight.caption(images, prompts, max_new_tokens=48))
    assert chunks[0] == 8 and sum(chunks) == 20 and len(chunks) > 3  # refilled, not run as batches of 8
    assert all(size >= 4 for size in chunks[1:-1]) and chunks[-1] >= min(4, 20 - sum(chunks[:-1]))
