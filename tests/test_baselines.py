"""The comparison baselines (FastV-style, random, pooling): exact selections on plain tensors, and
through the same adapter as TokenCarve (same token counts, cache layout and batching rules)."""

from __future__ import annotations

import pytest
import torch

from tokencarve import CarveConfig, baselines, methods
from tokencarve.core import carve_tokens

from .tiny_llava import CUT, PROMPTS, batch, generate, single
from .tiny_llava import TOKENS_PER_IMAGE as N


def _tensors(batch_size=3, tokens=576, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, tokens, dim, generator=g), torch.rand(batch_size, tokens, generator=g)


def test_fastv_keeps_the_most_attended_tokens_unchanged():
    hidden, attention = _tensors()
    attention[0, :10] = attention[0, 10]  # ties: the lower positions win
    result = baselines.fastv_tokens(hidden, attention, 64)
    for b in range(hidden.shape[0]):
        expected = sorted(sorted(range(576), key=lambda i: (-attention[b, i].item(), i))[:64])
        assert result.index[b].tolist() == expected
        assert torch.equal(result.hidden[b], hidden[b, expected])
        assert (result.assignment[b] >= 0).sum() == 64 and not result.merged[b].any()
        assert result.assignment[b, expected].tolist() == list(range(64))


def test_random_is_seeded_distinct_and_sorted():
    hidden, _ = _tensors()
    a = baselines.random_tokens(hidden, 50, seed=1)
    assert torch.equal(a.index, baselines.random_tokens(hidden, 50, seed=1).index)
    assert not torch.equal(a.index, baselines.random_tokens(hidden, 50, seed=2).index)
    assert not torch.equal(a.index[0], a.index[1])  # every image its own draw
    for row in a.index:
        assert row.tolist() == sorted(set(row.tolist())) and len(row) == 50
    assert torch.equal(a.hidden, hidden.gather(1, a.index[..., None].expand(-1, -1, 16)))


@pytest.mark.parametrize(
    "keep,height,width,per_band",
    [
        (64, 24, 24, [8] * 8),  # 3 x 3 windows
        (16, 24, 24, [4] * 4),
        (13, 24, 24, [3, 3, 3, 4]),  # no factor pair but 13 x 1: 6 x 8 / 6 x 6 windows instead of strips
        (128, 24, 24, [11, 12, 11, 12, 12, 11, 12, 12, 11, 12, 12]),
        (15, 9, 16, [5, 5, 5]),  # a wide image: windows of 3 x 3.2 tokens
        (15, 16, 9, [3, 3, 3, 3, 3]),  # the same image on its side
        (7, 1, 40, [7]),  # one row: one band
    ],
)
def test_pool_layout_has_near_square_windows_for_any_count(keep, height, width, per_band):
    assert baselines.pool_layout(keep, height, width) == per_band


def test_pool_averages_whole_windows_at_their_centre():
    hidden, _ = _tensors(batch_size=2)
    result = baselines.pooled_tokens(hidden, 64)  # 24 x 24 -> 8 x 8: exact 3 x 3 windows
    grid = hidden.view(2, 24, 24, 16)
    for slot in (0, 9, 63):
        r, c = divmod(slot, 8)
        window = grid[:, 3 * r : 3 * r + 3, 3 * c : 3 * c + 3].reshape(2, 9, 16)
        torch.testing.assert_close(result.hidden[:, slot], window.mean(1))
        assert result.index[0, slot] == (3 * r + 1) * 24 + 3 * c + 1  # the centre token
        owners = result.assignment[0].view(24, 24)[3 * r : 3 * r + 3, 3 * c : 3 * c + 3] == slot
        assert owners.all()
    assert (result.assignment >= 0).all() and result.merged.sum(1).tolist() == [576 - 64] * 2
    assert (result.index.diff(dim=1) > 0).all()


def _covers_every_token_once(result, keep):
    for b in range(result.index.shape[0]):
        assert (result.index[b].diff() > 0).all()
        assert sorted(set(result.assignment[b].tolist())) == list(range(keep))
        assert result.assignment[b, result.index[b]].tolist() == list(range(keep))  # each centre in its window
        assert int((~result.merged[b]).sum()) == keep


def test_pool_with_uneven_windows_covers_every_token_once():
    hidden, _ = _tensors(batch_size=1)
    for keep in (575, 192, 128, 32, 16, 13, 7, 1):
        result = baselines.pooled_tokens(hidden, keep)
        assert result.hidden.shape == (1, keep, 16)
        _covers_every_token_once(result, keep)
    with pytest.raises(ValueError, match="square grid"):
        baselines.pooled_tokens(torch.zeros(1, 575, 4), 64)


def test_pool_reads_each_images_own_grid_in_any_order():
    """Qwen-VL grids are as wide and high as each image, offset by where the image starts: pooling by
    each token's place gives the windows of that image's grid, whatever order the tokens come in."""
    hidden, _ = _tensors(batch_size=2, tokens=144)
    index = torch.arange(144)
    wide = torch.stack([index // 16, index % 16], -1)  # 9 x 16
    tall = torch.stack([index // 9, index % 9], -1)  # 16 x 9
    result = baselines.pooled_tokens(hidden, 15, torch.stack([wide + 40, tall + 3]))
    _covers_every_token_once(result, 15)
    # the wide image: 3 bands of 3 rows, 5 windows of 4 or 3 columns; window (1, 2) holds rows 3-5,
    # columns 7-9 and sits at its centre cell, row 4, column 8
    window = hidden[0].view(9, 16, 16)[3:6, 7:10].reshape(9, 16)
    slot = int(result.assignment[0, 4 * 16 + 8])
    assert result.index[0, slot] == 4 * 16 + 8
    torch.testing.assert_close(result.hidden[0, slot], window.mean(0))
    shuffled = torch.randperm(144, generator=torch.Generator().manual_seed(0))
    again = baselines.pooled_tokens(hidden[:1, shuffled], 15, (wide + 40)[shuffled].unsqueeze(0))
    # the same windows at the same centre tokens (slots follow the tokens' order, so they are permuted)
    centres, slots = shuffled[again.index[0]].sort()
    assert torch.equal(centres, result.index[0])
    torch.testing.assert_close(again.hidden[0, slots], result.hidden[0])


def test_reduce_tokens_dispatches_and_keeps_tokencarve_exact():
    hidden, attention = _tensors()
    for method, weight in (("tokencarve", 0.3), ("attention", 1.0), ("information", 0.0)):
        ours, direct = (
            methods.reduce_tokens(hidden, attention, 77, method=method, attention_weight=0.3),
            carve_tokens(hidden, attention, 77, attention_weight=weight),
        )
        assert torch.equal(ours.index, direct.index) and torch.equal(ours.hidden, direct.hidden)
    direct = {
        "fastv": baselines.fastv_tokens(hidden, attention, 32),
        "random": baselines.random_tokens(hidden, 32, seed=5),
        "pool": baselines.pooled_tokens(hidden, 32),
    }
    for method in methods.names("baseline"):
        assert methods.reduce_tokens(hidden, attention, 600, method=method).index.shape == (3, 576)  # keep >= N
        ours = methods.reduce_tokens(hidden, attention, 32, method=method, seed=5)
        assert torch.equal(ours.index, direct[method].index) and torch.equal(ours.hidden, direct[method].hidden)
    with pytest.raises(ValueError, match="unknown method"):
        methods.reduce_tokens(hidden, attention, 32, method="magic")
    with pytest.raises(ValueError, match="one of"):
        CarveConfig(method="magic")


# the baselines and the set selections
@pytest.mark.parametrize("method", ["fastv", "pool", "volume", "volume-spatial", "dpp"])
def test_other_methods_through_the_adapter_are_batch_invariant(sdpa_model, carved, method):
    carved(keep=48, method=method)
    inputs = batch()
    tokens, _ = generate(sdpa_model, inputs, steps=10)
    stats = sdpa_model.tokencarve.last_stats
    assert stats.visual_tokens_kept == [48] * len(PROMPTS)
    assert stats.prompt_tokens_kept == [len(p) - N + 48 for p in PROMPTS]
    batched = stats.images
    for row in range(len(PROMPTS)):
        alone_tokens, _ = generate(sdpa_model, single(inputs, row), steps=10)
        assert torch.equal(sdpa_model.tokencarve.last_stats.images[0].index, batched[row].index)
        assert torch.equal(alone_tokens[0], tokens[row])


def test_the_adapter_gives_volume_spatial_llava_15s_square_grid(sdpa_model, carved, monkeypatch):
    """Each token's place is its (row, column) on the 24 x 24 grid, and only the method that reads it
    gets one."""
    grids = []
    reduce_tokens = methods.reduce_tokens
    monkeypatch.setattr(methods, "reduce_tokens", lambda *a, **k: grids.append(k["grid"]) or reduce_tokens(*a, **k))
    carved(keep=48, method="volume-spatial")
    generate(sdpa_model, batch(), steps=1)
    index = torch.arange(N)
    assert len(grids) == 1 and torch.equal(
        grids[0], torch.stack([index // 24, index % 24], -1).expand(len(PROMPTS), -1, -1)
    )
    sdpa_model.tokencarve.reconfigure(CarveConfig(layer=CUT, keep=48, method="volume"))
    generate(sdpa_model, batch(), steps=1)
    assert grids[1] is None


def test_fastv_through_the_adapter_keeps_the_attention_modes_top_tokens(sdpa_model, carved):
    """Same attention row, same ranking: FastV's kept set is the attention-only ranking's top `keep`,
    which contains the attention mode's stage-I group A (its top 0.75 keep)."""
    inputs = batch()
    carved(keep=64, method="fastv")
    generate(sdpa_model, inputs, steps=1)
    fastv = [set(i.index.tolist()) for i in sdpa_model.tokencarve.last_stats.images]
    sdpa_model.tokencarve.reconfigure(CarveConfig(layer=CUT, keep=64, method="attention"))
    generate(sdpa_model, inputs, steps=1)
    for image, kept in zip(sdpa_model.tokencarve.last_stats.images, fastv):
        survivors = set(torch.nonzero(image.assignment >= 0).flatten().tolist())  # kept or merged
        assert len(survivors) == 96 and kept <= survivors  # stage I keeps the top 1.5 * 64 by attention
        assert len(kept & set(image.index.tolist())) >= 48  # its group A (the top 48) stays unmerged
