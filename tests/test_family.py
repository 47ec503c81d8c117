"""TokenCarve on LLaVA-NeXT (Mistral decoder: GQA, untied) and LLaVA-OneVision (Qwen2 decoder: GQA,
q/k/v biases, tied embeddings): images of different sizes, so of different token counts, in one
batch; exactness against the slow reference; batch invariance; multi-image prompts; removal."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

import tokencarve
from tokencarve import CarveConfig
from tokencarve.testing import IMAGE_TOKEN, tiny_llava_next, tiny_llava_next_config

from . import reference
from .tiny_family import FAMILIES, SAVE, Prompt, image_kwargs, load, make_batch, picture

CUT = 2
# One image each, three sizes: 36, 68 and 172 tokens on NeXT (36, 68, 88 on OneVision, whose
# anyres_max_4 shrinks the 3 x 3 tiling of the largest); the last row's image has the first one's
# size (other pixels), so the core carves those two in one batched call.
PROMPTS = [
    Prompt(5, [(56, 56)], 9, seed=1),
    Prompt(17, [(150, 60)], 3, seed=2),
    Prompt(2, [(200, 190)], 14, seed=3),
    Prompt(8, [(56, 56)], 5, seed=4),
]
# Two images back to back (no text between them), and a text-only prompt.
MIXED = [Prompt(4, [(60, 120), (56, 56)], 6, gap=0, seed=5), Prompt(7, [], 0, seed=6)]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    SAVE[request.param](path)
    sdpa, eager = load(path, request.param, "sdpa"), load(path, request.param, "eager")
    return dict(
        name=request.param,
        path=path,
        sdpa=sdpa,
        eager=eager,
        batch=make_batch(sdpa, path, request.param, PROMPTS),
        mixed=make_batch(sdpa, path, request.param, MIXED),
    )


@pytest.fixture
def carved(family):
    model = family["sdpa"]

    def _apply(**config):
        return tokencarve.apply(model, CarveConfig(layer=CUT, **config))

    yield _apply
    if tokencarve.is_applied(model):
        tokencarve.remove(model)


def generate(model, inputs, steps=10):
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, 1)


def test_images_really_differ_in_size_and_the_spans_are_the_models(family, carved):
    batch = family["batch"]
    counts = [c[0] for c in batch.counts]
    assert len(set(counts)) == 3 and counts[0] == counts[3]  # three token counts in one batch
    carved(keep=10_000).tokencarve.record_hidden = True
    with torch.no_grad():
        family["sdpa"](**batch.inputs)
    images = family["sdpa"].tokencarve.last_stats.images
    assert [len(image.assignment) for image in images] == counts
    for row, image in enumerate(images):  # each span starts at the image's first placeholder
        first = batch.inputs["input_ids"][row].tolist().index(IMAGE_TOKEN)
        assert (image.sample, image.first_position) == (row, first)


def test_back_to_back_images_are_separated_by_their_feature_lengths(family, carved):
    mixed = family["mixed"]
    assert len(mixed.counts[0]) == 2
    carved(keep=10_000).tokencarve.record_hidden = True
    with torch.no_grad():
        family["sdpa"](**mixed.inputs)
    images = family["sdpa"].tokencarve.last_stats.images
    first = mixed.inputs["input_ids"][0].tolist().index(IMAGE_TOKEN)
    assert [(i.sample, i.first_position, len(i.assignment)) for i in images] == [
        (0, first, mixed.counts[0][0]),
        (0, first + mixed.counts[0][0], mixed.counts[0][1]),
    ]


def test_processor_expands_every_visual_token_to_the_image_token(tmp_path):
    """NeXT's own processor (loaded from the saved folder) writes base, tile and newline tokens
    alike as the image token, as many as the model makes, also for back-to-back images."""
    SAVE["next"](tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    model = load(tmp_path, "next")
    images = [picture(56, 56), picture(150, 60, 1), picture(200, 190, 2)]
    inputs = processor(
        text=["USER: <image><image> Describe the image . ASSISTANT:", "<image> What is in a image ?"],
        images=images,
        return_tensors="pt",
        padding=True,
    )
    tokencarve.apply(model, CarveConfig(keep=0.25, layer=CUT))
    with torch.no_grad():
        out = model(**inputs)
    counts = [len(f) for f in out.image_outputs.pooler_output]
    assert (inputs["input_ids"] == IMAGE_TOKEN).sum(1).tolist() == [counts[0] + counts[1], counts[2]]
    stats = model.tokencarve.last_stats
    assert [len(i.assignment) for i in stats.images] == counts
    assert [len(i.index) for i in stats.images] == [math.ceil(n / 4) for n in counts]


@pytest.mark.parametrize("keep", [10_000, 0.999])
def test_keep_all_tokens_is_exactly_the_stock_model(family, carved, keep):
    model, inputs = family["sdpa"], family["batch"].inputs
    with torch.no_grad():
        stock_logits = model(**inputs).logits
    stock_tokens, stock_steps = generate(model, inputs)
    carved(keep=keep)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock_logits)
    tokens, steps = generate(model, inputs)
    assert torch.equal(tokens, stock_tokens) and torch.equal(steps, stock_steps)
    assert model.tokencarve.last_stats.visual_tokens_kept == [c[0] for c in family["batch"].counts]


def carved_hidden_entering_cut(model, seen):
    def hook(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]

    return model.model.language_model.layers[CUT].register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize(
    "keep,method",
    [
        (8, "tokencarve"),
        (30, "tokencarve"),
        (1, "tokencarve"),
        (0.25, "tokencarve"),
        (0.1, "tokencarve"),
        (0.5, "information"),
        (12, "attention"),
    ],
)
def test_prefill_matches_the_slow_reference(family, carved, keep, method):
    model, batch = family["sdpa"], family["batch"]
    carved(keep=keep, method=method)
    seen = {}
    handle = carved_hidden_entering_cut(model, seen)
    try:
        with torch.no_grad():
            logits = model(**batch.inputs).logits[:, -1]
    finally:
        handle.remove()
    stats = model.tokencarve.last_stats
    for row, ids in enumerate(batch.ids):
        r = batch.rows[row]
        ref = reference.reference_prefill(
            family["eager"], ids, r["pixel_values"], keep, CUT, method=method, **image_kwargs(r)
        )
        assert stats.images[row].index.tolist() == ref.kept[0]
        torch.testing.assert_close(
            seen["hidden"][row, -ref.carved_hidden.shape[0] :], ref.carved_hidden, rtol=1e-4, atol=5e-4
        )
        torch.testing.assert_close(logits[row], ref.prefill_logits, rtol=1e-4, atol=1e-4)
        n = batch.counts[row][0]
        assert stats.visual_tokens_kept[row] == min(n, reference.budget(keep, n))


@pytest.mark.parametrize("keep", [40, 0.2])
def test_cache_and_greedy_decode_match_the_reference(family, carved, keep):
    """keep=40 leaves the 36-token image uncarved next to carved ones."""
    model, batch = family["sdpa"], family["batch"]
    carved(keep=keep)
    kept = [min(c[0], reference.budget(keep, c[0])) for c in batch.counts]
    lengths = [len(ids) - c[0] + k for ids, c, k in zip(batch.ids, batch.counts, kept)]
    with torch.no_grad():
        out = model(**batch.inputs, use_cache=True)
    for layer in out.past_key_values.layers:  # every layer, those before the cut too
        assert layer.keys.shape[2] == layer.values.shape[2] == max(lengths)
    stats = model.tokencarve.last_stats
    assert stats.visual_tokens_kept == kept and stats.prompt_tokens_kept == lengths
    assert stats.visual_tokens_in == [c[0] for c in batch.counts]
    per_token = stats.kv_cache_bytes // (len(lengths) * max(lengths))
    assert stats.kv_bytes_held == [per_token * n for n in lengths]
    assert stats.kv_bytes_uncompressed == [per_token * len(ids) for ids in batch.ids]

    steps = 24
    tokens, step_logits = generate(model, batch.inputs, steps)
    for row, ids in enumerate(batch.ids):
        r = batch.rows[row]
        run = reference.reference_prefill(family["eager"], ids, r["pixel_values"], keep, CUT, **image_kwargs(r))
        assert [len(c.keys[0]) for c in run.caches] == [lengths[row]] * len(run.caches)
        ref_tokens, ref_logits = reference.reference_decode(family["eager"], run, steps)
        assert tokens[row].tolist() == ref_tokens
        torch.testing.assert_close(step_logits[row], ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("keep", [8, 0.3])
def test_each_sample_is_carved_as_if_it_were_alone(family, carved, keep):
    model, batch = family["sdpa"], family["batch"]
    carved(keep=keep)
    tokens, _ = generate(model, batch.inputs, 12)
    batched = model.tokencarve.last_stats.images
    for row, alone in enumerate(batch.rows):
        alone_tokens, _ = generate(model, alone, 12)
        image = model.tokencarve.last_stats.images[0]
        assert torch.equal(image.index, batched[row].index) and torch.equal(image.assignment, batched[row].assignment)
        assert torch.equal(alone_tokens[0], tokens[row])


def test_multi_image_prompt_and_text_only_prompt(family, carved):
    model, mixed = family["sdpa"], family["mixed"]
    text_only = mixed.rows[1]
    stock_tokens, _ = generate(model, text_only, 10)
    carved(keep=0.25)
    with torch.no_grad():
        model(**mixed.inputs)
    stats = model.tokencarve.last_stats
    counts = mixed.counts[0]
    assert stats.visual_tokens_in == [sum(counts), 0]
    assert stats.visual_tokens_kept == [sum(math.ceil(n / 4) for n in counts), 0]
    assert stats.prompt_tokens_kept[1] == len(mixed.ids[1])
    tokens, _ = generate(model, mixed.inputs, 10)
    assert torch.equal(tokens[1], stock_tokens[0])  # untouched
    r = mixed.rows[0]
    run = reference.reference_prefill(family["eager"], mixed.ids[0], r["pixel_values"], 0.25, CUT, **image_kwargs(r))
    assert [image.index.tolist() for image in stats.images] == run.kept
    assert tokens[0].tolist() == reference.reference_decode(family["eager"], run, 10)[0]


def test_attention_row_equals_eager_attention_weights(family):
    """GQA (2 key heads for 4 query heads) and, on OneVision, q/k biases: the row we compute from
    layer K-1's projections is the eager attention matrix's last row."""
    from tokencarve.attention import last_token_attention

    model, inputs = family["sdpa"], family["batch"].inputs
    layer = model.model.language_model.layers[CUT - 1]
    assert layer.self_attn.config.num_key_value_heads < layer.self_attn.config.num_attention_heads
    captured = {}
    handle = layer.register_forward_pre_hook(
        lambda m, a, k: captured.update(h=a[0] if a else k["hidden_states"], pe=k["position_embeddings"]),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            model(**inputs)
            ours = last_token_attention(layer, captured["h"], captured["pe"], inputs["attention_mask"])
            eager = family["eager"](**inputs, output_attentions=True).attentions[CUT - 1][:, :, -1].mean(1)
    finally:
        handle.remove()
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)


def test_embeddings_tied_on_onevision_untied_on_next_and_biases_in_use(family):
    model = family["sdpa"]
    tied = model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert tied == (family["name"] == "onevision")
    bias = model.model.language_model.layers[0].self_attn.q_proj.bias
    assert (bias is not None and bool(bias.abs().sum() > 0)) == (family["name"] == "onevision")


def test_remove_restores_stock_behaviour_exactly(family):
    model = load(family["path"], family["name"])
    inputs = family["batch"].inputs
    with torch.no_grad():
        stock = model(**inputs).logits
    stock_tokens, _ = generate(model, inputs)
    tokencarve.apply(model, CarveConfig(keep=4, layer=CUT))
    assert not torch.equal(generate(model, inputs)[0], stock_tokens)  # the patch did something
    tokencarve.remove(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock)
    assert torch.equal(generate(model, inputs)[0], stock_tokens)


def test_eager_attention_model_carves_the_same_tokens(family, carved):
    model, inputs = family["sdpa"], family["batch"].inputs
    carved(keep=0.2)
    sdpa_tokens, _ = generate(model, inputs)
    sdpa_index = [image.index for image in model.tokencarve.last_stats.images]
    eager = tokencarve.apply(load(family["path"], family["name"], "eager"), CarveConfig(keep=0.2, layer=CUT))
    eager_tokens, _ = generate(eager, inputs)
    assert all(torch.equal(a, b.index) for a, b in zip(sdpa_index, eager.tokencarve.last_stats.images))
    assert torch.equal(eager_tokens, sdpa_tokens)


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keep,n,expected", [(0.1, 2880, 288), (0.1, 7290, 729), (0.25, 36, 9), (0.3, 68, 21), (0.01, 36, 1), (128, 36, 128)]
)
def test_fraction_budget_rounds_up_on_the_written_decimal(keep, n, expected):
    assert CarveConfig(keep=keep).budget(n) == expected


@pytest.mark.parametrize("keep", [0.0, 1.0, 1.5, -0.1, True, "64", 0])
def test_bad_budgets_are_refused(keep):
    with pytest.raises(ValueError, match="keep must be an integer >= 1"):
        CarveConfig(keep=keep)


def test_sliding_window_decoders_are_refused():
    config = tiny_llava_next_config()
    config.text_config.sliding_window = 8
    with pytest.raises(ValueError, match="sliding-window attention"):
        tokencarve.apply(LlavaNextForConditionalGeneration(config), CarveConfig())
    tokencarve.apply(tiny_llava_next(), CarveConfig())  # the stock tiny config has no window


@pytest.mark.parametrize("method", ["fastv", "random"])
def test_baselines_run_per_image_on_any_family(family, carved, method):
    model, batch = family["sdpa"], family["batch"]
    carved(keep=0.25, method=method)
    tokens, _ = generate(model, batch.inputs, 4)
    stats = model.tokencarve.last_stats
    assert stats.visual_tokens_kept == [math.ceil(c[0] / 4) for c in batch.counts] and tokens.shape == (4, 4)


def test_pooling_is_refused_without_one_grid_per_image(family):
    with pytest.raises(ValueError, match="needs each image's token grid"):
        tokencarve.apply(family["sdpa"], CarveConfig(method="pool", keep=16))
    assert not tokencarve.is_applied(family["sdpa"])


def test_image_spans_split_by_counts_or_else_by_runs():
    from tokencarve.families import image_spans

    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 2:9] = True  # two images back to back: 3 + 4 tokens
    mask[1, 1:3] = mask[1, 5:10] = True  # two images with text between them
    spans = image_spans(mask, [3, 4, 2, 5])
    assert spans.rows == [0, 0, 1, 1] and spans.counts == [3, 4, 2, 5]
    assert [p.tolist()[0] for p in spans.positions] == [2, 5, 1, 5]
    assert spans.groups() == [[0], [1], [2], [3]]
    runs = image_spans(mask, None)  # no sizes known: one image per run of adjacent image tokens
    assert runs.rows == [0, 1, 1] and runs.counts == [7, 2, 5]
    with pytest.raises(ValueError, match="14 image tokens but the images have 13"):
        image_spans(mask, [3, 4, 2, 4])
    with pytest.raises(ValueError, match="span two samples"):
        image_spans(mask, [3, 5, 1, 5])


def test_inputs_embeds_instead_of_input_ids_carves_the_same(family, carved):
    model, inputs = family["sdpa"], dict(family["batch"].inputs)
    carved(keep=0.25)
    with torch.no_grad():
        by_ids = model(**inputs).logits
        index = [image.index for image in model.tokencarve.last_stats.images]
        embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
        by_embeds = model(inputs_embeds=embeds, **inputs).logits
    images = model.tokencarve.last_stats.images
    assert len(images) == len(index) == 4 and all(torch.equal(a, b.index) for a, b in zip(index, images))
    torch.testing.assert_close(by_embeds, by_ids, rtol=0, atol=0)
