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

    volume-merge  volume's greedy order as the paper's stage I ranking: the first P = 1.5 T picks
               survive and stage II merges M = T / 2 of them into their most similar earlier picks
               (core.merge_survivors), so the budget's last tokens carry averages instead of picks.

`volume`, `dpp` and `divprune` prune (the unselected tokens are dropped); `debiased` and
`volume-merge` keep the paper's two stages. tokencarve.methods names them (`*_tokens` below); each
takes a batch with 1 <= keep < N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .core import CarveResult, carve_tokens, kept_only, merge_survivors, stage_sizes

DPP_THETA = 2.0  # relevance weight of the dpp method: the most attended token's q is e^2 ~ 7.4x the least's
SINK_NORM_RATIO = 8.0  # a token whose hidden-state norm is this many times the median is an attention sink


def greedy_pivots(gram: torch.Tensor, keep: int, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy pivoted Cholesky of a batch of PSD matrices [B, N, N]: `keep` indices [B, keep] in pick order.

    Each step picks the index with the largest residual diagonal, the squared distance of its row
    from the span of the rows picked so far (so for gram = X X^T this is column-pivoted QR of X^T,
    greedy volume maximisation; for a DPP kernel, the greedy MAP: log det grows by log of that
    residual). Once the matrix's rank is used up (residuals ~0, e.g. keep > D), the remaining picks
    follow `fallback` ([B, N], higher first; default: the diagonal), never an already picked index.
    """
    gram = gram.to(torch.float64)
    batch, num_tokens, _ = gram.shape
    rows = torch.arange(batch, device=gram.device)
    residual = gram.diagonal(dim1=-2, dim2=-1).clone()
    tolerance = residual.amax(-1, keepdim=True).clamp_min(1e-300) * 1e-10
    fallback = (fallback if fallback is not None else residual).to(torch.float64)
    factor = gram.new_zeros(batch, num_tokens, keep)
    picked = torch.zeros(batch, num_tokens, dtype=torch.bool, device=gram.device)
    order = torch.empty(batch, keep, dtype=torch.long, device=gram.device)
    for step in range(keep):
        gain = residual.masked_fill(picked, float("-inf"))
        best_gain, best = gain.max(-1)
        exhausted = best_gain <= tolerance[:, 0]
        best = torch.where(exhausted, fallback.masked_fill(picked, float("-inf")).argmax(-1), best)
        order[:, step] = best
        picked[rows, best] = True
        # new Cholesky column: (G[:, j] - F F[j]^T) / sqrt(residual_j), zero where the rank is used up
        column = gram[rows, :, best] - (factor[:, :, :step] @ factor[rows, best, :step].unsqueeze(-1)).squeeze(-1)
        scale = torch.where(exhausted, 0.0, best_gain.clamp_min(1e-300).rsqrt())
        column = column * scale.unsqueeze(-1)
        factor[:, :, step] = column
        residual = (residual - column.square()).clamp_min(0.0)
    return order


def centred_rows(hidden: torch.Tensor) -> torch.Tensor:
    """H minus the image's mean visual row, in float32 ([B, N, D])."""
    values = hidden.float()
    return values - values.mean(dim=1, keepdim=True)


def volume_order(hidden: torch.Tensor, keep: int) -> torch.Tensor:
    """`keep` tokens [B, keep] by greedy volume (pivoted QR) on the centred rows, in pick order."""
    rows = centred_rows(hidden)
    return greedy_pivots(rows @ rows.mT, keep)


def relevance(attention: torch.Tensor) -> torch.Tensor:
    """The attention row min-max normalised to [0, 1] per image (all equal -> all zero)."""
    attention = attention.to(torch.float64)
    low, high = attention.amin(-1, keepdim=True), attention.amax(-1, keepdim=True)
    return (attention - low) / (high - low).clamp_min(1e-30)


def dpp_order(hidden: torch.Tensor, attention: torch.Tensor, keep: int, theta: float = DPP_THETA) -> torch.Tensor:
    """`keep` tokens [B, keep] by the greedy MAP of the conditional DPP kernel diag(q) S diag(q)."""
    unit = F.normalize(hidden.float(), dim=-1).to(torch.float64)  # CDPruner's cosine, on the raw rows
    quality = torch.exp(theta * relevance(attention))
    kernel = quality.unsqueeze(-1) * (unit @ unit.mT) * quality.unsqueeze(-2)
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


def volume_tokens(hidden: torch.Tensor, keep: int) -> CarveResult:
    return kept_only(hidden, volume_order(hidden, keep))


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
