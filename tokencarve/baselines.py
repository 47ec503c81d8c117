"""The published baselines TokenCarve is compared against (tokencarve.methods names them).

Each takes a batch with 1 <= keep < N and returns a `CarveResult` like `core.carve_tokens`:

    fastv   FastV-style (Chen et al. 2024): the `keep` tokens the last prompt token attends to most
            in layer K-1; the rest are pruned, nothing is merged.
    random  a seeded random subset of `keep` tokens, pruned, nothing merged.
    pool    plain spatial average pooling of each image's token grid (24 x 24 for LLaVA-1.5, as
            wide and high as the image for Qwen-VL) down to `keep` windows: bands of rows, each cut
            into columns, near-square windows for any `keep` (`pool_layout`). A pooled token sits at
            the RoPE position of its window's centre token; the other tokens of the window count as
            merged into it.
"""

from __future__ import annotations

import math

import torch

from .core import CarveResult, kept_only
from .selection import square_grid


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


def pool_bands(keep: int, height: int, width: int) -> int:
    """How many bands of rows `pool_layout` cuts a height x width grid into for `keep` windows: the
    count whose windows come closest to square (|log of their mean height / mean width|), each band
    no wider than the grid allows (ties: fewer bands)."""
    fits = [bands for bands in range(1, min(height, keep) + 1) if -(-keep // bands) <= width]
    if not fits:
        raise ValueError(f"pool cannot make {keep} windows from a {height} x {width} token grid")
    return min(fits, key=lambda bands: abs(math.log((height / bands) / (width * bands / keep))))


def pool_layout(keep: int, height: int, width: int) -> list[int]:
    """The pooled layout of a height x width token grid: the windows in each band of rows. `keep`
    windows in all, bands of equal height (to a row) cut into columns of equal width; the counts
    differ by at most one between bands (spread evenly), so any `keep` gets near-square windows where
    a plain rows x columns grid needs a factor pair (13 -> 13 x 1 strips). 24 x 24 at 64: 8 bands of 8."""
    bands = pool_bands(keep, height, width)
    return [(i + 1) * keep // bands - i * keep // bands for i in range(bands)]


def _ceil_div(a: torch.Tensor, b) -> torch.Tensor:
    return -(-a // b)


def _pool_one(place: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's windows: (window of each token [N], centre token of each window [keep]), from each
    token's (row, column) on its grid (`place` [N, 2], any offset and order)."""
    place = place - place.amin(0)
    row, column = place[:, 0], place[:, 1]
    height, width = (int(x) + 1 for x in place.amax(0))
    per_band = pool_layout(keep, height, width)
    bands = len(per_band)
    first = torch.tensor([0, *per_band], device=place.device).cumsum(0)  # each band's first window
    band = row * bands // height  # band i holds rows [ceil(i H / bands), ceil((i + 1) H / bands))
    columns = first[band + 1] - first[band]
    within = column * columns // width  # the same cut across the band's width
    window = first[band] + within
    # each window's centre cell: its middle row and column (the upper / left one where even)
    centre_row = (_ceil_div(band * height, bands) + _ceil_div((band + 1) * height, bands) - 1) // 2
    centre_column = (_ceil_div(within * width, columns) + _ceil_div((within + 1) * width, columns) - 1) // 2
    at_centre = (row == centre_row) & (column == centre_column)
    index = torch.arange(len(place), device=place.device)
    # the window's first token at its centre cell (a video's frames share a cell: the first frame's)
    centre = torch.full((keep,), len(place), device=place.device).scatter_reduce(
        0, window[at_centre], index[at_centre], reduce="amin"
    )
    if bool((centre == len(place)).any()):  # only a grid with holes has a window without its centre cell
        raise ValueError(f"pool needs every cell of the {height} x {width} token grid; some have no token")
    return window, centre


def pooled_tokens(hidden: torch.Tensor, keep: int, grid: torch.Tensor | None = None) -> CarveResult:
    """Average-pool each image's token grid to `keep` windows (`pool_layout`); each window's mean sits
    at the position of its centre token and the window's other tokens count as merged into it. grid
    [B, N, 2]: each token's row and column on its image's grid (Qwen-VL: as wide and high as the
    image); None: the square grid of N tokens in raster order (LLaVA-1.5's 24 x 24)."""
    batch, num_tokens, dim = hidden.shape
    if grid is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"pool needs a square grid of visual tokens or each token's place; got {num_tokens}")
        grid = square_grid(side, batch, hidden.device)
    values = hidden.float()
    rows, index, assignment = [], [], []
    for b in range(batch):
        window, centre = _pool_one(grid[b].long(), keep)
        sums = values.new_zeros(keep, dim).index_add_(0, window, values[b])
        means = sums / torch.bincount(window, minlength=keep).unsqueeze(-1)
        order = centre.argsort()  # slots in the order of the centres' positions
        slot = order.argsort()
        rows.append(means[order])
        index.append(centre[order])
        assignment.append(slot[window])
    index, assignment = torch.stack(index), torch.stack(assignment)
    merged = torch.ones(batch, num_tokens, dtype=torch.bool, device=hidden.device)
    merged.scatter_(1, index, False)
    return CarveResult(torch.stack(rows).to(hidden.dtype), index, assignment, merged)
