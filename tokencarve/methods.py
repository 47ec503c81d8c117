"""Every token-selection method, in one registry: its name, what it does, and its properties.

The method lists of the library (`tokencarve.METHODS`), the engine, the job's and Serve's choices,
the evaluation's reference methods and the docs' table are all read from `REGISTRY`; adding a method
is one entry here. Each method runs at the same cut through the same adapter, so token counts, RoPE
positions and the KV cache are handled identically; only the choice of tokens differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import baselines, selection
from .budgets import Adaptive
from .core import CarveResult, carve_tokens, check_inputs

# select(hidden [B, N, D], attention [B, N], keep, attention_weight, seed, grid) for 1 <= keep < N;
# grid [B, N, 2]: each token's row and column on its image's token grid, or None where the model's
# images have no one grid (LLaVA-NeXT / OneVision); only the methods with uses_grid read it
Select = Callable[[torch.Tensor, torch.Tensor, int, float, int, torch.Tensor | None], CarveResult]
# adaptive(hidden, attention, rule, grid): a count per image from the energy its picks span (tokencarve.budgets)
SelectAdaptive = Callable[[torch.Tensor, torch.Tensor, selection.Stopping, torch.Tensor | None], CarveResult]

KINDS = {
    "paper": "the paper's ranking and its single-score ablations",
    "selection": "redundancy-aware: chooses a set, each pick conditioned on the picks before it",
    "baseline": "published comparison methods",
}


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # one of KINDS
    summary: str  # one line, for the docs' table (markdown_table)
    merges: bool  # some kept tokens carry the mean of several (stage II's merge, or pooling); else it only prunes
    needs_attention: bool  # reads the last prompt token's attention row from layer K-1
    # needs each token's place on one grid per image: LLaVA-1.5's square grid, Qwen-VL's native ones;
    # refused on NeXT / OneVision, whose images are a base grid, tiles and newline tokens in one span
    needs_grid: bool
    select: Select
    uses_grid: bool = False  # reads each token's place on its image's grid (where a model has none: ignores it,
    # unless it needs_grid)
    # an adaptive budget (auto:64): methods whose greedy pick tracks the energy its picks leave out; None: refused
    adaptive: SelectAdaptive | None = None


REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "tokencarve",
            "paper",
            "the paper (arXiv 2503.10501): Borda fusion of the information and attention ranks, prune, merge",
            merges=True,
            needs_attention=True,
            needs_grid=False,
            select=lambda h, a, keep, w, seed, grid: carve_tokens(h, a, keep, attention_weight=w),
        ),
        Method(
            "information",
            "paper",
            "the paper's prune and merge on the information (SVD) rank alone",
            merges=True,
            needs_attention=False,
            needs_grid=False,
            select=lambda h, a, keep, w, seed, grid: carve_tokens(h, a, keep, attention_weight=0.0),
        ),
        Method(
            "attention",
            "paper",
            "the paper's prune and merge on the attention rank alone",
            merges=True,
            needs_attention=True,
            needs_grid=False,
            select=lambda h, a, keep, w, seed, grid: carve_tokens(h, a, keep, attention_weight=1.0),
        ),
        Method(
            "volume",
            "selection",
            "greedy volume: pivoted QR of the centred hidden states, each pick what the others do not carry",
            merges=False,
            needs_attention=False,
            needs_grid=False,
            select=lambda h, a, keep, w, seed, grid: selection.volume_tokens(h, keep),
            adaptive=lambda h, a, rule, grid: selection.volume_adaptive(h, rule),
        ),
        Method(
            "volume-spatial",
            "selection",
            "volume over what a token shows and where it is: picks spread over the image, so empty regions "
            "keep a token (Qwen-VL and LLaVA-1.5 grids; elsewhere `volume`)",
            merges=False,
            needs_attention=False,
            needs_grid=False,
            select=lambda h, a, keep, w, seed, grid: selection.volume_tokens(h, keep, grid),
            adaptive=lambda h, a, rule, grid: selection.volume_adaptive(h, rule, grid),
            uses_grid=True,
        ),
        Method(
            "volume-merge",
            "selection",
            "volume's pick order as the paper's stage I ranking, then the paper's merge",
            merges=True,
            needs_attention=False,
            needs_grid=False,
            select=lambda h, a, keep, w, seed, grid: selection.volume_merge_tokens(h, keep),
            adaptive=lambda h, a, rule, grid: selection.volume_merge_adaptive(h, rule),
        ),
        Method(
            "dpp",
            "selection",
            "CDPruner-style conditional DPP: diversity weighted by the attention row",
            merges=False,
            needs_attention=True,
            needs_grid=False,
            select=lambda h, a, keep, w, seed, grid: selection.dpp_tokens(h, a, keep),
            adaptive=lambda h, a, rule, grid: selection.dpp_adaptive(h, a, rule),
        ),
        Method(
            "divprune",
            "selection",
            "DivPrune's max-min diversity on cosine distance",
            merges=False,
            needs_attention=False,
            needs_grid=False,
            select=lambda h, a, keep, w, seed, grid: selection.divprune_tokens(h, keep),
        ),
        Method(
            "debiased",
            "selection",
            "the paper's method on an attention row with its recency trend and sinks removed",
            merges=True,
            needs_attention=True,
            needs_grid=False,
            select=lambda h, a, keep, w, seed, grid: selection.debiased_tokens(h, a, keep, attention_weight=w),
        ),
        Method(
            "fastv",
            "baseline",
            "FastV-style: the most attended tokens, pruned, nothing merged",
            merges=False,
            needs_attention=True,
            needs_grid=False,
            select=lambda h, a, keep, w, seed, grid: baselines.fastv_tokens(h, a, keep),
        ),
        Method(
            "random",
            "baseline",
            "a seeded uniform subset",
            merges=False,
            needs_attention=False,
            needs_grid=False,
            select=lambda h, a, keep, w, seed, grid: baselines.random_tokens(h, keep, seed),
        ),
        Method(
            "pool",
            "baseline",
            "average pooling of each image's token grid to near-square windows",
            merges=True,
            needs_attention=False,
            needs_grid=True,
            select=lambda h, a, keep, w, seed, grid: baselines.pooled_tokens(h, keep, grid),
            uses_grid=True,
        ),
    )
}

METHODS = tuple(REGISTRY)  # every method's name, in the order the docs list them


def names(kind: str) -> tuple[str, ...]:
    """The methods of one kind (a key of KINDS), in registry order."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {tuple(KINDS)}")
    return tuple(m.name for m in REGISTRY.values() if m.kind == kind)


def get(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {METHODS}") from None


ADAPTIVE = tuple(m.name for m in REGISTRY.values() if m.adaptive is not None)  # the methods auto:64 runs on


def check_adaptive(method: str) -> None:
    """Refuse an adaptive budget for a method whose selection has no energy to stop on."""
    if REGISTRY[method].adaptive is None:
        raise ValueError(
            f"method {method!r} takes a count or a fraction, not an adaptive budget (auto:...): the adaptive "
            f"count stops a greedy pick at the share of the energy its picks span, which only {', '.join(ADAPTIVE)} "
            "track"
        )


def reduce_tokens(
    hidden: torch.Tensor,
    attention: torch.Tensor,
    keep: int | Adaptive,
    *,
    method: str = "tokencarve",
    attention_weight: float = 0.5,
    seed: int = 0,
    grid: torch.Tensor | None = None,
) -> CarveResult:
    """Any method on a batch of images: hidden [B, N, D] and attention [B, N] in, `keep` tokens per
    image out (a `CarveResult`, as `core.carve_tokens` returns). keep >= N is the identity for every
    method. An adaptive budget (`Adaptive`, for the methods in ADAPTIVE) gives each image its own
    count: the result is padded to the largest, with `counts` and `shares` (CarveResult); max >= N is
    the identity. grid [B, N, 2]: each token's row and column on its image's token grid, for the
    methods that use it (`uses_grid`; the adapter passes it where the model has one)."""
    chosen = get(method)
    if grid is not None and grid.shape != (*hidden.shape[:2], 2):
        raise ValueError(f"grid must be [B, N, 2] (a row and a column per token), got {tuple(grid.shape)}")
    if isinstance(keep, Adaptive):
        check_adaptive(method)
        check_inputs(hidden, attention, keep.min)
        if keep.max >= hidden.shape[1]:
            return carve_tokens(hidden, attention, keep.max)
        return chosen.adaptive(hidden, attention, keep.rule, grid)
    check_inputs(hidden, attention, keep)
    if keep >= hidden.shape[1]:
        return carve_tokens(hidden, attention, keep)
    return chosen.select(hidden, attention, keep, attention_weight, seed, grid)


def markdown_table() -> str:
    """The methods as a Markdown table (the README holds this; a test keeps the two equal)."""
    yes = {True: "yes", False: ""}
    lines = [
        "| method | kind | what it keeps | merges | attention row | needs a token grid |",
        "|---|---|---|---|---|---|",
    ]
    for m in REGISTRY.values():
        cells = [f"`{m.name}`", m.kind, m.summary, yes[m.merges], yes[m.needs_attention], yes[m.needs_grid]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
