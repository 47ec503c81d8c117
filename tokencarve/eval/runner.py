"""Run one model over a question set under every (method, budget) setting, through the engine.

Every setting uses the same engine (`tokencarve.engine.CaptionEngine`, as the batch job and Serve):
the same image preprocessing, prompts (the checkpoint's chat template), batches, greedy decoding
and token counting; only the carver's config changes between batches (`TokenCarver.using`), so
baselines and TokenCarve cut at the same layer with the same RoPE and KV-cache handling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import tokencarve
from tokencarve.engine import METHODS, CaptionEngine

from .questions import Question
from .scoring import summarize

BUDGETS = (576, 192, 128, 64, 32, 16)


@dataclass(frozen=True)
class Setting:
    method: str  # "none": the stock model
    keep: int | float | None  # visual tokens per image entering layer K, a fraction of them, or None (all)

    @property
    def name(self) -> str:
        return "none" if self.method == "none" else f"{self.method}@{self.keep}"


def settings(methods, budgets, tokens_per_image: int) -> list[Setting]:
    """The grid; a count >= the most tokens an image can have is the stock model, run once as "none"."""

    def stock(b):
        return isinstance(b, int) and b >= tokens_per_image

    grid = [Setting("none", None)] if "none" in methods or any(stock(b) for b in budgets) else []
    for method in methods:
        if method == "none":
            continue
        if method not in tokencarve.METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        grid += [Setting(method, b) for b in budgets if not stock(b)]
    return grid


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
        self.tokens_per_image = tokencarve.max_tokens_per_image(engine.model.config)  # 576 for LLaVA-1.5
        engine.model.tokencarve.record_hidden = True  # each image's rows entering layer K, for its spectrum

    @torch.inference_mode()
    def answer(self, questions: list[Question], setting: Setting) -> tuple[list[str], list[dict]]:
        """Greedy answers to one batch, and the spectrum of each image's visual rows entering layer K."""
        images = [q.image for q in questions]  # decoded per batch
        captions = self.engine.caption(images, [q.prompt for q in questions], keep=setting.keep, method=setting.method)
        # the prefill's figures: generate() keeps them on the cache note after the decode steps
        carves = self.engine.model.tokencarve.last_stats.images
        spectra = [dict(spectrum(carve.hidden), visual_tokens=int(carve.hidden.shape[0])) for carve in carves]
        return [c.caption for c in captions], spectra

    def run(self, questions: list[Question], setting: Setting, progress=None) -> dict:
        """Predictions, scores and mean spectrum figures of one setting."""
        records, spectra = [], []
        for start in range(0, len(questions), self.batch_size):
            batch = questions[start : start + self.batch_size]
            texts, batch_spectra = self.answer(batch, setting)
            spectra += batch_spectra
            records += [
                {"question_id": q.question_id, "task": q.task, "prompt": q.prompt, "answer": q.answer, "prediction": t}
                for q, t in zip(batch, texts)
            ]
            if progress is not None:
                progress.update(len(batch))
        summary = summarize(records)
        summary["information"] = {
            key: sum(s[key] for s in spectra) / len(spectra)
            for key in ("effective_rank", "nuclear_norm", "visual_tokens")
        }
        return {
            "setting": {"method": setting.method, "keep": setting.keep},
            "summary": summary,
            "records": records,
            "spectra": spectra,
        }
