"""Tiny random LLaVA-NeXT / OneVision models and batches of images of different sizes, for test_family."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration

from tokencarve.testing import (
    IMAGE_TOKEN,
    PAD,
    image_token_counts,
    save_tiny_llava_next_with_processor,
    save_tiny_llava_onevision_with_processor,
)

FAMILIES = ("next", "onevision")
SAVE = {"next": save_tiny_llava_next_with_processor, "onevision": save_tiny_llava_onevision_with_processor}
MODEL_CLASS = {"next": LlavaNextForConditionalGeneration, "onevision": LlavaOnevisionForConditionalGeneration}


def load(path, family: str, attn_implementation: str = "sdpa"):
    return MODEL_CLASS[family].from_pretrained(path, attn_implementation=attn_implementation).eval()


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@dataclass
class Prompt:
    """Text, then its images (each followed by `gap` text tokens, 0: images back to back), then text."""

    before: int
    sizes: list[tuple[int, int]]  # (width, height) of each image
    after: int
    gap: int = 1
    seed: int = 0


def image_inputs(image_processor, family: str, prompts: list[Prompt]) -> dict:
    """pixel_values, image_sizes (and OneVision's batch_num_images) for the images of `prompts`."""
    images = [[picture(w, h, seed=p.seed * 10 + i) for i, (w, h) in enumerate(p.sizes)] for p in prompts]
    if not any(images):
        return {}
    if family == "onevision":  # nested per prompt: it tiles only a prompt's single image
        return dict(image_processor([i for i in images if i], return_tensors="pt"))
    return dict(image_processor([image for row in images for image in row], return_tensors="pt"))


def prompt_ids(p: Prompt, counts: list[int]) -> list[int]:
    g = torch.Generator().manual_seed(p.seed)

    def text(n):
        return torch.randint(3, IMAGE_TOKEN, (n,), generator=g).tolist()

    ids = text(p.before)
    for i, count in enumerate(counts):
        ids += [IMAGE_TOKEN] * count + (text(p.gap) if i < len(counts) - 1 else [])
    return ids + text(p.after)


@dataclass
class Batch:
    inputs: dict  # the left-padded batch, ready for model(**inputs) / generate
    ids: list[list[int]]  # each row's unpadded prompt
    rows: list[dict]  # each row alone: input_ids, attention_mask and its own image inputs
    counts: list[list[int]]  # visual tokens of each row's images


def make_batch(model, path, family: str, prompts: list[Prompt]) -> Batch:
    processor = AutoImageProcessor.from_pretrained(path)
    rows, ids, counts = [], [], []
    for p in prompts:
        images = image_inputs(processor, family, [p])
        row_counts = image_token_counts(model, images) if images else []
        row_ids = prompt_ids(p, row_counts)
        mask = torch.ones(1, len(row_ids), dtype=torch.long)
        rows.append(dict(input_ids=torch.tensor([row_ids]), attention_mask=mask, **images))
        ids.append(row_ids)
        counts.append(row_counts)
    length = max(map(len, ids))
    input_ids = torch.full((len(ids), length), PAD, dtype=torch.long)
    mask = torch.zeros(len(ids), length, dtype=torch.long)
    for row, p in enumerate(ids):
        input_ids[row, length - len(p) :] = torch.tensor(p)
        mask[row, length - len(p) :] = 1
    batch_images = image_inputs(processor, family, prompts)
    return Batch(dict(input_ids=input_ids, attention_mask=mask, **batch_images), ids, rows, counts)


def image_kwargs(row: dict) -> dict:
    """A row's image inputs other than pixel_values (for the reference)."""
    return {k: v for k, v in row.items() if k in ("image_sizes", "batch_num_images")}
