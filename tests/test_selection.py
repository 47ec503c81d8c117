"""The redundancy-aware selections (tokencarve.selection): exact against slow definitions, keep every
object where the one-by-one scores keep copies, and batch-invariant (also through the adapter, in
tests/test_baselines.py)."""

import pytest
import torch
import torch.nn.functional as F

from tokencarve import methods, selection
from tokencarve.core import carve_tokens

N = 576  # visual tokens per image (LLaVA-1.5 and the tiny test model)


def scene_rows(batch_size=2, objects=6, dim=32, seed=0):
    """[B, 576, dim] rows like a flat scene: a background direction with small noise everywhere, and
    `objects` objects, each 1-12 tokens sharing their own direction (a large object is many
    near-copies). Returns the rows and, per image, each object's token positions."""
    generator = torch.Generator().manual_seed(seed)
    background = torch.randn(dim, generator=generator) * 3
    hidden = background + 0.05 * torch.randn(batch_size, N, dim, generator=generator)
    where = []
    for b in range(batch_size):
        positions = torch.randperm(N, generator=generator)
        taken, spans = 0, []
        for k in range(objects):
            size = 1 + (k * 5) % 12
            span = positions[taken : taken + size]
            taken += size
            hidden[b, span] += torch.randn(dim, generator=generator) * 2
            spans.append(set(span.tolist()))
        where.append(spans)
    return hidden, where


def brute_force_pivots(gram, keep):
    """Greedy volume by explicit projections: each pick maximises the squared distance of its row
    from the span of those picked (Gram-Schmidt on a factor X with X X^T = gram)."""
    eigenvalues, vectors = torch.linalg.eigh(gram.double())
    rows = vectors * eigenvalues.clamp_min(0).sqrt()  # rows @ rows.T == gram
    picked, basis = [], []
    for _ in range(keep):
        residual = rows.clone()
        for q in basis:
            residual -= (residual @ q)[:, None] * q
        norms = residual.square().sum(1)
        norms[picked] = -1
        best = int(norms.argmax())
        picked.append(best)
        basis.append(residual[best] / residual[best].norm())
    return picked


def square_grid(batch_size, side=24):
    """Each token's (row, column) on LLaVA-1.5's 24 x 24 grid, [B, 576, 2]."""
    return selection.square_grid(side, batch_size)


def adjacent_pairs(kept, side=24):
    """How many pairs of kept tokens are neighbours (left-right or up-down) on the grid."""
    kept = set(kept)
    return sum((i + 1 in kept and (i + 1) % side != 0) + (i + side in kept) for i in kept)


def brute_force_maxmin(hidden, keep):
    unit = F.normalize(hidden.float(), dim=-1)
    distance = 1 - unit @ unit.T
    nearest = distance + torch.diag(torch.full((len(hidden),), float("inf")))
    picked = [int(nearest.min(1).values.argmax())]
    while len(picked) < keep:
        to_kept = distance[:, picked].min(1).values
        to_kept[picked] = -1
        picked.append(int(to_kept.argmax()))
    return picked


def test_greedy_pivots_are_greedy_volume():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 12, generator=generator, dtype=torch.float64)
    gram = x @ x.mT
    order = selection.greedy_pivots(gram, 10)
    for b in range(2):
        assert order[b].tolist() == brute_force_pivots(gram[b], 10)


def test_greedy_pivots_past_the_rank_follow_the_fallback_and_never_repeat():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 30, 4, generator=generator, dtype=torch.float64)  # rank 4
    fallback = torch.arange(30, dtype=torch.float64).flip(0).unsqueeze(0)  # prefers low positions
    order = selection.greedy_pivots(x @ x.mT, 12, fallback=fallback)[0].tolist()
    assert len(set(order)) == 12
    rest = [i for i in range(30) if i not in order[:4]]
    assert order[4:] == rest[:8]  # rank used up after 4 picks: then the fallback's order


def test_volume_spatial_is_greedy_volume_of_features_and_place():
    """volume-spatial = greedy volume on rows [centred h_i, place feature of i], i.e. on the centred
    Gram plus SPATIAL_WEIGHT x the mean token energy x the place kernel, built here from its
    definition; without a grid it is volume, pick for pick."""
    hidden, _ = scene_rows(batch_size=2)
    grid = square_grid(2)
    order = selection.volume_order(hidden, 40, grid)
    place = grid[0].double()
    distance = ((place[:, None] - place[None]) ** 2).sum(-1)
    kernel = torch.exp(-distance / (2 * selection.SPATIAL_WIDTH**2))
    for b in range(2):
        rows = (hidden[b] - hidden[b].mean(0)).double()
        gram = rows @ rows.T
        gram = gram + selection.SPATIAL_WEIGHT * gram.diagonal().mean() * kernel
        assert order[b].tolist() == brute_force_pivots(gram, 40)
        assert methods.reduce_tokens(hidden, hidden.new_zeros(2, N), 40, method="volume-spatial", grid=grid).index[
            b
        ].tolist() == sorted(order[b].tolist())
    plain = methods.reduce_tokens(hidden, hidden.new_zeros(2, N), 40, method="volume-spatial")
    assert torch.equal(plain.index, methods.reduce_tokens(hidden, hidden.new_zeros(2, N), 40, method="volume").index)


def test_volume_spatial_spreads_its_picks_where_volume_crowds_them():
    """Three large objects (6 x 6 tokens, near-copies of their own direction): volume spends its
    budget on neighbouring tokens of the same object, volume-spatial on tokens that are not
    neighbours (each pick explains part of the tokens around it), so a budget covers more ground."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(32, generator=generator) * 3 + 0.05 * torch.randn(3, N, 32, generator=generator)
    for b in range(3):
        for top, left in [(2, 2), (2, 16), (16, 2)]:
            thing = torch.randn(32, generator=generator) * 2
            for row in range(top, top + 6):
                span = slice(row * 24 + left, row * 24 + left + 6)
                hidden[b, span] += thing + 0.3 * torch.randn(6, 32, generator=generator)
    attention = hidden.new_zeros(3, N)
    volume = methods.reduce_tokens(hidden, attention, 32, method="volume")
    spatial = methods.reduce_tokens(hidden, attention, 32, method="volume-spatial", grid=square_grid(3))
    for b in range(3):
        assert adjacent_pairs(spatial.index[b].tolist()) < adjacent_pairs(volume.index[b].tolist()) / 2


def test_methods_refuse_a_grid_of_the_wrong_shape():
    hidden, _ = scene_rows(batch_size=2)
    with pytest.raises(ValueError, match="grid must be"):
        methods.reduce_tokens(hidden, hidden.new_zeros(2, N), 16, method="volume-spatial", grid=square_grid(1))


def test_divprune_is_max_min_diversity():
    hidden, _ = scene_rows(batch_size=2)
    order = selection.divprune_order(hidden, 24)
    for b in range(2):
        assert order[b].tolist() == brute_force_maxmin(hidden[b], 24)


@pytest.mark.parametrize("method", ["volume", "volume-spatial", "dpp", "divprune"])
def test_selections_keep_every_object_where_scores_keep_copies(method):
    """Six objects (1-12 tokens each) on a noisy background: with 16 tokens, a set selection keeps
    at least one token of every object; the paper's information ranking spends the budget on the
    copies of the largest objects."""
    hidden, objects = scene_rows(batch_size=3)
    attention = torch.full(hidden.shape[:2], 1.0 / N)
    result = methods.reduce_tokens(hidden, attention, 16, method=method, grid=square_grid(3))
    for b, spans in enumerate(objects):
        kept = set(result.index[b].tolist())
        assert all(kept & span for span in spans), method
    information = carve_tokens(hidden, attention, 16, attention_weight=0.0)  # the information ranking
    missed = sum(not (set(information.index[b].tolist()) & span) for b, spans in enumerate(objects) for span in spans)
    assert missed > 0  # what the selection fixes


def test_dpp_prefers_the_attended_copy():
    """Two objects with identical rows: the conditional DPP keeps the one the prompt attends to and
    not its duplicate; volume alone cannot tell them apart."""
    hidden, _ = scene_rows(batch_size=1, objects=0)
    generator = torch.Generator().manual_seed(3)
    thing = torch.randn(hidden.shape[-1], generator=generator) * 2
    hidden[0, 100] += thing
    hidden[0, 400] += thing
    attention = torch.full((1, N), 1e-3)
    attention[0, 400] = 0.2
    kept = set(selection.dpp_order(hidden, attention, 8)[0].tolist())
    assert 400 in kept and 100 not in kept


def test_debiased_attention_removes_the_recency_trend_and_sinks():
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, N, 16, generator=generator)
    hidden[:, 7] *= 50  # a massive-activation token
    trend = torch.linspace(0, 3, N).exp()  # attention that grows with position whatever the content
    content = torch.ones(2, N)
    content[:, 300] = 20.0  # one token the prompt really looks at
    attention = trend * content
    attention[:, 7] = 50.0  # the sink soaks up attention
    debiased = selection.debiased_attention(hidden, attention)
    assert debiased.argmax(-1).tolist() == [300, 300]
    flat = debiased[:, [i for i in range(N) if i not in (7, 300)]]
    assert (flat.amax(-1) / flat.amin(-1) < 1.2).all()  # the trend is gone
    assert torch.equal(debiased[:, 7], debiased.median(-1).values)


@pytest.mark.parametrize("method", methods.names("selection"))
def test_selections_are_valid_and_batch_invariant(method):
    hidden, _ = scene_rows(batch_size=3)
    attention = torch.rand(3, N, generator=torch.Generator().manual_seed(5)).softmax(-1)
    grid = square_grid(3)  # read by volume-spatial only
    for keep in (192, 64, 1):
        together = methods.reduce_tokens(hidden, attention, keep, method=method, grid=grid)
        assert together.index.shape == (3, keep) and (together.index.diff(dim=1) > 0).all()
        assert together.hidden.shape == (3, keep, hidden.shape[-1])
        kept_slots = together.assignment.gather(1, together.index)
        assert kept_slots.tolist() == [list(range(keep))] * 3
        for b in range(3):
            alone = methods.reduce_tokens(hidden[b : b + 1], attention[b : b + 1], keep, method=method, grid=grid[:1])
            assert torch.equal(alone.index[0], together.index[b])
            torch.testing.assert_close(alone.hidden[0], together.hidden[b])
    assert methods.reduce_tokens(hidden, attention, N, method=method).index.shape == (3, N)  # identity


def test_debiased_keeps_the_papers_two_stages():
    hidden, _ = scene_rows(batch_size=2)
    attention = torch.rand(2, N, generator=torch.Generator().manual_seed(6)).softmax(-1)
    ours = methods.reduce_tokens(hidden, attention, 64, method="debiased")
    direct = carve_tokens(hidden, selection.debiased_attention(hidden, attention), 64)
    assert torch.equal(ours.index, direct.index) and torch.equal(ours.hidden, direct.hidden)
    assert ours.merged.sum(1).tolist() == [32, 32]  # stage II merged M = 32 per image


def test_volume_merge_is_volume_order_through_the_papers_stage_two():
    hidden, _ = scene_rows(batch_size=2)
    attention = torch.full(hidden.shape[:2], 1.0 / N)
    result = methods.reduce_tokens(hidden, attention, 64, method="volume-merge")
    order = selection.volume_order(hidden, 96)  # P = 1.5 T survivors, best first
    survivors = result.assignment >= 0
    for b in range(2):
        assert set(survivors[b].nonzero().flatten().tolist()) == set(order[b].tolist())
        assert set(order[b, :48].tolist()) <= set(result.index[b].tolist())  # group A is always kept
    assert result.merged.sum(1).tolist() == [32, 32] and result.index.shape == (2, 64)
