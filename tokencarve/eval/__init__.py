"""Evaluation harness: accuracy retention across token budgets and methods, under one protocol.

    python -m tokencarve.eval --model models/carve-tiny --data data/sample --out results/eval

See docs/EVALUATION.md for the protocol and the results.
"""

from .questions import Question, read_llava_jsonl, read_parquet
from .runner import BUDGETS, METHODS, Evaluator, Setting, settings, spectrum
from .scoring import correct, exact_match, normalize, read_yes_no, summarize, yes_no_metrics

__all__ = [
    "BUDGETS",
    "METHODS",
    "Evaluator",
    "Question",
    "Setting",
    "correct",
    "exact_match",
    "normalize",
    "read_llava_jsonl",
    "read_parquet",
    "read_yes_no",
    "settings",
    "spectrum",
    "summarize",
    "yes_no_metrics",
]
