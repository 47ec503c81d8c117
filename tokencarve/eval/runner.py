"""Run one model over a question set under every (method, budget) setting, through the engine.

Every setting uses the same engine (`tokencarve.engine.CaptionEngine`, as the batch job and Serve):
the same image preprocessing, prompts (the checkpoint's chat template), batches, greedy decoding
and token counting; only the carver's config changes between batches (`TokenCarver.using`), so
baselines and TokenCarve cut at the same layer with the same RoPE and KV-cache handling.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

import tokencarve
from tokencarve.budgets import Adaptive, budget_label
from tokencarve.engine import METHODS, CaptionEngine
from tokencarve.methods import ADAPTIVE

from .questions import Question
from .scoring import summarize

BUDGETS = (576, 192, 128, 64, 32, 16)


@dataclass(frozen=True)
class Setting:
    method: str  # "none": the stock model
    # visual tokens per image entering layer K, a fraction of them, adaptive (auto:64), or None (all)
    keep: int | float | Adaptive | None

    @property
    def name(self) -> str:
        return "none" if self.method == "none" else f"{self.method}@{self.keep}"


def settings(methods, budgets, tokens_per_image: int) -> list[Setting]:
    """The grid; a count >= the most tokens an image can have is the stock model, run once as "none".
    Adaptive budgets run on the methods that have one (methods.ADAPTIVE) and are skipped, with a note,
    for the others."""

    def stock(b):
        return isinstance(b, int) and b >= tokens_per_image

    grid = [Setting("none", None)] if "none" in methods or any(stock(b) for b in budgets) else []
    for method in methods:
        if method == "none":
            continue
        if method not in tokencarve.METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        grid += [Setting(method, b) for b in budgets if not stock(b) and _runs(method, b)]
    return grid


def _runs(method: str, budget) -> bool:
    if not isinstance(budget, Adaptive) or method in ADAPTIVE:
        return True
    print(f"note: {method} has no adaptive budget; {method}@{budget} is left out", file=sys.stderr)
    return False


def spectrum(hidden: torch.Tensor) -> dict[str, float]:
    """Information in a [T, D] hidden-state matrix: its effective rank (Roy & Vetterli 2007: exp of
    the entropy of the normalised singular values) and its nuclear norm (sum of singular values)."""
    singular = torch.linalg.svdvals(hidden.double())
    total = float(singular.sum())
    p = singular / max(total, 1e-300)
    entropy = float(-(p * p.clamp_min(1e-300).log()).sum())
    return {"effective_rank": math.exp(entropy), "nuclear_norm": total}


class Evaluator:
    """Answers question batches under any setting through the production engine (`CaptionEngine`:
    the same image preprocessing, prompt template, batching and generation as the batch job and
    Serve), so that "is this budget safe for my data?" measures the job a user will run."""

    def __init__(self, engine: CaptionEngine, batch_size: int = 16):
        self.engine, self.batch_size = engine, batch_size
        self.tokens_per_image = engine.inputs.image_tokens  # the most an image can have: 576 for LLaVA-1.5
        engine.model.tokencarve.record_hidden = True  # each image's rows entering layer K, for its spectrum

    @torch.inference_mode()
    def answer(self, questions: list[Question], setting: Setting) -> tuple[list, list[dict]]:
        """Greedy answers (the engine's Captions) to one batch, and the spectrum of each image's visual
        rows entering layer K."""
        images = [q.image for q in questions]  # decoded per batch
        captions = self.engine.caption(images, [q.prompt for q in questions], keep=setting.keep, method=setting.method)
        # the prefill's figures: generate() keeps them on the cache note after the decode steps
        carves = self.engine.model.tokencarve.last_stats.images
        spectra = [dict(spectrum(carve.hidden), visual_tokens=int(carve.hidden.shape[0])) for carve in carves]
        return captions, spectra

    def calibrated(self, questions: list[Question], setting: Setting) -> Setting:
        """An adaptive budget without tau, calibrated on the first `calibration_rows` questions' images (as
        the job calibrates on its first rows: images only, never an answer); any other setting as it is."""
        keep = setting.keep
        if not isinstance(keep, Adaptive) or keep.tau is not None:
            return setting
        sample = questions[: self.engine.config.calibration_rows]
        tuned = self.engine.calibrate([q.image for q in sample], [q.prompt for q in sample], keep, setting.method)
        return Setting(setting.method, tuned)

    def run(self, questions: list[Question], setting: Setting, progress=None) -> dict:
        """Predictions, scores and mean spectrum figures of one setting; an adaptive budget is calibrated
        first (its tau and the mean count it kept are in the summary)."""
        written, setting = setting, self.calibrated(questions, setting)
        records, spectra = [], []
        for start in range(0, len(questions), self.batch_size):
            batch = questions[start : start + self.batch_size]
            captions, batch_spectra = self.answer(batch, setting)
            spectra += batch_spectra
            records += [
                {
                    "question_id": q.question_id,
                    "task": q.task,
                    "prompt": q.prompt,
                    "answer": q.answer,
                    "prediction": c.caption,
                    "visual_tokens_kept": c.visual_tokens_kept,
                }
                for q, c in zip(batch, captions)
            ]
            if progress is not None:
                progress.update(len(batch))
        summary = summarize(records)
        summary["information"] = {
            key: sum(s[key] for s in spectra) / len(spectra)
            for key in ("effective_rank", "nuclear_norm", "visual_tokens")
        }
        summary["mean_visual_tokens_kept"] = sum(r["visual_tokens_kept"] for r in records) / len(records)
        if isinstance(setting.keep, Adaptive):
            summary["tau"] = setting.keep.tau
            summary["kept"] = budget_label(setting.keep)  # the budget as run: with its tau
        return {
            # the budget as it was written: "auto:64" (the calibrated form is the summary's `kept`)
            "setting": {"method": written.method, "keep": budget_label(written.keep)},
            "summary": summary,
            "records": records,
            "spectra": spectra,
        }
