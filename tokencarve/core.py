"""The pure-tensor core of TokenCarve: score, prune and merge visual tokens.

Everything here works on plain tensors batched over B images of N visual tokens each; nothing
knows about transformers. The model adapter (`tokencarve.adapter`) feeds it the rows of the
hidden-state matrix entering decoder layer K and the last prompt token's attention in layer K-1.

The method follows ../shared/ALGORITHM.md (Tan et al., arXiv 2503.10501) step by step:
  1. information score: row-wise L1 norm of U S from the thin SVD of H,
  2. attention score:   the last prompt token's head-averaged attention,
  3. Borda rank fusion of the two, ties broken towards the lower position,
  4. stage I:  keep the P = floor(1.5 T) best tokens,
  5. stage II: merge the min(|A|, M) most redundant tokens of the lower half B into their most
               similar token of the upper half A (plain mean), leaving T tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .eigh import gram_eigh


@dataclass
class CarveResult:
    """What `carve_tokens` returns for a batch of B images.

    hidden:     [B, T, D] the kept tokens in original order, merged values in place.
    index:      [B, T]    original positions (0..N-1) of the kept tokens, ascending.
    assignment: [B, N]    for every input token, the output slot (0..T-1) that now carries it:
                          its own slot if kept, its merge target's slot if merged, -1 if pruned.
    merged:     [B, N]    True for tokens merged into another one (they have no slot of their own).
    counts:     [B]       with an adaptive budget (tokencarve.budgets.Adaptive), the tokens each image
                          keeps: slots >= counts[b] are padding (index -1, a zero row); None: all T.
    shares:     [B, S]    with an adaptive budget, the share of each image's energy its first 1..S picks span.
    """

    hidden: torch.Tensor
    index: torch.Tensor
    assignment: torch.Tensor
    merged: torch.Tensor
    counts: torch.Tensor | None = None
    shares: torch.Tensor | None = None


def stage_sizes(num_tokens: int, keep: int) -> tuple[int, int]:
    """Stage I survivors P and stage II merges M for a budget of `keep` out of `num_tokens`.

    P = floor(1.5 T), M = floor(0.5 T); when 1.5 T exceeds N every token survives stage I and
    stage II merges the N - T surplus. (P - M == T in both cases, also for odd T.)
    """
    survivors = (3 * keep) // 2
    if survivors > num_tokens:
        return num_tokens, num_tokens - keep
    return survivors, keep // 2


def information_scores(hidden: torch.Tensor, solver: str | None = None) -> torch.Tensor:
    """Each token's contribution to the spectrum of H: sv_i = sum_j |U_ij| S_j, for [B, N, D] -> [B, N].

    Row i of U S equals row i of H V, so no SVD is needed, only the eigenvectors of a Gram matrix:
    - N >= D (small models): eigh of the D x D matrix H^T H gives V, and H V is U S exactly;
    - N <  D (LLaVA-1.5: 576 < 4096): eigh of the N x N matrix H H^T = U S^2 U^T gives U and S^2.
    We chose this over `torch.linalg.svd` because it never forms the factor we throw away (the
    reference's full_matrices SVD builds a D x D V it never uses), it is a single symmetric eigh
    of the smaller side, and it batches. It runs in float64: a Gram matrix squares the condition
    number, and float64 keeps the scores accurate to far better than the reference's float32 SVD.
    The eigensolver is one batched call (`tokencarve.eigh`: `solver` None means its default).
    """
    h = hidden.to(torch.float64)
    num_tokens, dim = h.shape[-2:]
    if num_tokens >= dim:
        _, right_vectors = gram_eigh(h.mT @ h, solver)
        scaled_left = h @ right_vectors
    else:
        eigenvalues, left_vectors = gram_eigh(h @ h.mT, solver)
        scaled_left = left_vectors * eigenvalues.clamp_min(0).sqrt().unsqueeze(-2)
    return scaled_left.abs().sum(-1)


def borda_points(score: torch.Tensor) -> torch.Tensor:
    """Rank points per row: the best token gets N, the next N-1, ... ([B, N] -> [B, N] float64).

    The sort is stable, so equal scores rank in order of position (deterministic).
    """
    num_tokens = score.shape[-1]
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    points = torch.arange(num_tokens, 0, -1, dtype=torch.float64, device=score.device)
    return torch.empty_like(score, dtype=torch.float64).scatter_(-1, order, points.expand_as(order))


def fused_scores(hidden: torch.Tensor, attention: torch.Tensor, attention_weight: float) -> torch.Tensor:
    """The score that orders tokens for selection ([B, N], higher is better): w * attention points +
    (1 - w) * information points. At w = 1 or w = 0 only one ranking counts (the single-score
    ablations `attention` and `information` of tokencarve.methods), so the other is not computed:
    the result is the same, bit for bit, and w = 1 skips the eigendecomposition."""
    if attention_weight == 1.0:
        return borda_points(attention)
    if attention_weight == 0.0:
        return borda_points(information_scores(hidden))
    attention_points = borda_points(attention)
    information_points = borda_points(information_scores(hidden))
    return attention_weight * attention_points + (1 - attention_weight) * information_points


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, i]] for x [B, N, D] and index [B, K] -> [B, K, D]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def slot_assignment(index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[B, N]: the output slot of each kept token (`index` [B, T], slot t holds index[:, t]), -1 elsewhere.
    CarveResult.assignment before merged tokens are given their target's slot."""
    slots = torch.arange(index.shape[1], device=index.device).expand_as(index)
    return torch.full((index.shape[0], num_tokens), -1, dtype=torch.long, device=index.device).scatter(1, index, slots)


def kept_only(hidden: torch.Tensor, index: torch.Tensor) -> CarveResult:
    """Keep the tokens at `index` ([B, T], any order) unchanged and prune the rest (nothing merged)."""
    index = index.sort(dim=1).values
    batch, num_tokens, _ = hidden.shape
    merged = torch.zeros(batch, num_tokens, dtype=torch.bool, device=hidden.device)
    return CarveResult(gather_rows(hidden, index), index, slot_assignment(index, num_tokens), merged)


def check_inputs(hidden: torch.Tensor, attention: torch.Tensor, keep: int) -> None:
    """Refuse a budget under one token and shapes other than hidden [B, N, D], attention [B, N]."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if hidden.ndim != 3 or attention.shape != hidden.shape[:2]:
        raise ValueError(
            f"expected hidden [B, N, D] and attention [B, N]; got {tuple(hidden.shape)} and {tuple(attention.shape)}"
        )


def carve_tokens(
    hidden: torch.Tensor,
    attention: torch.Tensor,
    keep: int,
    *,
    attention_weight: float = 0.5,
) -> CarveResult:
    """Reduce N visual tokens per image to `keep` (T): prune the weakest, merge the next weakest.

    hidden:    [B, N, D] visual-token rows of the hidden states entering layer K.
    attention: [B, N]    the last prompt token's head-averaged attention to them in layer K-1.
    attention_weight: w of the rank fusion (1: attention alone, 0: information alone).
    With keep >= N nothing changes (T = N, identity).
    """
    check_inputs(hidden, attention, keep)
    batch, num_tokens, _ = hidden.shape
    device = hidden.device
    if keep >= num_tokens:
        index = torch.arange(num_tokens, device=device).expand(batch, -1)
        no_merge = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
        return CarveResult(hidden, index, index.clone(), no_merge)

    # Stage I: rank by fused score (best first) and keep the P best.
    num_survivors, num_merges = stage_sizes(num_tokens, keep)
    score = fused_scores(hidden, attention, attention_weight)
    survivors = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :num_survivors]
    return merge_survivors(hidden, survivors, num_merges)


def merge_survivors(hidden: torch.Tensor, survivors: torch.Tensor, num_merges: int) -> CarveResult:
    """Stage II on stage I's P survivors ([B, P] token positions, best first): the first half is A,
    the rest B; the `num_merges` B tokens most similar to their nearest A token are merged into it."""
    batch, num_tokens, _ = hidden.shape
    device = hidden.device
    num_survivors = survivors.shape[1]
    group_a, group_b = survivors[:, : num_survivors // 2], survivors[:, num_survivors // 2 :]

    # Stage II: each B token's most similar A token (cosine on rows of H); merge the most similar.
    values = hidden.float()
    num_merges = min(group_a.shape[1], num_merges)
    merged_b = torch.zeros(group_b.shape, dtype=torch.bool, device=device)
    target_a = torch.zeros(group_b.shape, dtype=torch.long, device=device)
    a_values = gather_rows(values, group_a)
    if num_merges > 0:
        unit = F.normalize(values, dim=-1)
        similarity = gather_rows(unit, group_b) @ gather_rows(unit, group_a).mT  # [B, |B|, |A|]
        best_similarity, target_a = similarity.max(dim=-1)
        most_similar = torch.sort(best_similarity, dim=-1, descending=True, stable=True).indices
        merged_b.scatter_(1, most_similar[:, :num_merges], True)
        # Each A token becomes the plain mean of itself and every B token merged into it.
        b_values = gather_rows(values, group_b) * merged_b.unsqueeze(-1)
        sums = a_values.scatter_add(1, target_a.unsqueeze(-1).expand_as(b_values), b_values)
        counts = torch.ones(group_a.shape, device=device).scatter_add(1, target_a, merged_b.float())
        a_values = sums / counts.unsqueeze(-1)

    # Kept tokens = A plus unmerged B, back in original order, merged values in place.
    carved = values.scatter(1, group_a.unsqueeze(-1).expand_as(a_values), a_values)
    kept = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    kept.scatter_(1, group_a, True)
    kept.scatter_(1, group_b, ~merged_b)
    index = kept.nonzero()[:, 1].view(batch, -1)
    out_hidden = gather_rows(carved, index).to(hidden.dtype)

    assignment = slot_assignment(index, num_tokens)
    merged = torch.zeros_like(kept).scatter(1, group_b, merged_b)
    if num_merges > 0:  # merged tokens are carried by their target's slot
        target_slot = assignment.gather(1, group_a.gather(1, target_a))
        assignment.scatter_(1, group_b, torch.where(merged_b, target_slot, assignment.gather(1, group_b)))
    return CarveResult(out_hidden, index, assignment, merged)
