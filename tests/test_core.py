"""The pure-tensor core: scores, rank fusion, stage sizes, and carve_tokens' contract."""

from __future__ import annotations

import pytest
import torch

from tokencarve import CarveResult, carve_tokens, information_scores, methods, stage_sizes
from tokencarve.core import borda_points, fused_scores

from . import reference


def svd_information(h: torch.Tensor) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(h.double(), full_matrices=False)
    return (u.abs() * s.unsqueeze(-2)).sum(-1)


@pytest.mark.parametrize("shape", [(2, 576, 64), (2, 96, 300), (1, 50, 50)])  # N > D, N < D, N == D
def test_gram_route_equals_the_svd_definition(shape):
    h = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(information_scores(h), svd_information(h), rtol=1e-9, atol=1e-9)


def test_information_score_ignores_singular_vector_signs_and_is_batched():
    h = torch.randn(3, 40, 16, generator=torch.Generator().manual_seed(1))
    batched = information_scores(h)
    for b in range(3):
        torch.testing.assert_close(information_scores(h[b : b + 1])[0], batched[b])
    torch.testing.assert_close(information_scores(-h), batched)


def test_borda_points_break_ties_towards_the_lower_position():
    score = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.9]])
    assert borda_points(score).tolist() == [[3.0, 5.0, 2.0, 1.0, 4.0]]


@pytest.mark.parametrize(
    "keep,expected",
    [
        (128, (192, 64)),
        (64, (96, 32)),
        (77, (115, 38)),
        (1, (1, 0)),
        (383, (574, 191)),
        (500, (576, 76)),
        (575, (576, 1)),
    ],
)
def test_stage_sizes(keep, expected):
    survivors, merges = stage_sizes(576, keep)
    assert (survivors, merges) == expected and survivors - merges == keep


def random_inputs(batch=3, n=576, d=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, d, generator=g), torch.rand(batch, n, generator=g).softmax(-1)


@pytest.mark.parametrize("method", methods.names("paper"))
@pytest.mark.parametrize("keep", [192, 128, 64, 33, 1, 400])
def test_the_papers_methods_match_the_reference_selection(method, keep):
    hidden, attention = random_inputs()
    result = methods.reduce_tokens(hidden, attention, keep, method=method)
    assert result.hidden.shape == (3, keep, 48) and result.index.shape == (3, keep)
    for b in range(3):
        kept, values = reference.select(hidden[b], attention[b], keep, method=method)
        assert result.index[b].tolist() == kept
        torch.testing.assert_close(result.hidden[b], torch.stack([values[i] for i in kept]))


def test_assignment_describes_every_token():
    hidden, attention = random_inputs(batch=2)
    result: CarveResult = carve_tokens(hidden, attention, 64)
    for b in range(2):
        slots = result.assignment[b]
        assert (slots[result.index[b]] == torch.arange(64)).all()  # kept tokens carry their own slot
        assert int((slots == -1).sum()) == 576 - 96  # stage I pruned N - P
        assert int(result.merged[b].sum()) == 32  # stage II merged M
        for slot in range(64):  # each output is the mean of the tokens it carries
            members = (slots == slot).nonzero()[:, 0]
            torch.testing.assert_close(result.hidden[b, slot], hidden[b, members].mean(0), rtol=1e-5, atol=1e-6)


def test_attention_weight_moves_the_fused_ranking_between_the_two_single_scores():
    """w = 1 and w = 0 are the attention and information ablations: the reference's single-score
    rankings, and bit for bit the fused formula, although only one ranking is computed."""
    hidden, attention = random_inputs(batch=1)
    only_attention = carve_tokens(hidden, attention, 64, attention_weight=1.0).index
    only_information = carve_tokens(hidden, attention, 64, attention_weight=0.0).index
    assert only_attention.tolist() == [reference.select(hidden[0], attention[0], 64, method="attention")[0]]
    assert only_information.tolist() == [reference.select(hidden[0], attention[0], 64, method="information")[0]]
    assert not torch.equal(only_attention, only_information)
    attention_points, information_points = borda_points(attention), borda_points(information_scores(hidden))
    for w in (1.0, 0.0):
        formula = w * attention_points + (1 - w) * information_points
        assert torch.equal(fused_scores(hidden, attention, w), formula)


def test_keep_at_least_n_is_the_identity():
    hidden, attention = random_inputs(batch=2, n=100)
    result = carve_tokens(hidden, attention, 100)
    assert result.hidden is hidden and result.index.tolist() == [list(range(100))] * 2
    assert carve_tokens(hidden, attention, 1000).hidden is hidden


def test_half_precision_inputs_keep_their_dtype():
    hidden, attention = random_inputs(batch=1)
    result = carve_tokens(hidden.bfloat16(), attention, 64)
    assert result.hidden.dtype == torch.bfloat16
    assert torch.equal(result.index, carve_tokens(hidden.bfloat16().float(), attention, 64).index)


@pytest.mark.parametrize(
    "keep,shape,message",
    [
        (0, (1, 10, 4), "keep must be >= 1"),
        (4, (10, 4), r"expected hidden \[B, N, D\]"),
    ],
)
def test_bad_arguments(keep, shape, message):
    with pytest.raises(ValueError, match=message):
        carve_tokens(torch.randn(*shape), torch.rand(1, 10), keep)
    with pytest.raises(ValueError, match=message):
        methods.reduce_tokens(torch.randn(*shape), torch.rand(1, 10), keep, method="volume")
    with pytest.raises(ValueError, match="unknown method"):
        methods.reduce_tokens(torch.randn(1, 10, 4), torch.rand(1, 10), 4, method="magic")
