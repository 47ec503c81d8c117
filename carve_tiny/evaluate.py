"""Accuracy of a model on fresh generated scenes, per task, with blank- and shuffled-image controls.

    python -m carve_tiny.evaluate --model models/carve-tiny --seed 1234 --per-task 50

"blank" replaces every image with an empty canvas, "shuffled" gives each question another row's
image: a model that really looks falls to near chance on both.
"""

from __future__ import annotations

import argparse
import json
import random
import re

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from .model import TEMPLATE
from .scenes import SIZE, TASKS, example

CONTROLS = ("vanilla", "blank", "shuffled")


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .")


def score(prediction: str, answer: str, task: str | None = None) -> bool:
    """Exact match after normalisation (case, surrounding spaces and full stops, repeated spaces)."""
    return normalize(prediction) == normalize(answer)


def question_set(seed: int, per_task: int) -> list[dict]:
    rng = random.Random(seed)
    return [dict(zip(("image", "scene", "task", "prompt", "answer"), example(rng, task)))
            for task in TASKS for _ in range(per_task)]


@torch.inference_mode()
def answer_all(model, processor, images, prompts, batch_size: int = 16, max_new_tokens: int = 48) -> list[str]:
    processor.tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(images), batch_size):
        texts = [TEMPLATE.format(prompt=p) for p in prompts[start : start + batch_size]]
        inputs = processor(images=images[start : start + batch_size], text=texts, return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def evaluate(model, processor, questions: list[dict], control: str = "vanilla", batch_size: int = 16) -> dict:
    images = [q["image"] for q in questions]
    if control == "blank":
        images = [Image.new("RGB", (SIZE, SIZE), (245, 245, 245))] * len(images)
    elif control == "shuffled":
        images = images[1:] + images[:1]  # each question sees the next row's image (another task's scene)
    predictions = answer_all(model, processor, images, [q["prompt"] for q in questions], batch_size)
    per_task: dict[str, list[bool]] = {}
    for q, prediction in zip(questions, predictions):
        per_task.setdefault(q["task"], []).append(score(prediction, q["answer"], q["task"]))
    accuracy = {task: sum(hits) / len(hits) for task, hits in per_task.items()}
    scored = [hit for hits in per_task.values() for hit in hits]
    accuracy["overall"] = sum(scored) / len(scored)
    accuracy["overall_without_caption"] = (
        sum(h for t, hits in per_task.items() if t != "caption" for h in hits)
        / sum(len(hits) for t, hits in per_task.items() if t != "caption")
    )
    return accuracy


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/carve-tiny")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--per-task", type=int, default=50)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    model = LlavaForConditionalGeneration.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    questions = question_set(args.seed, args.per_task)
    results = {control: evaluate(model, processor, questions, control) for control in CONTROLS}
    print("| task | " + " | ".join(CONTROLS) + " |\n|---|---|---|---|")
    for task in [*TASKS, "overall", "overall_without_caption"]:
        print(f"| {task} | " + " | ".join(f"{100 * results[c][task]:.1f} %" for c in CONTROLS) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
