"""The published baselines TokenCarve is compared against (tokencarve.methods names them).

Each takes a batch with 1 <= keep < N and returns a `CarveResult` like `core.carve_tokens`:

    fastv   FastV-style (Chen et al. 2024): the `keep` tokens the last prompt token attends to most
            in layer K-1; the rest are pruned, nothing is merged.
    random  a seeded random subset of `keep` tokens, pruned, nothing merged.
    pool    plain spatial average pooling of the square token grid (24 x 24 for LLaVA-1.5) down to an
            h x w grid with h * w == keep (the factor pair closest to square, e.g. 128 -> 16 x 8).
            A pooled token sits at the RoPE position of its window's centre token; the other tokens
            of the window count as merged into it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .core import CarveResult, kept_only


def fastv_tokens(hidden: torch.Tensor, attention: torch.Tensor, keep: int) -> CarveResult:
    """The `keep` most attended tokens (ties to the lower position, as in TokenCarve's ranking)."""
    order = torch.sort(attention, dim=-1, descending=True, stable=True).indices
    return kept_only(hidden, order[:, :keep])


def random_tokens(hidden: torch.Tensor, keep: int, seed: int = 0) -> CarveResult:
    """`keep` tokens drawn uniformly without replacement; one draw per image from one seeded stream,
    so the same seed and batch give the same selection on every run."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(hidden.shape[:2], generator=generator).to(hidden.device)
    return kept_only(hidden, noise.topk(keep, dim=-1).indices)


def pool_grid(keep: int) -> tuple[int, int]:
    """(rows, columns) of the pooled grid: the factor pair of `keep` closest to square, rows >= columns."""
    columns = max(d for d in range(1, math.isqrt(keep) + 1) if keep % d == 0)
    return keep // columns, columns


def pooled_tokens(hidden: torch.Tensor, keep: int) -> CarveResult:
    """Average-pool the square grid of N tokens to `pool_grid(keep)` windows (PyTorch's adaptive
    pooling windows); each window's mean sits at the position of its centre token."""
    batch, num_tokens, dim = hidden.shape
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"pool needs a square grid of visual tokens; got {num_tokens}")
    rows, columns = pool_grid(keep)
    if rows > side:
        raise ValueError(f"pool cannot make a {rows} x {columns} grid from {side} x {side} tokens (keep={keep})")
    grid = hidden.float().transpose(1, 2).reshape(batch, dim, side, side)
    pooled = F.adaptive_avg_pool2d(grid, (rows, columns)).flatten(2).transpose(1, 2).to(hidden.dtype)

    # adaptive pooling's windows: [floor(i * side / n), ceil((i + 1) * side / n)) along each axis
    def windows(n: int) -> list[tuple[int, int]]:
        return [((i * side) // n, -((-(i + 1) * side) // n)) for i in range(n)]

    row_windows, column_windows = windows(rows), windows(columns)
    centre = torch.tensor(
        [((r0 + r1 - 1) // 2) * side + (c0 + c1 - 1) // 2 for r0, r1 in row_windows for c0, c1 in column_windows],
        device=hidden.device,
    )
    # each token belongs to the window holding it (overlapping windows: the first one)
    owner = torch.full((side, side), -1, dtype=torch.long)
    for slot, ((r0, r1), (c0, c1)) in enumerate((r, c) for r in row_windows for c in column_windows):
        region = owner[r0:r1, c0:c1]
        region[region < 0] = slot
    assignment = owner.flatten().to(hidden.device).expand(batch, -1).clone()
    merged = torch.ones(batch, num_tokens, dtype=torch.bool, device=hidden.device)
    merged[:, centre] = False
    assignment[:, centre] = torch.arange(keep, device=hidden.device)
    return CarveResult(pooled, centre.expand(batch, -1).clone(), assignment, merged)
