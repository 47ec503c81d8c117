"""Train carve-tiny from scratch on generated scenes; reproducible from a seed, on a CPU.

    python -m carve_tiny.train --out models/carve-tiny --seed 0 --max-minutes 30

Each training sequence is one image followed by 1-4 question/answer turns about it (LLaVA's
multi-turn format; the first turn is exactly the single-turn prompt used at inference), so the
576-token image is encoded once for several answers. Loss only on answer tokens and </s>.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from .model import BOS, EOS, IMAGE, PAD, build_untrained, pixel_values
from .scenes import TASKS, question, random_scene, render

IGNORE = -100


def encode_words(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def training_sequence(tokenizer, rng: random.Random, max_turns: int):
    """(image, input ids, labels) for one scene with 1..max_turns questions."""
    scene = random_scene(rng)
    ids, labels = [BOS] + encode_words(tokenizer, "USER:"), [IGNORE, IGNORE, IGNORE]
    ids += [IMAGE] * 576
    labels += [IGNORE] * 576
    for turn in range(rng.randint(1, max_turns)):
        for _ in range(10):
            try:
                prompt, answer = question(scene, rng.choice(TASKS), rng)
                break
            except LookupError:
                continue
        else:
            break
        head = encode_words(tokenizer, ("" if turn == 0 else "USER: ") + prompt + " ASSISTANT:")
        answer_ids = encode_words(tokenizer, answer) + [EOS]
        ids += head + answer_ids
        labels += [IGNORE] * len(head) + answer_ids
    return render(scene, rng), ids, labels


def batch(tokenizer, rng: random.Random, size: int, max_turns: int):
    samples = [training_sequence(tokenizer, rng, max_turns) for _ in range(size)]
    length = max(len(ids) for _, ids, _ in samples)
    input_ids = torch.full((size, length), PAD)
    labels = torch.full((size, length), IGNORE)
    mask = torch.zeros(size, length, dtype=torch.long)
    for row, (_, ids, lab) in enumerate(samples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels,
                pixel_values=pixel_values([image for image, _, _ in samples]))


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/carve-tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--max-minutes", type=float, default=40.0, help="stop early (and still save) after this long")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = build_untrained(args.seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = random.Random(args.seed)
    started, step, history = time.time(), 0, []
    for step in range(args.steps):
        if time.time() - started > args.max_minutes * 60:
            print(f"time budget reached after {step} steps")
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        inputs = {k: v.to(device) for k, v in batch(processor.tokenizer, rng, args.batch_size, args.max_turns).items()}
        loss = model(**inputs).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append(loss.item())
        if step % 50 == 0:
            recent = sum(history[-50:]) / len(history[-50:])
            print(f"step {step:5d}  loss {recent:.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                  f"{time.time() - started:7.1f}s", flush=True)
    else:
        step = args.steps
    minutes = (time.time() - started) / 60
    out = Path(args.out)
    model.eval().to("cpu").save_pretrained(out)
    processor.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    (out / "training.json").write_text(json.dumps({
        "seed": args.seed, "steps": step, "batch_size": args.batch_size, "max_turns": args.max_turns,
        "peak_lr": args.lr, "warmup": args.warmup, "minutes": round(minutes, 1), "device": device,
        "threads": args.threads, "final_loss": round(sum(history[-50:]) / max(1, len(history[-50:])), 4),
    }, indent=2))
    print(f"saved to {out} after {step} steps, {minutes:.1f} min")


if __name__ == "__main__":
    main()
