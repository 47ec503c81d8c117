"""Per-image token budgets, and the one parser of their written form.

    64                   a count: every image keeps 64 tokens (CarveConfig(keep=64))
    0.1                  a fraction: each image keeps ceil(0.1 x its tokens)
    auto:64              adaptive (`Adaptive`): each image keeps what it carries, 64 per image on average
    auto:64,min=16,max=192,multiple=8,tau=0.93   the same with its bounds and a calibrated tau

An adaptive budget stops each image's greedy volume pick (tokencarve.selection) at the first k picks
that span a share tau of the image's centred energy, clamped to [min, max] and rounded up to a
multiple of `multiple`; tau is calibrated so that the mean count over a sample of images is `mean`.
Pure Python and tensors: the adapter applies a budget, the engine calibrates one, the job, Serve and
the harness read and write it in this form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from .selection import Stopping, calibrate_tau

Budget = int | float  # a count or a fraction; an Adaptive is the third kind
PREFIX = "auto"


@dataclass(frozen=True)
class Adaptive:
    """An adaptive budget per image: counts from the energy each image's picks span, `mean` on average.

    mean: the mean count over a calibration sample; min, max: the bounds of any image's count (both
    multiples of `multiple`, which every count is rounded up to, so that batches stay regular); tau:
    the share of the centred energy the kept tokens must span, None until calibrated
    (`calibrated`, `TokenCarver.calibrating`, `CaptionEngine.calibrate`). An image with no more
    tokens than `max` is left as it is (as one with no more than a count budget)."""

    mean: int | float = 64
    min: int = 16
    max: int = 192
    multiple: int = 8
    tau: float | None = None

    def __post_init__(self):
        for name in ("min", "max", "multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Adaptive.{name} must be an integer >= 1, got {value!r}")
        if self.min % self.multiple or self.max % self.multiple:
            raise ValueError(
                f"Adaptive min={self.min} and max={self.max} must be multiples of multiple={self.multiple} "
                "(every count is rounded up to one)"
            )
        mean = self.mean
        if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not self.min <= mean <= self.max:
            raise ValueError(f"Adaptive.mean must lie in [min, max] = [{self.min}, {self.max}], got {mean!r}")
        # tau above 1 is what calibration returns when the mean asks for `max` everywhere: no image stops early
        if self.tau is not None and not (isinstance(self.tau, float) and math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"Adaptive.tau must be a float > 0 (a share of the energy) or None, got {self.tau!r}")

    @property
    def rule(self) -> Stopping:
        """The stopping rule in the core's terms."""
        return Stopping(self.tau, self.min, self.max, self.multiple)

    def calibrated(self, shares: torch.Tensor) -> Adaptive:
        """This budget with the tau whose mean count over `shares` ([M, max]: the share of each sample
        image's energy its first 1..max picks span) comes closest to `mean`."""
        return replace(self, tau=calibrate_tau(shares, self.mean, replace(self, tau=None).rule))

    @property
    def uncalibrated(self) -> Adaptive:
        return replace(self, tau=None)

    def __str__(self) -> str:
        """The written form: `auto:<mean>`, then every setting that is not the default (tau exactly)."""
        extra = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name != "mean" and getattr(self, f.name) != f.default
        ]
        return ",".join([f"{PREFIX}:{self.mean!r}", *extra])

    @classmethod
    def parse(cls, text: str) -> Adaptive:
        """`auto`, `auto:64` or `auto:64,min=16,max=192,multiple=8,tau=0.93` (any order after the mean)."""
        head, *options = [part.strip() for part in text.strip().split(",")]
        name, _, mean = head.partition(":")
        if name != PREFIX:
            raise ValueError(f"an adaptive budget starts with {PREFIX}: (auto:64), got {text!r}")
        values: dict = {"mean": _number(mean, text)} if mean else {}
        known = {f.name for f in fields(cls)} - {"mean"}
        for option in options:
            key, equals, value = option.partition("=")
            if not equals or key not in known or key in values:
                raise ValueError(f"{text!r}: options are {', '.join(sorted(known))}, each once, as key=value")
            values[key] = float(value) if key == "tau" else _number(value, text)
        return cls(**values)


def _number(text: str, whole: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{whole!r}: {text!r} is not a number") from None


def parse_budget(text: str) -> Budget | Adaptive:
    """A budget as written on a command line, in a Serve setting or a request: tokens per image ("128"),
    a fraction of each image's tokens ("0.1"), or adaptive ("auto:64", "auto:64,min=16,tau=0.93")."""
    text = text.strip()
    if text.startswith(PREFIX):
        return Adaptive.parse(text)
    try:
        return int(text)
    except ValueError:
        return float(text)


def split_budgets(text: str) -> list[str]:
    """A comma-separated list of budgets ("192,64,auto:64,min=8,32"): an adaptive budget's options
    (key=value) belong to the budget before them."""
    budgets: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if "=" in part and budgets and budgets[-1].startswith(PREFIX):
            budgets[-1] += "," + part
        elif part:
            budgets.append(part)
    return budgets


def budget_label(keep: Budget | Adaptive | None) -> Budget | str | None:
    """A budget as JSON holds it: a count or a fraction as the number, an adaptive one in its written form."""
    return str(keep) if isinstance(keep, Adaptive) else keep
