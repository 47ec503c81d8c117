"""TokenCarve on the Qwen-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): native-resolution images whose
token counts differ per image, 3-D (mRoPE) positions kept through the cut, decode positions from
rope_deltas, Qwen3-VL's query / key norms and deepstack. Exact against the slow reference, which
computes the 3-D positions from the image grids by their definition (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch

import tokencarve
from tokencarve import CarveConfig, baselines
from tokencarve.decode import StaticDecoder, eos_ids, prefill
from tokencarve.families import family_for_config
from tokencarve.loading import chat_prompt, load_processor
from tokencarve.methods import REGISTRY as METHODS
from tokencarve.processing import ImageTextProcessor
from tokencarve.testing import IMAGE_TOKEN, QWEN_CLASSES, QWEN_FAMILIES, save_tiny_qwen_vl_with_processor

from . import reference
from .test_family import generate
from .tiny_family import picture

CUT = 2
# (width, height) of each row's image, and its question: four sizes, so four token counts (Qwen2-VL:
# 8, 24, 35 and 40 tokens), prompts of different lengths, so left padding
ROWS = [
    ((100, 60), "Describe the image ."),
    ((200, 140), "What is in the image ? w5 w6 w7"),
    ((64, 220), "What colour is the shape ?"),
    ((150, 150), "w9"),
]


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_tiny_qwen_vl_with_processor(path, request.param)
    model_class = QWEN_CLASSES[request.param][1]
    processor = load_processor(str(path))
    return dict(
        name=request.param,
        sdpa=model_class.from_pretrained(path, attn_implementation="sdpa").eval(),
        eager=model_class.from_pretrained(path, attn_implementation="eager").eval(),
        processor=processor,
        batch=encode(processor, ROWS),
        rows=[encode(processor, [row], seed=i) for i, row in enumerate(ROWS)],
    )


def encode(processor, rows, seed: int = 0):
    images = [picture(w, h, seed=seed + i) for i, ((w, h), _) in enumerate(rows)]
    texts = [chat_prompt(processor, question) for _, question in rows]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


@pytest.fixture
def carved(family):
    model = family["sdpa"]

    def _apply(**config):
        return tokencarve.apply(model, CarveConfig(layer=CUT, **config))

    yield _apply
    if tokencarve.is_applied(model):
        tokencarve.remove(model)


def counts(inputs) -> list[int]:
    return (inputs["input_ids"] == IMAGE_TOKEN).sum(1).tolist()


def run_reference(family, row: int, keep, method: str = "tokencarve"):
    r = family["rows"][row]
    ids = r["input_ids"][0].tolist()
    return reference.reference_prefill(
        family["eager"], ids, r["pixel_values"], keep, CUT, method=method, image_grid_thw=r["image_grid_thw"]
    )


def test_token_counts_follow_each_images_grid(family):
    batch = family["batch"]
    merge = family["sdpa"].config.vision_config.spatial_merge_size
    grid_counts = (batch["image_grid_thw"].prod(-1) // merge**2).tolist()
    assert counts(batch) == grid_counts and len(set(grid_counts)) == len(ROWS)  # every image its own count
    assert batch["mm_token_type_ids"].eq(1).sum(1).tolist() == grid_counts


def test_keep_above_every_image_is_bit_identical_to_stock(family, carved):
    model, batch = family["sdpa"], family["batch"]
    stock_tokens, stock_logits = generate(model, batch)
    carved(keep=max(counts(batch)))
    tokens, logits = generate(model, batch)
    assert torch.equal(tokens, stock_tokens) and torch.equal(logits, stock_logits)
    assert model.tokencarve.last_stats.visual_tokens_kept == counts(batch)


@pytest.mark.parametrize("keep, method", [(6, "tokencarve"), (0.3, "tokencarve"), (5, "information"), (4, "attention")])
def test_prefill_and_greedy_decode_match_the_3d_reference(family, carved, keep, method):
    """Every row of a left-padded batch of images of four sizes, prefill logits and 12 greedy steps."""
    model, batch = family["sdpa"], family["batch"]
    carved(keep=keep, method=method)
    steps = 12
    tokens, step_logits = generate(model, batch, steps)
    stats = model.tokencarve.last_stats
    for row in range(len(ROWS)):
        run = run_reference(family, row, keep, method)
        assert stats.images[row].index.tolist() == run.kept[0]
        ref_tokens, ref_logits = reference.reference_decode(family["eager"], run, steps)
        assert tokens[row].tolist() == ref_tokens
        torch.testing.assert_close(step_logits[row], ref_logits, rtol=1e-4, atol=1e-4)


def test_one_dimensional_positions_are_caught(family, carved):
    """The failure mode ports hit silently: the same carve fed 1-D positions (a 2-D position_ids is
    broadcast to all three mRoPE rows, without an error) drifts from the 3-D reference."""
    model, batch = family["sdpa"], family["batch"]
    carved(keep=6)
    mask = batch["attention_mask"]
    flat = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        right = model(**batch).logits[:, -1]
        slipped = model(**batch, position_ids=flat).logits[:, -1]
    for row in range(len(ROWS)):
        expected = run_reference(family, row, 6).prefill_logits
        torch.testing.assert_close(right[row], expected, rtol=1e-4, atol=1e-4)
        assert (slipped[row] - expected).abs().max() > 1e-2


def test_the_1d_ablation_moves_only_the_positions_after_the_cut(family, carved):
    """CarveConfig(positions="1d"), the ablation of docs/EVALUATION.md: the same tokens kept, the layers
    after the cut given each kept token's 1-D sequence index on all three rotary axes (as a carve
    written for LLaVA would), so the answers move; layers before the cut are untouched."""
    model, batch = family["sdpa"], family["batch"]
    seen = {}
    layer = model.model.language_model.layers[CUT]

    def note(module, args, kwargs):
        seen["cos"] = kwargs["position_embeddings"][0].clone()

    logits, kept = {}, {}
    for positions in ("3d", "1d"):
        carved(keep=6, positions=positions)
        hook = layer.register_forward_pre_hook(note, with_kwargs=True)  # after the carver's: sees its overrides
        with torch.no_grad():
            logits[positions] = model(**batch).logits[:, -1]
        hook.remove()
        kept[positions] = [image.index.tolist() for image in model.tokencarve.last_stats.images]
        seen[positions] = seen.pop("cos")
        tokencarve.remove(model)
    assert kept["1d"] == kept["3d"]
    # 1d: each kept token's rotary is that of its index among the row's real tokens, on every axis
    text = (batch["attention_mask"].cumsum(-1) - 1).masked_fill(batch["attention_mask"] == 0, 0)
    rotary = model.model.language_model.rotary_emb
    for row in range(len(ROWS)):
        expected = run_reference(family, row, 6).prefill_logits
        torch.testing.assert_close(logits["3d"][row], expected, rtol=1e-4, atol=1e-4)
        assert (logits["1d"][row] - expected).abs().max() > 1e-2
    flat_cos = rotary(seen["1d"], position_ids=text.unsqueeze(0).expand(3, -1, -1))[0]
    assert not torch.allclose(seen["1d"], seen["3d"])
    # the last prompt token is kept by every row: its 1-D rotary is the uncompressed prompt length - 1
    torch.testing.assert_close(seen["1d"][..., -1, :], flat_cos[..., -1, :])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_carves_each_row_as_if_it_were_alone(family, carved, method):
    """Every method through the same hooks: a batch of four image sizes gives each row its single-row
    tokens and each image its budget (the paper's methods are checked against the reference above)."""
    model = family["sdpa"]
    carved(keep=0.25, method=method)
    batched, _ = generate(model, family["batch"], 8)
    budgets = [-(-n // 4) for n in counts(family["batch"])]
    assert model.tokencarve.last_stats.visual_tokens_kept == budgets
    for row, alone in enumerate(family["rows"]):
        tokens, _ = generate(model, alone, 8)
        assert tokens[0].tolist() == batched[row].tolist()


def test_volume_spatial_gets_each_tokens_place_from_its_3d_position(family, carved, monkeypatch):
    """The grid the adapter passes is each image's own (row, column) grid, from image_grid_thw, offset
    by where the image starts (distances do not see it): four image shapes, four grids."""
    grids = []
    reduce_tokens = tokencarve.methods.reduce_tokens
    monkeypatch.setattr(
        tokencarve.methods, "reduce_tokens", lambda *a, **k: grids.append(k["grid"]) or reduce_tokens(*a, **k)
    )
    carved(keep=0.25, method="volume-spatial")
    generate(family["sdpa"], family["batch"], 1)
    merge = family["sdpa"].config.vision_config.spatial_merge_size
    shapes = [(int(h) // merge, int(w) // merge) for _, h, w in family["batch"]["image_grid_thw"]]
    assert len(grids) == len(ROWS)  # four token counts: one core call each
    for grid, (height, width) in zip(grids, shapes):
        index = torch.arange(height * width)
        expected = torch.stack([index // width, index % width], -1)
        assert torch.equal(grid[0] - grid[0].amin(0), expected)


def test_several_images_in_one_prompt_and_a_text_only_prompt(family, carved):
    model, processor = family["sdpa"], family["processor"]
    two = chat_prompt(processor, "w1 w2").replace(
        processor.image_token, processor.image_token + " w3 " + processor.image_token
    )
    text_only = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "w4 w5"}]}])
    images = [picture(120, 80, seed=7), picture(60, 200, seed=8)]
    batch = processor(images=images, text=[two, text_only], return_tensors="pt", padding=True)
    carved(keep=5)
    tokens, _ = generate(model, batch, 10)
    stats = model.tokencarve.last_stats
    assert stats.visual_tokens_kept == [10, 0] and len(stats.images) == 2  # 5 per image, both in row 0
    alone = processor(images=images, text=[two], return_tensors="pt")
    ids = alone["input_ids"][0].tolist()
    run = reference.reference_prefill(
        family["eager"], ids, alone["pixel_values"], 5, CUT, image_grid_thw=alone["image_grid_thw"]
    )
    assert tokens[0].tolist() == reference.reference_decode(family["eager"], run, 10)[0]
    stock = processor(text=[text_only], return_tensors="pt")
    tokencarve.remove(model)
    assert generate(model, stock, 10)[0][0].tolist() == tokens[1].tolist()  # text-only rows are untouched


def test_remove_restores_stock_behaviour_exactly(family):
    model, batch = family["sdpa"], family["batch"]
    stock = generate(model, batch)
    tokencarve.apply(model, CarveConfig(keep=4, layer=CUT))
    carved_tokens, _ = generate(model, batch)
    assert not torch.equal(carved_tokens, stock[0])
    tokencarve.remove(model)
    assert not hasattr(model.model.language_model, "_deepstack_process") or "_deepstack_process" not in vars(
        model.model.language_model
    )
    again = generate(model, batch)
    assert torch.equal(again[0], stock[0]) and torch.equal(again[1], stock[1])


@pytest.mark.parametrize("keep", [None, 6])
def test_static_decode_continues_from_rope_deltas(family, carved, keep):
    """The static loop's positions come from max(position) + 1 (rope_deltas), not from the prompt's
    length, which carving would not change either: tokens equal generate()'s, row for row, with refill."""
    model, batch = family["sdpa"], family["batch"]
    carved(keep=keep)
    expected, _ = generate(model, batch, 10)
    decoder = StaticDecoder(
        model,
        model.tokencarve.language_model,
        eos_ids(model.generation_config),
        slots=2,
        kv_cache_bytes=1 << 26,
        compile=False,
    )
    seen = []

    def prefill_rows(rows):  # consecutive rows, padded together as the engine pads a chunk
        filled = prefill(model, encode(family["processor"], [ROWS[i] for i in rows], seed=rows[0]))
        seen.extend(filled.positions.tolist())
        return filled

    decoded = decoder.run(len(ROWS), 10, prefill_rows)  # two slots for four rows: they refill
    assert [d.tokens for d in decoded] == expected.tolist()
    assert seen == [run_reference(family, row, 10**6).next_position for row in range(len(ROWS))]
    lengths = family["batch"]["attention_mask"].sum(1).tolist()
    assert all(p < n for p, n in zip(seen, lengths))  # an image's tokens take fewer positions than tokens


def test_pool_averages_each_image_on_its_own_grid(family, carved):
    """Four image shapes, four grids: each image's windows are those of its own (height, width) token
    grid from image_grid_thw, and pooling prunes nothing (every token is in a window)."""
    model = family["sdpa"]
    carved(keep=0.25, method="pool")
    generate(model, family["batch"], 1)
    merge = model.config.vision_config.spatial_merge_size
    shapes = [(int(h) // merge, int(w) // merge) for _, h, w in family["batch"]["image_grid_thw"]]
    assert len(set(shapes)) == len(shapes) == len(model.tokencarve.last_stats.images)
    for carve, (height, width) in zip(model.tokencarve.last_stats.images, shapes):
        index = torch.arange(height * width)
        place = torch.stack([index // width, index % width], -1).unsqueeze(0)
        expected = baselines.pooled_tokens(torch.zeros(1, height * width, 1), -(-height * width // 4), place)
        assert torch.equal(carve.index, expected.index[0]) and torch.equal(carve.assignment, expected.assignment[0])


@pytest.mark.parametrize("name, reason", [("Qwen3_5Config", "linear-attention"), ("Gemma3Config", "sliding")])
def test_hybrid_and_sliding_window_families_are_refused_with_the_reason(name, reason):
    import transformers

    with pytest.raises(TypeError, match=reason):
        family_for_config(getattr(transformers, name)())


def test_the_image_text_processor_expands_placeholders_by_the_grid(family):
    processor = family["processor"]
    assert isinstance(processor, ImageTextProcessor)  # torchvision is not installed here
    batch = family["batch"]
    text = processor.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=False)
    assert all(t.count(processor.image_token) == n for t, n in zip(text, counts(batch)))
    assert batch["input_ids"][:, 0].tolist().count(processor.tokenizer.pad_token_id) >= 1  # padded on the left
    with pytest.raises(ValueError, match="more images"):
        processor(images=[picture(56, 56), picture(56, 56)], text=[chat_prompt(processor, "w1")])
