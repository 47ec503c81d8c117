"""TokenCarve on a (tiny, random) Hugging Face LLaVA: exactness, batching, reference equivalence,
the compressed KV cache under generate(), and clean removal."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tokencarve
from tokencarve import CarveConfig, methods

from . import reference
from .tiny_llava import CUT, PROMPTS, TOKENS_PER_IMAGE, batch, generate, left_padded, load, pixels, prompt, single

N = TOKENS_PER_IMAGE
# fixtures from conftest.py: tiny_llava_path, sdpa_model, eager_model, carved (cut at CUT)


# 1. Exactness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [N, N + 100])
def test_keep_all_tokens_is_exactly_the_stock_model(sdpa_model, carved, keep):
    inputs = batch()
    with torch.no_grad():
        stock_logits = sdpa_model(**inputs).logits
    stock_tokens, stock_step_logits = generate(sdpa_model, inputs, steps=20)
    carved(keep=keep)
    with torch.no_grad():
        assert torch.equal(sdpa_model(**inputs).logits, stock_logits)
    tokens, step_logits = generate(sdpa_model, inputs, steps=20)
    assert torch.equal(tokens, stock_tokens)
    assert torch.equal(step_logits, stock_step_logits)
    assert sdpa_model.tokencarve.last_stats.visual_tokens_kept == [N, N, N]


# 2. Batch invariance ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", methods.names("paper"))
def test_each_sample_is_carved_as_if_it_were_alone(sdpa_model, carved, method):
    carved(keep=64, method=method)
    inputs = batch()
    tokens, _ = generate(sdpa_model, inputs, steps=16)
    batched = sdpa_model.tokencarve.last_stats.images
    for row in range(len(PROMPTS)):
        alone_tokens, _ = generate(sdpa_model, single(inputs, row), steps=16)
        alone = sdpa_model.tokencarve.last_stats.images
        assert torch.equal(alone[0].index, batched[row].index)
        assert torch.equal(alone[0].assignment, batched[row].assignment)
        assert torch.equal(alone_tokens[0], tokens[row])


# 3. Reference equivalence -----------------------------------------------------------------------


def carved_hidden_entering_cut(model):
    """Records the hidden states that reach layer K after the carve (a hook behind ours)."""
    seen = {}

    def hook(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]

    handle = model.model.language_model.layers[CUT].register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize(
    "keep,method",
    [
        (192, "tokencarve"),
        (128, "tokencarve"),
        (64, "tokencarve"),
        (77, "tokencarve"),
        (1, "tokencarve"),
        (2, "tokencarve"),
        (383, "tokencarve"),
        (500, "tokencarve"),
        (128, "information"),
        (63, "information"),
        (128, "attention"),
        (31, "attention"),
    ],
)
def test_fast_path_matches_the_slow_reference(sdpa_model, eager_model, carved, keep, method):
    carved(keep=keep, method=method)
    inputs = batch()
    seen, handle = carved_hidden_entering_cut(sdpa_model)
    try:
        with torch.no_grad():
            logits = sdpa_model(**inputs).logits[:, -1]
    finally:
        handle.remove()
    stats = sdpa_model.tokencarve.last_stats
    mask = inputs["attention_mask"]
    for row, ids in enumerate(PROMPTS):
        ref = reference.reference_prefill(
            eager_model, ids, inputs["pixel_values"][row : row + 1], keep, CUT, method=method
        )
        assert stats.images[row].index.tolist() == ref.kept[0]
        # The carved row is right-aligned in the batch; its real tokens are the last ones.
        real = seen["hidden"][row, -ref.carved_hidden.shape[0] :]
        torch.testing.assert_close(real, ref.carved_hidden, rtol=1e-4, atol=5e-4)  # values reach ~30
        torch.testing.assert_close(logits[row], ref.prefill_logits, rtol=1e-4, atol=1e-4)
        assert stats.prompt_tokens_kept[row] == int(mask[row].sum()) - (N - min(keep, N))


def test_attention_row_equals_eager_attention_weights(sdpa_model, eager_model):
    """The row we compute from layer K-1's projections is the eager attention matrix's last row."""
    from tokencarve.attention import last_token_attention

    inputs = batch()
    captured = {}
    layer = sdpa_model.model.language_model.layers[CUT - 1]
    handle = layer.register_forward_pre_hook(
        lambda m, a, k: captured.update(h=a[0] if a else k["hidden_states"], pe=k["position_embeddings"]),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            sdpa_model(**inputs)
            ours = last_token_attention(layer, captured["h"], captured["pe"], inputs["attention_mask"])
            eager = eager_model(**inputs, output_attentions=True).attentions[CUT - 1][:, :, -1].mean(1)
    finally:
        handle.remove()
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)


# 4. KV cache and generate ---------------------------------------------------------------------


@pytest.mark.parametrize("keep", [64, 129])
def test_cache_holds_only_kept_tokens_and_greedy_decode_matches_reference(sdpa_model, eager_model, carved, keep):
    carved(keep=keep)
    inputs = batch()
    with torch.no_grad():
        out = sdpa_model(**inputs, use_cache=True)
    lengths = [len(p) - N + keep for p in PROMPTS]
    for layer in out.past_key_values.layers:
        assert layer.keys.shape[2] == layer.values.shape[2] == max(lengths)
    stats = sdpa_model.tokencarve.last_stats
    assert stats.prompt_tokens_kept == lengths
    cache_bytes = sum(
        t.numel() * t.element_size() for layer in out.past_key_values.layers for t in (layer.keys, layer.values)
    )
    assert stats.kv_cache_bytes == cache_bytes
    per_token = cache_bytes // (len(PROMPTS) * max(lengths))
    assert stats.kv_bytes_held == [per_token * n for n in lengths]
    assert stats.kv_bytes_uncompressed == [per_token * len(p) for p in PROMPTS]

    steps = 42
    tokens, step_logits = generate(sdpa_model, inputs, steps=steps)
    for row, ids in enumerate(PROMPTS):
        run = reference.reference_prefill(eager_model, ids, inputs["pixel_values"][row : row + 1], keep, CUT)
        ref_tokens, ref_logits = reference.reference_decode(eager_model, run, steps)
        assert tokens[row].tolist() == ref_tokens
        torch.testing.assert_close(step_logits[row], ref_logits, rtol=1e-4, atol=1e-4)


def test_sampling_uses_the_carved_cache_correctly(sdpa_model, eager_model, carved):
    """Whatever tokens sampling draws, the logits at every step are the reference's for that prefix."""
    carved(keep=96)
    inputs = batch()
    torch.manual_seed(7)
    tokens, step_logits = generate(sdpa_model, inputs, steps=24, do_sample=True, temperature=1.5, top_k=0)
    for row, ids in enumerate(PROMPTS):
        run = reference.reference_prefill(eager_model, ids, inputs["pixel_values"][row : row + 1], 96, CUT)
        _, ref_logits = reference.reference_decode(eager_model, run, 24, forced=tokens[row].tolist())
        torch.testing.assert_close(step_logits[row], ref_logits, rtol=1e-4, atol=1e-4)


def test_budget_applies_per_image_and_text_only_prompts_pass_through(sdpa_model, eager_model, carved):
    two_images, no_image = prompt(4, 6, images=2, seed=5), [5, 9, 33, 17, 8, 21, 4]
    stock_tokens, _ = generate(sdpa_model, dict(input_ids=torch.tensor([no_image])), steps=10)
    carved(keep=32)
    ids, mask = left_padded([two_images, no_image])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2, seed=4))
    with torch.no_grad():
        out = sdpa_model(**inputs, use_cache=True)
    stats = sdpa_model.tokencarve.last_stats
    assert stats.visual_tokens_in == [2 * N, 0] and stats.visual_tokens_kept == [64, 0]
    assert stats.prompt_tokens_kept == [len(two_images) - 2 * (N - 32), len(no_image)]
    assert out.past_key_values.get_seq_length() == len(two_images) - 2 * (N - 32)
    assert [image.sample for image in stats.images] == [0, 0]

    tokens, _ = generate(sdpa_model, inputs, steps=10)
    assert torch.equal(tokens[1], stock_tokens[0])  # the text-only prompt is untouched
    run = reference.reference_prefill(eager_model, two_images, inputs["pixel_values"], 32, CUT)
    assert [image.index.tolist() for image in stats.images] == run.kept
    assert tokens[0].tolist() == reference.reference_decode(eager_model, run, 10)[0]


# 5. remove() and configuration errors --------------------------------------------------------------


def test_remove_restores_stock_behaviour_exactly(tiny_llava_path):
    model = load(tiny_llava_path)
    inputs = batch()
    with torch.no_grad():
        stock = model(**inputs).logits
    stock_tokens, _ = generate(model, inputs)
    hooks_before = hook_ids(model)
    tokencarve.apply(model, CarveConfig(keep=16))
    assert hook_ids(model) != hooks_before
    carved_tokens, _ = generate(model, inputs)
    assert not torch.equal(carved_tokens, stock_tokens)  # the patch did something
    assert tokencarve.remove(model) is model and not hasattr(model, "tokencarve")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock)
    assert torch.equal(generate(model, inputs)[0], stock_tokens)
    assert hook_ids(model) == hooks_before


def hook_ids(model):
    """Every forward (pre-)hook on the model (transformers adds some of its own on first use)."""
    return {name: (list(m._forward_pre_hooks), list(m._forward_hooks)) for name, m in model.named_modules()}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(keep=0), "keep must be an integer >= 1"),
        (dict(keep=2.5), "keep must be an integer >= 1"),
        (dict(layer=0), "layer must be an integer >= 1"),
        (dict(attention_weight=1.5), "attention_weight"),
        (dict(method="fastest"), "method must be one of"),
    ],
)
def test_bad_configuration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CarveConfig(**kwargs)


def test_apply_refuses_bad_layers_other_models_and_double_application(tiny_llava_path):
    model = load(tiny_llava_path)
    with pytest.raises(ValueError, match="out of range: the language model has 4 decoder layers"):
        tokencarve.apply(model, CarveConfig(layer=4))
    text_only = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    )
    with pytest.raises(TypeError, match="supports transformers' LlavaForConditionalGeneration"):
        tokencarve.apply(text_only, CarveConfig())
    tokencarve.apply(model, CarveConfig(layer=3))
    with pytest.raises(ValueError, match="already applied"):
        tokencarve.apply(model, CarveConfig())
    tokencarve.remove(model)
    with pytest.raises(ValueError, match="not applied"):
        tokencarve.remove(model)


def test_eager_attention_model_carves_the_same_tokens(tiny_llava_path, sdpa_model, carved):
    carved(keep=64)
    inputs = batch()
    sdpa_tokens, _ = generate(sdpa_model, inputs)
    sdpa_index = [image.index for image in sdpa_model.tokencarve.last_stats.images]
    eager = tokencarve.apply(load(tiny_llava_path, "eager"), CarveConfig(keep=64, layer=CUT))
    eager_tokens, _ = generate(eager, inputs)
    assert all(torch.equal(a, b.index) for a, b in zip(sdpa_index, eager.tokencarve.last_stats.images))
    assert torch.equal(eager_tokens, sdpa_tokens)


def test_using_is_a_temporary_config_restored_on_exit_and_on_error(sdpa_model, carved):
    carver = carved(keep=64).tokencarve
    inputs = batch()
    with carver.using(CarveConfig(layer=CUT, keep=16, method="fastv")) as inside:
        assert inside is carver and carver.config.keep == 16
        generate(sdpa_model, inputs, steps=1)
        assert carver.last_stats.visual_tokens_kept == [16, 16, 16]
    assert carver.config == CarveConfig(layer=CUT, keep=64)
    with pytest.raises(RuntimeError, match="inside"):
        with carver.using(CarveConfig(layer=CUT, keep=32)):
            raise RuntimeError("an error inside")
    assert carver.config == CarveConfig(layer=CUT, keep=64)
    with pytest.raises(ValueError, match="cannot move the cut"):
        with carver.using(CarveConfig(layer=CUT + 1, keep=32)):
            pass
    assert carver.config == CarveConfig(layer=CUT, keep=64)
    generate(sdpa_model, inputs, steps=1)
    assert carver.last_stats.visual_tokens_kept == [64, 64, 64]
