"""Scoring rules: exact match after normalisation, POPE-style yes/no, and per-task summaries.

A question whose reference answer is "yes" or "no" is scored as a yes/no question: the prediction
is read as LLaVA's POPE script reads it (a "no" or "not" among its first sentence's words means no,
anything else yes), and the task also gets precision / recall / F1 with "yes" as the positive class.
Every other answer is scored by exact match after `normalize`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable


def normalize(text: str) -> str:
    """Lower case, words and numbers only: "Top left." -> "top left", "red circle , blue" -> "red circle blue"."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def exact_match(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


def is_yes_no(answer: str) -> bool:
    return normalize(answer) in ("yes", "no")


def read_yes_no(prediction: str) -> str:
    """ "yes" or "no" as LLaVA's eval_pope.py reads a free-form answer (first sentence only)."""
    words = normalize(prediction.split(".")[0]).split()
    return "no" if "no" in words or "not" in words else "yes"


def correct(prediction: str, answer: str) -> bool:
    if is_yes_no(answer):
        return read_yes_no(prediction) == normalize(answer)
    return exact_match(prediction, answer)


def yes_no_metrics(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """POPE's figures over (prediction, answer) pairs: accuracy, precision, recall, F1, yes ratio."""
    tp = fp = tn = fn = 0
    for prediction, answer in pairs:
        said_yes, is_yes = read_yes_no(prediction) == "yes", normalize(answer) == "yes"
        tp += said_yes and is_yes
        fp += said_yes and not is_yes
        tn += not said_yes and not is_yes
        fn += not said_yes and is_yes
    total = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / total if total else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / total if total else 0.0,
    }


def summarize(records: Iterable[dict]) -> dict:
    """Accuracy per task and overall (the mean over questions), plus yes/no metrics per yes/no task.

    records: dicts with "task", "prediction" and "answer"."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_task[record["task"]].append(record)
    tasks, yes_no, hits_all = {}, {}, []
    for task, rows in sorted(by_task.items()):
        hits = [correct(r["prediction"], r["answer"]) for r in rows]
        tasks[task] = sum(hits) / len(hits)
        hits_all += hits
        if all(is_yes_no(r["answer"]) for r in rows):
            yes_no[task] = yes_no_metrics((r["prediction"], r["answer"]) for r in rows)
    return {
        "overall": sum(hits_all) / len(hits_all) if hits_all else 0.0,
        "tasks": tasks,
        "yes_no": yes_no,
        "questions": len(hits_all),
    }
