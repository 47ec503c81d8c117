"""Accuracy of a model on fresh generated scenes, per task, with blank- and shuffled-image controls.

    python -m carve_tiny.evaluate --model models/carve-tiny --seed 1234 --per-task 100
    python -m carve_tiny.evaluate --model models/carve-tiny-hard --scenes hard --seed 1234 --per-task 100
    python -m carve_tiny.evaluate --model models/carve-tiny-qwen --scenes hard --sizes 224-448 --seed 1234 --per-task 100

Questions come from a seed the model never trained on. Answers are generated greedily through the
production engine (`tokencarve.engine.CaptionEngine`, the stock model: the batch job's preprocessing,
prompt and batched generate) and scored by exact match
after normalisation (tokencarve.eval.scoring, the harness's rules). Controls: "blank" gives every
question an empty canvas, "shuffled" gives every question the image of another question (half the
set further on, so another task's scene). A model that really looks falls to about the "prior" column on both: the accuracy of always
answering the task's most common answer.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter

import torch
from PIL import Image

from tokencarve import load_llava
from tokencarve.engine import CaptionEngine, EngineConfig
from tokencarve.eval.scoring import normalize, summarize

from .data import size_rng
from .scenes import TASKS, VARIANTS, draw_size, example, parse_sizes

CONTROLS = ("vanilla", "blank", "shuffled")


def question_set(seed: int, per_task: int, scenes: str = "simple", sizes: tuple[int, int] | None = None) -> list[dict]:
    """`per_task` fresh questions of every task (task-major order), each with its own scene of the
    `scenes` variant; existence questions alternate yes / no. `sizes` (low, high): native-size images
    as `carve_tiny.data --sizes` draws them (their own stream: the questions are those without sizes)."""
    rng, sizing = random.Random(seed), size_rng(seed)
    keys = ("image", "scene", "task", "prompt", "answer")
    return [
        dict(
            zip(
                keys,
                example(
                    rng,
                    task,
                    exist_yes=i % 2 == 0,
                    variant=scenes,
                    size=draw_size(sizing, sizes) if sizes else None,
                ),
            )
        )
        for task in TASKS
        for i in range(per_task)
    ]


# a hard scene's caption (9 objects) is ~55 tokens
def generate_answers(model, processor, images, prompts, batch_size: int = 16, max_new_tokens: int = 64) -> list[str]:
    """Greedy answers of the stock model (a loaded or just-trained one), through the engine in batches."""
    config = EngineConfig(model=model.config.name_or_path or "carve-tiny", method="none", max_new_tokens=max_new_tokens)
    engine = CaptionEngine(config, model=model, processor=processor)
    try:
        return [
            c.caption
            for start in range(0, len(images), batch_size)
            for c in engine.caption(images[start : start + batch_size], prompts[start : start + batch_size])
        ]
    finally:
        engine.close()  # the caller's model, as it was


def control_images(questions: list[dict], control: str) -> list[Image.Image]:
    images = [q["image"] for q in questions]
    if control == "blank":
        return [Image.new("RGB", image.size, (240, 240, 240)) for image in images]  # each question's size
    if control == "shuffled":
        half = len(images) // 2
        return images[half:] + images[:half]
    if control == "vanilla":
        return images
    raise ValueError(f"unknown control {control!r}")


def accuracy(questions: list[dict], predictions: list[str]) -> dict[str, float]:
    """Per task and overall, by the harness's `summarize`, plus the overall without captions."""
    records = [{"task": q["task"], "prediction": p, "answer": q["answer"]} for q, p in zip(questions, predictions)]
    summary = summarize(records)
    result = {**summary["tasks"], "overall": summary["overall"]}
    result["overall_without_caption"] = summarize([r for r in records if r["task"] != "caption"])["overall"]
    return result


def prior(questions: list[dict]) -> dict[str, float]:
    """Accuracy of always giving the task's most common answer (a blind guesser's best)."""
    majority = {}
    for task in {q["task"] for q in questions}:
        majority[task] = Counter(normalize(q["answer"]) for q in questions if q["task"] == task).most_common(1)[0][0]
    return accuracy(questions, [majority[q["task"]] for q in questions])


def evaluate(model, processor, questions: list[dict], control: str = "vanilla", batch_size: int = 16) -> dict:
    predictions = generate_answers(
        model, processor, control_images(questions, control), [q["prompt"] for q in questions], batch_size
    )
    return accuracy(questions, predictions)


def table(results: dict[str, dict[str, float]]) -> str:
    columns = list(results)
    lines = ["| task | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for task in [*TASKS, "overall", "overall_without_caption"]:
        lines.append(f"| {task} | " + " | ".join(f"{100 * results[c][task]:.1f} %" for c in columns) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/carve-tiny")
    p.add_argument("--seed", type=int, default=1234, help="question seed (training uses 0, the sample corpus 7)")
    p.add_argument("--per-task", type=int, default=100)
    p.add_argument("--scenes", choices=sorted(VARIANTS), default="simple", help="scene variant of the questions")
    p.add_argument("--sizes", type=parse_sizes, default=None, help="native-size images, LOW-HIGH px (carve-tiny-qwen)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--controls", default=",".join(CONTROLS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = load_llava(args.model, device="cpu", dtype="float32")
    questions = question_set(args.seed, args.per_task, args.scenes, args.sizes)
    results = {}
    for control in args.controls.split(","):
        started = time.time()
        results[control] = evaluate(model, processor, questions, control, args.batch_size)
        print(
            f"{control}: overall {100 * results[control]['overall']:.1f} % ({time.time() - started:.0f} s)", flush=True
        )
    results["prior"] = prior(questions)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "seed": args.seed,
                    "per_task": args.per_task,
                    "scenes": args.scenes,
                    "sizes": list(args.sizes) if args.sizes else None,
                    "results": results,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
