"""Prompts, batches and a saved tiny random LLaVA for the adapter and baseline tests (fixtures: conftest.py)."""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration

from tokencarve.testing import IMAGE_TOKEN, PAD, tiny_llava

TOKENS_PER_IMAGE = 576  # (336 / 14) ** 2
CUT = 2  # the adapter tests cut before decoder layer 2 (of 4)


def save_tiny_llava(path, seed: int = 0) -> None:
    tiny_llava(seed).save_pretrained(path)


def load(path, attn_implementation: str = "sdpa") -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn_implementation).eval()


def prompt(text_before: int, text_after: int, images: int = 1, seed: int = 0) -> list[int]:
    """Token ids: text, `images` runs of 576 image tokens (separated by a text token), text."""
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(3, IMAGE_TOKEN, (n,), generator=g).tolist()

    ids = text(text_before)
    for i in range(images):
        ids += [IMAGE_TOKEN] * TOKENS_PER_IMAGE + (text(1) if i < images - 1 else [])
    return ids + text(text_after)


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, prompts))
    ids = torch.full((len(prompts), length), PAD, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, length - len(p) :] = torch.tensor(p)
        mask[row, length - len(p) :] = 1
    return ids, mask


def pixels(num_images: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_images, 3, 336, 336, generator=torch.Generator().manual_seed(seed))


# Three prompts of different lengths, left-padded into one batch.
PROMPTS = [prompt(5, 9, seed=1), prompt(17, 3, seed=2), prompt(2, 14, seed=3)]


def batch(prompts=PROMPTS, seed=0):
    ids, mask = left_padded(prompts)
    images = sum(p.count(IMAGE_TOKEN) for p in prompts) // TOKENS_PER_IMAGE
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(images, seed))


def generate(model, inputs, steps=12, **kwargs):
    """Generated tokens [B, steps] and the raw logits of every step [B, steps, V] (greedy by default)."""
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, return_dict_in_generate=True, output_logits=True, **kwargs)
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, 1)


def single(inputs, row):
    """Row `row` of a left-padded batch, unpadded, with its own image."""
    real = inputs["attention_mask"][row].bool()
    return dict(
        input_ids=inputs["input_ids"][row, real][None],
        attention_mask=torch.ones(1, int(real.sum()), dtype=torch.long),
        pixel_values=inputs["pixel_values"][row : row + 1],
    )
