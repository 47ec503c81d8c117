"""Question sets the harness reads: our generated Parquet corpora and LLaVA's JSONL question files.

Parquet (carve_tiny.data's format): columns id, image (encoded bytes), prompt, answer, task.

LLaVA JSONL (what LLaVA's model_vqa_loader / eval scripts use): a question file with one
{"question_id", "image", "text", "category"?} per line, images under --image-folder, and an
annotation file with {"question_id", "answer" | "label" | "answers"} per line ("label" is POPE's
name for it; for a list of answers the first is the reference).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image


@dataclass
class Question:
    question_id: str
    source: bytes | Path  # the encoded image or its file: decoded when a batch needs it, not up front
    prompt: str
    answer: str
    task: str

    @property
    def image(self) -> Image.Image:
        return _open_rgb(self.source)


def _open_rgb(data_or_path) -> Image.Image:
    image = Image.open(io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path)
    return image.convert("RGB")


def read_parquet(path: str | Path, limit: int | None = None) -> list[Question]:
    """Every row of a Parquet file or of the *.parquet files in a folder (sorted), up to `limit`."""
    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no Parquet files at {path}")
    questions = []
    for file in files:
        table = pq.read_table(file, columns=["id", "image", "prompt", "answer", "task"])
        for row in table.to_pylist():
            questions.append(Question(str(row["id"]), row["image"], row["prompt"], row["answer"], row["task"]))
            if limit is not None and len(questions) >= limit:
                return questions
    return questions


def _jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_llava_jsonl(
    questions_file: str | Path,
    annotations_file: str | Path,
    image_folder: str | Path,
    task: str | None = None,
    limit: int | None = None,
) -> list[Question]:
    """LLaVA-style question file + annotation file; the task is `task`, else each line's "category",
    else "vqa"."""
    answers = {}
    for line in _jsonl(annotations_file):
        reference = line.get("answer", line.get("label", line.get("answers")))
        if isinstance(reference, list):
            reference = reference[0]
        if reference is None:
            raise ValueError(f"annotation for question {line.get('question_id')!r} has no answer, label or answers")
        answers[str(line["question_id"])] = str(reference)
    questions = []
    for line in _jsonl(questions_file)[:limit]:
        qid = str(line["question_id"])
        if qid not in answers:
            raise ValueError(f"question {qid!r} has no answer in {annotations_file}")
        questions.append(
            Question(
                qid,
                Path(image_folder) / line["image"],
                line["text"],
                answers[qid],
                task or line.get("category") or "vqa",
            )
        )
    return questions
