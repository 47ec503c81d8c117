"""The generation settings checkpoints ship, on the static path (tokencarve.decode.GenerationSettings).

Greedy with a repetition penalty, min_new_tokens and stop strings give generate()'s tokens on every
family, refill included; Qwen-VL Instruct's shipped settings (sampling with top_k 1 and a penalty) run
static and equal generate(); sampling is reproducible per row seed, invariant to the batch and slot a
row decodes in, and draws from the distribution generate()'s warpers define."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tokencarve.decode import Features, GenerationSettings, RowChoice, choose_tokens
from tokencarve.engine import CaptionEngine, EngineConfig, preflight, row_seed

from .test_decode import PROMPTS, engines, family_dirs, pictures, same_tokens, sample_rows  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
HARD = str(ROOT / "models" / "carve-tiny-hard")
QWEN = ROOT / "models" / "carve-tiny-qwen"
# Qwen2.5-VL-7B-Instruct's generation_config.json, as the hub ships it (Qwen2-VL's has temperature 0.01)
QWEN_SHIPPED = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 1e-06, "top_k": 1, "top_p": 0.001}


def both(path: str, slots: int = 2, **settings):
    return engines(path, decode_slots=slots, **settings)


# OneVision's full processor needs torchvision: its penalty is tested below the engine (test_decode.py)
@pytest.mark.parametrize("family", ["llava", "next", "qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
@pytest.mark.parametrize("method,keep", [("none", 64), ("volume", 16), ("tokencarve", 0.25)])
def test_a_repetition_penalty_gives_generates_tokens_on_every_family(family_dirs, family, method, keep):  # noqa: F811
    reference, static = both(family_dirs[family], repetition_penalty=1.3, max_new_tokens=12)
    images = pictures([(180, 80), (80, 80), (120, 240), (100, 100)])
    expected = reference.caption(images, PROMPTS, method=method, keep=keep)  # 4 rows through 2 slots
    same_tokens(expected, static.caption(images, PROMPTS, method=method, keep=keep))
    plain = engines(family_dirs[family], decode_slots=2, max_new_tokens=12)[1]
    assert [c.caption for c in plain.caption(images, PROMPTS, method=method, keep=keep)] != [
        c.caption for c in expected
    ]


def test_penalty_and_min_new_tokens_on_natural_captions():
    images, prompts = sample_rows(12)
    for settings in ({"repetition_penalty": 1.2}, {"min_new_tokens": 6}):
        reference, static = engines(HARD, decode_slots=4, max_new_tokens=32, **settings)
        expected = reference.caption(images, prompts)
        same_tokens(expected, static.caption(images, prompts))
        if "min_new_tokens" in settings:
            assert min(c.generated_tokens for c in expected) >= 6


@pytest.mark.parametrize("sync_every", [1, 8])  # a CPU's look after every step, a GPU's after eight
def test_stop_strings_end_a_row_with_the_token_that_completes_one(sync_every, monkeypatch):
    """generate()'s StopStringCriteria cannot index a word-level vocabulary (the test models'), so the
    reference is its definition: the row's greedy tokens up to the first one whose text completes a stop
    string, which stays in the caption; also where the host looks only every eight steps (the row has
    run past its stop string by then, or even ended)."""
    from tokencarve.decode import StaticDecoder

    monkeypatch.setattr(StaticDecoder, "SYNC_EVERY", {"cpu": sync_every})
    images, prompts = sample_rows(12)
    stops = [" star", "yellow"]
    reference, static = engines(HARD, decode_slots=4, max_new_tokens=32)
    stopped = CaptionEngine(
        replace(static.config, stop=json.dumps(stops)), model=static.model, processor=static.processor
    )
    tokenizer = static.processor.tokenizer
    got = stopped.caption(images, prompts)
    for full, mine in zip(reference.caption(images, prompts), got):
        ids = tokenizer(full.caption, add_special_tokens=False).input_ids
        end = next((n for n in range(1, len(ids) + 1) if any(s in tokenizer.decode(ids[:n]) for s in stops)), None)
        if end is None:
            assert mine.caption == full.caption
        else:
            assert mine.caption == tokenizer.decode(ids[:end]).strip() and mine.generated_tokens == end
    assert sum(c.caption.endswith((" star", "yellow")) for c in got) >= 3


def shipped_qwen(folder: Path) -> str:
    shutil.copytree(QWEN, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps(config | QWEN_SHIPPED))
    return str(folder)


def test_qwens_shipped_settings_run_static_and_equal_generate(tmp_path):
    path = shipped_qwen(tmp_path / "qwen-instruct")
    preflight(EngineConfig(model=path))  # what a job's driver checks before claiming an output: no refusal
    reference, static = engines(path, decode_slots=2, max_new_tokens=24, keep=0.25)
    assert static.generation.repetition_penalty == 1.05 and not static.generation.samples  # top_k 1: greedy
    images = pictures([(224, 224), (448, 224), (224, 336), (280, 280)])
    prompts = ["Describe the image.", "How many objects?", None, "What colour is the largest object?"]
    same_tokens(reference.caption(images, prompts), static.caption(images, prompts))


def sampling_engine(**settings) -> CaptionEngine:
    config = EngineConfig(
        model=HARD, decode_slots=4, max_new_tokens=24, compile_decode="no", do_sample=True, **settings
    )
    return CaptionEngine(config)


@pytest.mark.slow  # ~50 s: 40 hot-sampled captions, four ways
def test_sampling_is_reproducible_per_row_seed_and_invariant_to_the_batch():
    engine = sampling_engine(temperature=4.0, top_k=50, top_p=0.99)  # hot: the test model is very sure
    images, prompts = sample_rows(10)
    seeds = [row_seed(0, f"row-{i}") for i in range(10)]
    first = [c.caption for c in engine.caption(images, prompts, seeds=seeds)]
    assert [c.caption for c in engine.caption(images, prompts, seeds=seeds)] == first
    # each row alone, and the rows in reverse order (other slots, other neighbours, other chunks)
    alone = [engine.caption([i], [p], seeds=[s])[0].caption for i, p, s in zip(images, prompts, seeds)]
    reverse = [c.caption for c in engine.caption(images[::-1], prompts[::-1], seeds=seeds[::-1])][::-1]
    assert alone == first and reverse == first
    other = [c.caption for c in engine.caption(images, prompts, seeds=[s + 1 for s in seeds])]
    assert other != first  # the seed decides the draw
    greedy = CaptionEngine(
        EngineConfig(model=HARD, decode_slots=4, max_new_tokens=24, compile_decode="no"),
        model=engine.model,
        processor=engine.processor,
    )
    assert [c.caption for c in greedy.caption(images, prompts)] != first


def warped_probabilities(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """What generate()'s warpers leave to sample from (transformers' own classes)."""
    scores = logits[None].clone()
    for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)):
        scores = warper(None, scores)
    return scores.softmax(-1)[0]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 12, 1.0), (1.3, 0, 0.8), (1.0, 8, 0.6)])
def test_sampling_draws_from_generates_distribution(temperature, top_k, top_p):
    vocab, draws = 40, 40_000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(7)) * 2
    rows = RowChoice(
        penalty=torch.ones(draws),
        min_new=torch.zeros(draws, dtype=torch.long),
        sample=torch.ones(draws, dtype=torch.bool),
        temperature=torch.full((draws,), temperature),
        top_k=torch.full((draws,), top_k, dtype=torch.long),
        top_p=torch.full((draws,), top_p),
        seed=torch.arange(draws),
    )
    count = torch.full((draws,), 3, dtype=torch.long)
    eos = torch.zeros(vocab, dtype=torch.bool)
    drawn = choose_tokens(logits.expand(draws, -1), rows, count, eos, None, Features(sampling=True))
    observed = torch.bincount(drawn, minlength=vocab).double() / draws
    expected = warped_probabilities(logits, temperature, top_k or vocab, top_p).double()
    assert (observed[expected == 0] == 0).all()  # nothing outside top-k / top-p
    assert 0.5 * (observed - expected).abs().sum() < 0.02  # total variation
    # the draw is a pure function of (seed, token index): the same again, another index draws anew
    assert torch.equal(choose_tokens(logits.expand(draws, -1), rows, count, eos, None, Features(sampling=True)), drawn)
    assert not torch.equal(
        choose_tokens(logits.expand(draws, -1), rows, count + 1, eos, None, Features(sampling=True)), drawn
    )


def test_the_penalty_and_min_new_tokens_change_logits_as_generates_processors_do():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 3
    history = torch.randint(0, 50, (6, 9), generator=torch.Generator().manual_seed(2))
    seen = torch.zeros(6, 50, dtype=torch.bool).scatter_(1, history, True)
    rows = RowChoice(
        penalty=torch.full((6,), 2.5),
        min_new=torch.tensor([0, 0, 5, 5, 0, 0]),
        sample=torch.zeros(6, dtype=torch.bool),
        temperature=torch.ones(6),
        top_k=torch.zeros(6, dtype=torch.long),
        top_p=torch.ones(6),
        seed=torch.zeros(6, dtype=torch.long),
    )
    eos = torch.zeros(50, dtype=torch.bool)
    eos[3] = True
    logits[:, 3] = 100  # eos would win
    penalised = RepetitionPenaltyLogitsProcessor(2.5)(history, logits.clone())
    penalised[2:4, 3] = float("-inf")  # rows 2 and 3 have generated fewer than min_new tokens
    got = choose_tokens(logits, rows, torch.full((6,), 2), eos, seen, Features(penalty=True, min_new=True))
    assert got.tolist() == penalised.argmax(-1).tolist()


def test_settings_are_read_as_generate_reads_them_and_refused_only_where_the_step_cannot():
    from transformers import GenerationConfig

    shipped = GenerationSettings.resolve(GenerationConfig(**QWEN_SHIPPED))
    assert shipped.do_sample and shipped.top_k == 1 and not shipped.samples
    assert GenerationSettings.resolve(GenerationConfig(do_sample=True)).top_k == 50  # generate()'s default
    overridden = GenerationSettings.resolve(GenerationConfig(**QWEN_SHIPPED), top_k=0, temperature=0.8)
    assert overridden.samples and overridden.temperature == 0.8
    with pytest.raises(ValueError, match="min_p=0.1.*--decode generate"):
        GenerationSettings.resolve(GenerationConfig(do_sample=True, min_p=0.1))
    with pytest.raises(ValueError, match="top_p"):
        EngineConfig(model=HARD, top_p=0.0)
