"""Redundancy-aware token selection: keep tokens that each add something the others do not carry.

TokenCarve (tokencarve.core) and the attention baselines score tokens one by one, so a few hundred
near-identical background tokens compete with the handful that carry an object, and the ranking
keeps many copies of the same thing. The methods here choose a set instead, greedily, each pick
conditioned on the picks before it. All work on the same inputs as the core (the visual rows H of
the hidden states entering layer K, [B, N, D], and the last prompt token's attention in layer
K-1, [B, N]), batched over images: one N x N Gram (a GEMM) and then `keep` cheap O(N * keep) steps.

    volume     greedy volume maximisation (= column-pivoted QR of H's rows, run as a pivoted
               Cholesky of the Gram matrix): each pick is the token with the largest component
               outside the span of the tokens already kept. Rows are centred on the image's mean
               token first, so the component every token shares does not count as information.
               The same premise as TokenCarve's (keep what preserves the information of H), as a
               set function instead of a per-token score.
    dpp        prompt-conditioned diversity (CDPruner, Zhang et al. 2025, arXiv 2506.10967): the
               greedy MAP of a determinantal point process with kernel L = diag(q) S diag(q),
               S the cosine similarity of the rows (as CDPruner: normalising centred rows would
               blow the background's small noise up to full-length directions) and q_i = exp(theta * r_i) a relevance
               from the last prompt token's attention (r min-max normalised to [0, 1]). The cut
               has no text encoder, so the attention row stands in for CDPruner's text relevance.
    divprune   max-min diversity (DivPrune, Alvar et al. CVPR 2025, arXiv 2503.02175): first the
               token farthest from its nearest neighbour, then always the token whose nearest kept
               token is farthest (cosine distance on the rows of H).
    debiased   TokenCarve's fused score with the attention row debiased first (in the spirit of
               arXiv 2508.17807): the recency trend (a log-linear fit of attention against position
               within the image, which RoPE's decay and causal attention produce whatever the
               content) is divided out, and attention sinks (tokens whose hidden-state norm is far
               above the image's median: massive activations that attract attention whatever the
               prompt) get the image's median attention. Prune and merge as in the paper.

    volume-spatial  volume over what a token shows and where it is: the same greedy on the centred
               Gram plus a place kernel, SPATIAL_WEIGHT x the image's mean token energy x
               exp(-d^2 / 2 SPATIAL_WIDTH^2), d the distance of two tokens on the image's token grid
               (in tokens). Neighbours then share a component (adjacent ones ~36 %), so a pick
               explains part of the tokens around it and the picks spread: a large object's tokens
               stop crowding the budget and an empty region keeps a token saying it is empty. Plain
               volume keeps none there, and a decoder that sees no token in a region fills it from
               its neighbours (carve-tiny-qwen's captions at a quarter of the tokens: 76 -> 86 %,
               docs/EVALUATION.md). Needs each token's place (`grid`): Qwen-VL's mRoPE rows,
               LLaVA-1.5's square grid; without one it is exactly `volume`.
    volume-merge  volume's greedy order as the paper's stage I ranking: the first P = 1.5 T picks
               survive and stage II merges M = T / 2 of them into their most similar earlier picks
               (core.merge_survivors), so the budget's last tokens carry averages instead of picks.

`volume`, `dpp` and `divprune` prune (the unselected tokens are dropped); `debiased` and
`volume-merge` keep the paper's two stages. tokencarve.methods names them (`*_tokens` below); each
takes a batch with 1 <= keep < N.

Adaptive budgets (tokencarve.budgets.Adaptive, `auto:64`): the pivoted Cholesky's residual diagonal
sums to the energy the picks so far do not span, so after each pick the share they do span is free.
`adaptive_pivots` runs the greedy until every image of the batch has reached a share tau (and made
the picks its count needs), `adaptive_counts` turns the shares into counts (the first k at tau,
clamped, rounded up to a multiple), `calibrate_tau` finds the tau whose mean count over a sample is a
given mean. The batch stays one call: images keep different counts, so results are padded to the
largest (`kept_by_count`, `merged_by_count`) and carry their `counts`; the adapter places only each
image's own tokens. `volume`, `volume-spatial` (the share of its Gram-plus-place trace),
`volume-merge` (volume's count, then stage II within it) and `dpp` (the share of its kernel's trace)
have one (`*_adaptive`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .core import CarveResult, carve_tokens, gather_rows, kept_only, merge_survivors, stage_sizes

DPP_THETA = 2.0  # relevance weight of the dpp method: the most attended token's q is e^2 ~ 7.4x the least's
# volume-spatial's place kernel, chosen on 200 development captions of carve-tiny-qwen (seed 99, not
# the evaluation's questions): weights 0.5-0.75 and widths 0.7-1.0 tokens did alike, a pure ridge
# (width -> 0) nothing; a width proportional to the image (~1.8 tokens on LLaVA-1.5's 24 x 24) cost
# carve-tiny-hard's captions 6 points, so the width is in tokens, the grid's own scale
SPATIAL_WEIGHT = 0.5  # its scale, as a share of the image's mean centred token energy
SPATIAL_WIDTH = 0.7  # its width sigma, in tokens of the grid
SINK_NORM_RATIO = 8.0  # a token whose hidden-state norm is this many times the median is an attention sink


def _pivot_steps(gram: torch.Tensor, limit: int, fallback: torch.Tensor | None = None):
    """The greedy pivoted Cholesky of a batch of PSD matrices [B, N, N], one step at a time: yields each
    step's pick [B] and the residual diagonal [B, N] left after it (its sum: the trace the picks do not
    span, for gram = X X^T the squared Frobenius norm of X's rows outside the picked rows' span).

    Each step picks the index with the largest residual diagonal, the squared distance of its row
    from the span of the rows picked so far (so for gram = X X^T this is column-pivoted QR of X^T,
    greedy volume maximisation; for a DPP kernel, the greedy MAP: log det grows by log of that
    residual). Once the matrix's rank is used up (residuals ~0, e.g. keep > D), the remaining picks
    follow `fallback` ([B, N], higher first; default: the diagonal), never an already picked index.
    At most `limit` steps."""
    gram = gram.to(torch.float64)
    batch, num_tokens, _ = gram.shape
    rows = torch.arange(batch, device=gram.device)
    residual = gram.diagonal(dim1=-2, dim2=-1).clone()
    tolerance = residual.amax(-1, keepdim=True).clamp_min(1e-300) * 1e-10
    fallback = (fallback if fallback is not None else residual).to(torch.float64)
    # the Cholesky factor, one row per step ([B, limit, N]): the steps so far are a contiguous block
    # whatever `limit` is (an adaptive budget's is its max, far past where most images stop)
    factor = gram.new_zeros(batch, limit, num_tokens)
    picked = torch.zeros(batch, num_tokens, dtype=torch.bool, device=gram.device)
    for step in range(limit):
        gain = residual.masked_fill(picked, float("-inf"))
        best_gain, best = gain.max(-1)
        exhausted = best_gain <= tolerance[:, 0]
        best = torch.where(exhausted, fallback.masked_fill(picked, float("-inf")).argmax(-1), best)
        picked[rows, best] = True
        # new Cholesky column: (G[:, j] - F F[j]^T) / sqrt(residual_j), zero where the rank is used up
        column = gram[rows, :, best] - (factor[:, :step].mT @ factor[rows, :step, best].unsqueeze(-1)).squeeze(-1)
        scale = torch.where(exhausted, 0.0, best_gain.clamp_min(1e-300).rsqrt())
        column = column * scale.unsqueeze(-1)
        factor[:, step] = column
        residual = (residual - column.square()).clamp_min(0.0)
        yield best, residual


def greedy_pivots(gram: torch.Tensor, keep: int, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy pivoted Cholesky of a batch of PSD matrices [B, N, N]: `keep` indices [B, keep] in pick
    order (`_pivot_steps` says how each is chosen)."""
    return torch.stack([best for best, _ in _pivot_steps(gram, keep, fallback)], dim=1)


@dataclass(frozen=True)
class Stopping:
    """The adaptive stopping rule in plain numbers (tokencarve.budgets.Adaptive holds and checks them):
    each image keeps the first k picks whose span holds a share `tau` of its energy (the Gram's trace),
    clamped to [low, high] and rounded up to a multiple of `multiple`. tau None: a calibration pass
    (every image keeps `high`; its shares are what calibrate_tau reads)."""

    tau: float | None
    low: int
    high: int
    multiple: int


def adaptive_counts(shares: torch.Tensor, rule: Stopping) -> torch.Tensor:
    """Tokens each image keeps [B] from the share of its energy its first 1, 2, ... picks span ([B, S]).

    The first k with shares[:, k-1] >= tau; an image that never gets there within S picks counts as
    S + 1 (more than the curve shows: exact once S reaches `high`). Then clamped and rounded up."""
    if rule.tau is None:
        return torch.full(shares.shape[:1], rule.high, dtype=torch.long, device=shares.device)
    # shares never fall as picks are added, so the picks below tau are a prefix: counting them is the index
    first = (shares < rule.tau).sum(-1) + 1
    rounded = (first + rule.multiple - 1) // rule.multiple * rule.multiple
    return rounded.clamp(rule.low, rule.high)


def calibrate_tau(shares: torch.Tensor, mean: float, rule: Stopping) -> float:
    """The tau whose mean count over a calibration sample (shares [M, high]: each image's full curve)
    comes closest to `mean` (ties: the count at or above it).

    The mean count is a step function of tau that only moves where tau crosses one of the shares, so
    the candidates are the shares themselves; a bisection finds the smallest whose mean reaches `mean`.
    The tau returned sits halfway between that share and the next lower one, where the counts are
    the same as at the share but no image sits on the boundary (float noise in another batch cannot
    move it across)."""
    candidates = torch.unique(shares.flatten().to(torch.float64))  # ascending

    def mean_count(tau: float) -> float:
        return float(adaptive_counts(shares, Stopping(tau, rule.low, rule.high, rule.multiple)).double().mean())

    low, high = 0, len(candidates) - 1
    if mean_count(float(candidates[high])) < mean:
        low = high  # nothing reaches the mean below every image's last share: the highest tau there is
    while low < high:
        middle = (low + high) // 2
        if mean_count(float(candidates[middle])) >= mean:
            high = middle
        else:
            low = middle + 1
    above = float(candidates[low])
    below = float(candidates[low - 1]) if low > 0 else 0.0
    # between `below` (exclusive) and `above` (inclusive) the counts are those at `above`; at `below`
    # and just under it they are the next lower step: take whichever of the two is closer to the mean
    if low > 0 and mean - mean_count(below) < mean_count(above) - mean:
        above = below
        below = float(candidates[low - 2]) if low > 1 else 0.0
    return (above + below) / 2


def adaptive_pivots(
    gram: torch.Tensor, rule: Stopping, picks_for=lambda count: count, fallback: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy pivots until every image's adaptive count is known and its picks are made: (order [B, K],
    shares [B, S], counts [B]) with K the picks made and S = min(K, high) the curve's length.

    `picks_for(count)` is how many picks an image keeping `count` tokens needs (volume-merge's stage I
    needs 1.5 x). The loop stops once every image has reached tau and its picks, looking every
    `multiple` steps (counts only change there: one host synchronisation each); each image's picks
    and shares are those it has alone, whatever its neighbours need (the steps are per image)."""
    trace = gram.diagonal(dim1=-2, dim2=-1).to(torch.float64).sum(-1, keepdim=True).clamp_min(1e-300)
    limit = min(picks_for(rule.high), gram.shape[-1])
    picks = []
    left = trace.new_empty(trace.shape[0], min(limit, rule.high))  # the energy outside the picks, per step
    for step, (best, residual) in enumerate(_pivot_steps(gram, limit, fallback), start=1):
        picks.append(best)
        if step <= rule.high:
            left[:, step - 1] = residual.sum(-1)
        if rule.tau is not None and step % rule.multiple == 0 and step < limit:
            curve = 1.0 - left[:, :step] / trace
            reached = bool((curve[:, -1] >= rule.tau).all())
            if reached and picks_for(int(adaptive_counts(curve, rule).max())) <= step:
                break
    curve = 1.0 - left[:, : min(len(picks), rule.high)] / trace
    return torch.stack(picks, dim=1), curve, adaptive_counts(curve, rule)


def centred_rows(hidden: torch.Tensor) -> torch.Tensor:
    """H minus the image's mean visual row, in float32 ([B, N, D])."""
    values = hidden.float()
    return values - values.mean(dim=1, keepdim=True)


def volume_order(hidden: torch.Tensor, keep: int, grid: torch.Tensor | None = None) -> torch.Tensor:
    """`keep` tokens [B, keep] by greedy volume (pivoted QR) on the centred rows, in pick order (with a
    grid: volume-spatial's, on the rows with their place appended; `volume_gram`)."""
    return greedy_pivots(volume_gram(hidden, grid), keep)


def relevance(attention: torch.Tensor) -> torch.Tensor:
    """The attention row min-max normalised to [0, 1] per image (all equal -> all zero)."""
    attention = attention.to(torch.float64)
    low, high = attention.amin(-1, keepdim=True), attention.amax(-1, keepdim=True)
    return (attention - low) / (high - low).clamp_min(1e-30)


def dpp_order(hidden: torch.Tensor, attention: torch.Tensor, keep: int, theta: float = DPP_THETA) -> torch.Tensor:
    """`keep` tokens [B, keep] by the greedy MAP of the conditional DPP kernel diag(q) S diag(q)."""
    kernel, quality = dpp_kernel(hidden, attention, theta)
    return greedy_pivots(kernel, keep, fallback=quality)


def divprune_order(hidden: torch.Tensor, keep: int) -> torch.Tensor:
    """`keep` tokens [B, keep] by max-min cosine distance, in pick order (DivPrune's greedy)."""
    unit = F.normalize(hidden.float(), dim=-1)
    distance = 1.0 - unit @ unit.mT  # [B, N, N]
    batch, num_tokens, _ = distance.shape
    rows = torch.arange(batch, device=hidden.device)
    # first pick: the token whose nearest other token is farthest away
    nearest_other = distance.masked_fill(torch.eye(num_tokens, dtype=torch.bool, device=hidden.device), float("inf"))
    first = nearest_other.amin(-1).argmax(-1)
    order = torch.empty(batch, keep, dtype=torch.long, device=hidden.device)
    order[:, 0] = first
    to_kept = distance[rows, first].clone()  # each token's distance to its nearest kept token
    picked = torch.zeros(batch, num_tokens, dtype=torch.bool, device=hidden.device)
    picked[rows, first] = True
    for step in range(1, keep):
        best = to_kept.masked_fill(picked, float("-inf")).argmax(-1)
        order[:, step] = best
        picked[rows, best] = True
        to_kept = torch.minimum(to_kept, distance[rows, best])
    return order


def debiased_attention(hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """The attention row with the positional (recency) trend divided out and sinks set to the median."""
    attention = attention.to(torch.float64)
    num_tokens = attention.shape[-1]
    position = torch.linspace(-1.0, 1.0, num_tokens, dtype=torch.float64, device=attention.device)
    log_attention = attention.clamp_min(1e-30).log()
    # least-squares line through (position, log attention) per image; position is centred, so the
    # slope is <p, y> / <p, p> and the intercept the mean
    slope = (log_attention * position).sum(-1, keepdim=True) / position.square().sum()
    debiased = (log_attention - slope * position).exp()
    norms = hidden.float().norm(dim=-1).to(torch.float64)
    sinks = norms > SINK_NORM_RATIO * norms.median(dim=-1, keepdim=True).values
    return torch.where(sinks, debiased.median(dim=-1, keepdim=True).values, debiased)


def kept_by_count(hidden: torch.Tensor, order: torch.Tensor, counts: torch.Tensor) -> CarveResult:
    """Image b keeps its first counts[b] picks (`order` [B, K], pick order), pruned, nothing merged.

    One padded result for the batch: T = the largest count; image b's slots >= counts[b] are padding
    (index -1, a zero row, no token assigned to them); `counts` says how many are real."""
    batch, num_tokens, _ = hidden.shape
    width = int(counts.max())
    slots = torch.arange(width, device=hidden.device)
    real = slots < counts.unsqueeze(1)
    # padding sorts after every real position (N), so each image's real slots come first, ascending
    index = torch.where(real, order[:, :width], num_tokens).sort(dim=1).values
    rows = torch.where(real.unsqueeze(-1), gather_rows(hidden, index.clamp_max(num_tokens - 1)), 0)
    # padding writes its slot into a spare column N, dropped afterwards
    assignment = torch.full((batch, num_tokens + 1), -1, dtype=torch.long, device=hidden.device)
    assignment = assignment.scatter(1, index, slots.expand(batch, -1))[:, :num_tokens]
    merged = torch.zeros(batch, num_tokens, dtype=torch.bool, device=hidden.device)
    return CarveResult(rows, torch.where(real, index, -1), assignment, merged, counts=counts)


def merged_by_count(hidden: torch.Tensor, order: torch.Tensor, counts: torch.Tensor) -> CarveResult:
    """Volume-merge with a count per image: image b's first P(counts[b]) picks survive and stage II
    merges M(counts[b]) of them (core.stage_sizes), padded as `kept_by_count`. Stage II runs once per
    distinct count (a few: counts are multiples of the rule's `multiple`), batched over its images."""
    batch, num_tokens, dim = hidden.shape
    width = int(counts.max())
    rows = hidden.new_zeros(batch, width, dim)
    index = torch.full((batch, width), -1, dtype=torch.long, device=hidden.device)
    assignment = torch.full((batch, num_tokens), -1, dtype=torch.long, device=hidden.device)
    merged = torch.zeros(batch, num_tokens, dtype=torch.bool, device=hidden.device)
    for count in counts.unique().tolist():
        images = (counts == count).nonzero().flatten()
        survivors, merges = stage_sizes(num_tokens, count)
        part = merge_survivors(hidden[images], order[images, :survivors], merges)
        rows[images, :count], index[images, :count] = part.hidden, part.index
        assignment[images], merged[images] = part.assignment, part.merged
    return CarveResult(rows, index, assignment, merged, counts=counts)


def volume_gram(hidden: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
    """The Gram matrix of the centred rows [B, N, N]: its trace is the image's centred energy. With a
    grid ([B, N, 2], each token's row and column: volume-spatial), plus the place kernel at
    SPATIAL_WEIGHT of the mean token energy, in float64 (a sum of PSD matrices: the Gram of each row
    with a place feature appended)."""
    rows = centred_rows(hidden)
    gram = rows @ rows.mT
    if grid is None:
        return gram
    gram = gram.to(torch.float64)
    energy = gram.diagonal(dim1=-2, dim2=-1).mean(-1)
    return gram + SPATIAL_WEIGHT * energy[:, None, None] * place_kernel(grid)


def square_grid(side: int, batch: int, device=None) -> torch.Tensor:
    """Each token's (row, column) on a side x side token grid in raster order (LLaVA-1.5's 24 x 24),
    [batch, side^2, 2]: the `grid` volume-spatial and pool read."""
    index = torch.arange(side * side, device=device)
    return torch.stack([index // side, index % side], -1).expand(batch, -1, -1)


def place_kernel(grid: torch.Tensor) -> torch.Tensor:
    """exp(-d^2 / 2 SPATIAL_WIDTH^2) [B, N, N] (float64) of the tokens' distances d on their image's
    token grid (`grid` [B, N, 2]: each token's row and column)."""
    grid = grid.to(torch.float64)
    return torch.exp(-torch.cdist(grid, grid).square() / (2 * SPATIAL_WIDTH**2))


def dpp_kernel(
    hidden: torch.Tensor, attention: torch.Tensor, theta: float = DPP_THETA
) -> tuple[torch.Tensor, torch.Tensor]:
    """The conditional DPP kernel diag(q) S diag(q) [B, N, N] (float64) and the quality q [B, N]."""
    unit = F.normalize(hidden.float(), dim=-1).to(torch.float64)  # CDPruner's cosine, on the raw rows
    quality = torch.exp(theta * relevance(attention))
    return quality.unsqueeze(-1) * (unit @ unit.mT) * quality.unsqueeze(-2), quality


def with_shares(result: CarveResult, shares: torch.Tensor) -> CarveResult:
    result.shares = shares
    return result


def volume_adaptive(hidden: torch.Tensor, rule: Stopping, grid: torch.Tensor | None = None) -> CarveResult:
    """Volume with a count per image: the first k picks that span a share tau of the centred energy
    (with a grid, volume-spatial's: of its Gram's trace, place included)."""
    order, shares, counts = adaptive_pivots(volume_gram(hidden, grid), rule)
    return with_shares(kept_by_count(hidden, order, counts), shares)


def volume_merge_adaptive(hidden: torch.Tensor, rule: Stopping) -> CarveResult:
    """Volume-merge with volume's count per image (the energy its first k picks span), through stage II."""
    num_tokens = hidden.shape[1]
    order, shares, counts = adaptive_pivots(volume_gram(hidden), rule, lambda t: stage_sizes(num_tokens, t)[0])
    return with_shares(merged_by_count(hidden, order, counts), shares)


def dpp_adaptive(hidden: torch.Tensor, attention: torch.Tensor, rule: Stopping) -> CarveResult:
    """The DPP's greedy MAP with a count per image: the share of the kernel's trace (sum of q_i^2) its
    picks span; the same pivoted Cholesky, so the rule falls out of the log-det greedy unchanged."""
    kernel, quality = dpp_kernel(hidden, attention)
    order, shares, counts = adaptive_pivots(kernel, rule, fallback=quality)
    return with_shares(kept_by_count(hidden, order, counts), shares)


def volume_tokens(hidden: torch.Tensor, keep: int, grid: torch.Tensor | None = None) -> CarveResult:
    """Volume's picks, pruned (with a grid: volume-spatial's)."""
    return kept_only(hidden, volume_order(hidden, keep, grid))


def volume_merge_tokens(hidden: torch.Tensor, keep: int) -> CarveResult:
    """Volume's first P = 1.5 T picks survive stage I; stage II merges as the paper's does."""
    num_survivors, num_merges = stage_sizes(hidden.shape[1], keep)
    return merge_survivors(hidden, volume_order(hidden, num_survivors), num_merges)


def dpp_tokens(hidden: torch.Tensor, attention: torch.Tensor, keep: int) -> CarveResult:
    return kept_only(hidden, dpp_order(hidden, attention, keep))


def divprune_tokens(hidden: torch.Tensor, keep: int) -> CarveResult:
    return kept_only(hidden, divprune_order(hidden, keep))


def debiased_tokens(
    hidden: torch.Tensor, attention: torch.Tensor, keep: int, *, attention_weight: float = 0.5
) -> CarveResult:
    """The paper's prune and merge on the debiased attention row."""
    return carve_tokens(hidden, debiased_attention(hidden, attention), keep, attention_weight=attention_weight)
