"""Run one model over a question set under every (method, budget) setting, through the adapter.

Every setting uses the same model, prompts (the processor's chat template), batches, greedy
decoding and token counting; only the adapter's config changes between settings (`reconfigure`),
so baselines and TokenCarve cut at the same layer with the same RoPE and KV-cache handling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import tokencarve
from tokencarve import CarveConfig
from tokencarve.loading import chat_prompt

from .questions import Question
from .scoring import summarize

METHODS = ("none", *tokencarve.METHODS)  # "none": the stock model
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
    """Holds a TokenCarve-patched model and answers question batches under any setting."""

    def __init__(self, model, processor, layer: int = 2, batch_size: int = 16, max_new_tokens: int = 48, seed: int = 0):
        self.model, self.processor = model, processor
        self.layer, self.batch_size, self.max_new_tokens, self.seed = layer, batch_size, max_new_tokens, seed
        self.tokens_per_image = tokencarve.max_tokens_per_image(model.config)  # 576 for LLaVA-1.5
        if not tokencarve.is_applied(model):
            tokencarve.apply(model, CarveConfig(keep=None, layer=layer))
        model.tokencarve.record_hidden = True
        processor.tokenizer.padding_side = "left"  # what generate() needs

    def configure(self, setting: Setting) -> None:
        method = "tokencarve" if setting.method == "none" else setting.method
        keep = None if setting.method == "none" else setting.keep
        self.model.tokencarve.reconfigure(CarveConfig(keep=keep, layer=self.layer, mode=method, seed=self.seed))

    @torch.inference_mode()
    def answer(self, questions: list[Question]) -> tuple[list[str], list[dict]]:
        """Greedy answers to one batch, and the spectrum of each image's visual rows entering layer K."""
        prompts = [chat_prompt(self.processor, q.prompt) for q in questions]
        images = [q.image for q in questions]
        inputs = self.processor(images=images, text=prompts, return_tensors="pt", padding=True).to(self.model.device)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        texts = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        # the prefill's figures: generate() keeps them on the cache note after the decode steps
        carves = self.model.tokencarve.last_stats.images
        spectra = [dict(spectrum(carve.hidden), visual_tokens=int(carve.hidden.shape[0])) for carve in carves]
        return [t.strip() for t in texts], spectra

    def run(self, questions: list[Question], setting: Setting, progress=None) -> dict:
        """Predictions, scores and mean spectrum figures of one setting."""
        self.configure(setting)
        records, spectra = [], []
        for start in range(0, len(questions), self.batch_size):
            batch = questions[start : start + self.batch_size]
            texts, batch_spectra = self.answer(batch)
            spectra += batch_spectra
            records += [{"question_id": q.question_id, "task": q.task, "prompt": q.prompt, "answer": q.answer,
                         "prediction": t} for q, t in zip(batch, texts)]
            if progress is not None:
                progress.update(len(batch))
        summary = summarize(records)
        summary["information"] = {key: sum(s[key] for s in spectra) / len(spectra)
                                  for key in ("effective_rank", "nuclear_norm", "visual_tokens")}
        return {"setting": {"method": setting.method, "keep": setting.keep}, "summary": summary, "records": records,
                "spectra": spectra}
