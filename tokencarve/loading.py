"""Loading a LLaVA checkpoint for batched generation: one place for the device and dtype defaults.

The evaluation CLI and the pipeline's engine both load through `load_llava`, so "auto" means the same
thing everywhere: the GPU when there is one, bfloat16 on a GPU (LLaVA-1.5's released precision) and
float32 on a CPU (bfloat16 matmuls are slow on most CPUs).
"""

from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(device: str = "auto") -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


LLAVA_15_PROMPT = "USER: <image>\n{question} ASSISTANT:"


def chat_prompt(processor, question: str) -> str:
    """The single-image, single-turn prompt for `question`, by the checkpoint's own chat template
    (LLaVA-1.5's USER / ASSISTANT form for a processor that has none)."""
    if not getattr(processor, "chat_template", None):
        return LLAVA_15_PROMPT.format(question=question)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def load_llava(path: str, device: str = "auto", dtype: str = "auto", revision: str | None = None, **image_size):
    """(model in eval mode on `device`, processor padding on the left) from a local folder or hub id:
    a checkpoint of any family in tokencarve.families (the class read from its config); `revision`: a
    hub id's revision (a commit: the job pins one, tokencarve.settings.resolve_revision), passed to
    every file it reads; `image_size`: see `load_processor`."""
    from transformers import AutoConfig

    from .families import family_for_config

    device = resolve_device(device)
    family = family_for_config(AutoConfig.from_pretrained(path, revision=revision))
    model = family.model_class.from_pretrained(path, revision=revision, dtype=resolve_dtype(dtype, device))
    return model.to(device).eval(), load_processor(path, revision=revision, **image_size)


def load_processor(
    path: str, min_pixels: int | None = None, max_pixels: int | None = None, revision: str | None = None
):
    """The checkpoint's own processor, padding on the left. min_pixels / max_pixels (native-resolution
    families: the Qwen-VL image processors' bounds on an image's resized area; None: the checkpoint's);
    `revision`: a hub id's revision (see `load_llava`).

    The Qwen-VL processors need torchvision for their video half; where it is not installed, the
    image-and-text path is built from the same files (tokencarve.processing.ImageTextProcessor)."""
    from transformers import AutoConfig, AutoProcessor
    from transformers.utils import is_torchvision_available

    from .families import family_for_config
    from .processing import ImageTextProcessor

    family = family_for_config(AutoConfig.from_pretrained(path, revision=revision))
    if family.native_resolution and not is_torchvision_available():
        processor = ImageTextProcessor.from_pretrained(path, revision=revision)
    else:
        processor = AutoProcessor.from_pretrained(path, revision=revision)
    if min_pixels is not None or max_pixels is not None:
        if not family.native_resolution:
            raise ValueError(f"min_pixels / max_pixels apply to native-resolution families, not {family.name}")
        size = dict(processor.image_processor.size)
        size.update({k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v is not None})
        processor.image_processor.size = size
    processor.tokenizer.padding_side = "left"  # batched generate() continues every row from its last token
    return processor
