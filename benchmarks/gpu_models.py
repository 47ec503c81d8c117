"""The architectures `bench_gpu.py` measures (`--arch`): a model built from its config with random
weights (speed does not depend on the values; with no eos every row generates exactly what it is
asked) and prompts of its own token geometry for any row index.

    llava-1.5    LLaVA-1.5-7B (tokencarve.testing.llava15_config): 60 text + 576 visual tokens
    qwen2.5-vl   Qwen2.5-VL-7B (tokencarve.testing.qwen25vl_config): 60 text + one 1008 x 1008 px
                 image at native resolution, 72 x 72 patches of 14 px merged 2 x 2 into 1,296 tokens,
                 3-D (mRoPE) positions, its windowed ViT
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

from tokencarve.testing import LLAVA15_IMAGE_TOKEN, QWEN25VL_IMAGE_TOKEN, llava15_config, qwen25vl_config

TEXT_TOKENS = 60  # a system prompt + a short question
QWEN_SIDE = 1008  # px: 72 x 72 patches of 14, 36 x 36 = 1,296 tokens after the 2 x 2 merger


class Prompts:
    """Model inputs for any row index: `count` distinct random rows on the device, reused cyclically
    (their values do not change the speed). Text, then the image's placeholders after 35 text tokens."""

    def __init__(self, count: int, visual_tokens: int, image_token: int, device: str):
        g = torch.Generator().manual_seed(0)
        text = torch.randint(3, 30000, (count, TEXT_TOKENS), generator=g)
        image = torch.full((count, visual_tokens), image_token)
        self.ids = torch.cat([text[:, :35], image, text[:, 35:]], 1).to(device)
        self.generator = g

    def index(self, rows) -> torch.Tensor:
        return torch.tensor([row % len(self.ids) for row in rows], device=self.ids.device)


class LlavaPrompts(Prompts):
    def __init__(self, count: int, device: str, dtype: torch.dtype):
        super().__init__(count, 576, LLAVA15_IMAGE_TOKEN, device)
        self.pixels = torch.randn(count, 3, 336, 336, generator=self.generator).to(device, dtype)

    def take(self, rows) -> dict:
        index = self.index(rows)
        ids = self.ids[index]
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=self.pixels[index])


class QwenPrompts(Prompts):
    """Qwen2.5-VL: pixel values are the image's flattened patches ([t x h x w, 3 x 2 x 14 x 14]), its grid
    goes with them, and `mm_token_type_ids` marks the placeholders for the model's 3-D positions."""

    def __init__(self, count: int, device: str, dtype: torch.dtype):
        grid = QWEN_SIDE // 14
        super().__init__(count, grid * grid // 4, QWEN25VL_IMAGE_TOKEN, device)
        self.grid = torch.tensor([[1, grid, grid]], device=device)
        self.pixels = torch.randn(count, grid * grid, 3 * 2 * 14 * 14, generator=self.generator).to(device, dtype)

    def take(self, rows) -> dict:
        index = self.index(rows)
        ids = self.ids[index]
        return dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=(ids == QWEN25VL_IMAGE_TOKEN).int(),
            pixel_values=self.pixels[index].flatten(0, 1),
            image_grid_thw=self.grid.expand(len(index), -1),
        )


@dataclass(frozen=True)
class Architecture:
    name: str  # as the report names it
    visual_tokens: int  # per image (per prompt: one image each)
    config: Callable[[str], object]  # scale ("7b" | "tiny") -> the model's config
    model_class: type
    prompts: Callable[[int, str, torch.dtype], Prompts]  # (count, device, dtype)

    def build(self, scale: str, device: str, dtype: torch.dtype):
        with torch.device(device):
            model = self.model_class._from_config(self.config(scale), dtype=dtype)
        return model.eval()


ARCHITECTURES = {
    "llava-1.5": Architecture("LLaVA-1.5", 576, llava15_config, LlavaForConditionalGeneration, LlavaPrompts),
    "qwen2.5-vl": Architecture(
        "Qwen2.5-VL", (QWEN_SIDE // 28) ** 2, qwen25vl_config, Qwen2_5_VLForConditionalGeneration, QwenPrompts
    ),
}
