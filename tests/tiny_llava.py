"""Prompts and a saved tiny random LLaVA for the adapter tests."""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration

from tokencarve.testing import IMAGE_TOKEN, PAD, tiny_llava

TOKENS_PER_IMAGE = 576  # (336 / 14) ** 2


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
        ids[row, length - len(p):] = torch.tensor(p)
        mask[row, length - len(p):] = 1
    return ids, mask


def pixels(num_images: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_images, 3, 336, 336, generator=torch.Generator().manual_seed(seed))
