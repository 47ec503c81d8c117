"""python -m tokencarve.eval: score a LLaVA model under every (method, budget) setting.

    python -m tokencarve.eval --model models/carve-tiny --data data/sample --out results/eval
    python -m tokencarve.eval --model llava-hf/llava-1.5-7b-hf --questions pope_random.jsonl \\
        --annotations pope_random_labels.jsonl --image-folder val2014 --task pope --out results/pope

Writes results.json (scores, information figures, run details), predictions.jsonl (LLaVA's
answers-file format, one line per question and setting), table.md, accuracy.png, information.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from ..budgets import split_budgets
from ..engine import CaptionEngine, parse_budget
from ..settings import add_engine_arguments, engine_config_from_args
from . import report
from .questions import read_llava_jsonl, read_parquet
from .runner import BUDGETS, METHODS, Evaluator, settings


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # every engine setting but the method and budget, which the harness sweeps (--methods, --budgets)
    add_engine_arguments(p, model_default="models/carve-tiny", exclude=("keep", "method"))
    source = p.add_argument_group("questions: a Parquet corpus, or LLaVA JSONL files")
    source.add_argument("--data", help="Parquet file or folder (id, image, prompt, answer, task)")
    source.add_argument("--questions", help="LLaVA question file (question_id, image, text, category)")
    source.add_argument("--annotations", help="answers per question_id (answer / label / answers)")
    source.add_argument("--image-folder", help="folder the question file's image paths are relative to")
    source.add_argument("--task", help="task name for every JSONL question (default: its category)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument(
        "--budgets",
        default=",".join(map(str, BUDGETS)),
        help="visual tokens per image (128), fractions of each image's tokens (0.1), or adaptive budgets "
        "(auto:64, auto:32,min=8: calibrated on the first --calibration-rows questions' images)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", default="results/eval")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if bool(args.data) == bool(args.questions):
        p.error("give either --data or --questions (with --annotations and --image-folder)")
    if args.questions and not (args.annotations and args.image_folder):
        p.error("--questions needs --annotations and --image-folder")
    return args


def main(argv=None) -> dict:
    from tqdm.auto import tqdm

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data:
        questions = read_parquet(args.data, args.limit)
    else:
        questions = read_llava_jsonl(args.questions, args.annotations, args.image_folder, args.task, args.limit)
    engine = CaptionEngine(engine_config_from_args(args, method="none"))
    evaluator = Evaluator(engine, args.batch_size)
    grid = settings(
        args.methods.split(","), [parse_budget(b) for b in split_budgets(args.budgets)], evaluator.tokens_per_image
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    started, results = time.time(), []
    with tqdm(total=len(grid) * len(questions), desc="evaluating", unit="q") as progress:
        for setting in grid:
            progress.set_postfix_str(setting.name)
            results.append(evaluator.run(questions, setting, progress))
    seconds = time.time() - started

    with open(out / "predictions.jsonl", "w") as f:
        for result in results:
            f.writelines(
                json.dumps(
                    {
                        "question_id": record["question_id"],
                        "prompt": record["prompt"],
                        "text": record["prediction"],
                        "model_id": args.model,
                        "metadata": {
                            **result["setting"],
                            "task": record["task"],
                            "answer": record["answer"],
                            "visual_tokens_kept": record["visual_tokens_kept"],
                        },
                    }
                )
                + "\n"
                for record in result["records"]
            )
    run = {
        "model": args.model,
        "data": args.data or args.questions,
        "questions": len(questions),
        "layer": args.layer,
        "positions": args.positions,
        "calibration_rows": args.calibration_rows,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "device": str(engine.model.device),
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "seconds": round(seconds, 1),
    }
    (out / "results.json").write_text(
        json.dumps(
            {"run": run, "results": [{"setting": r["setting"], "summary": r["summary"]} for r in results]}, indent=2
        )
        + "\n"
    )
    tables = (
        f"## Overall accuracy (%)\n\n{report.overall_table(results)}\n\n## Per task\n\n{report.task_table(results)}\n"
        f"\n## Retention\n\n{report.retention_table(results)}\n"
    )
    (out / "table.md").write_text(tables)
    if not args.no_plots:
        report.accuracy_plot(results, out / "accuracy.png")
        report.information_plot(results, out / "information.png")
    print(tables)
    print(f"{len(grid)} settings x {len(questions)} questions in {seconds:.0f} s; written to {out}")
    return {"run": run, "results": results}


if __name__ == "__main__":
    main()
