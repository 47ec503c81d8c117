"""The Qwen-VL processors' image-and-text path, for machines without torchvision.

transformers' Qwen2-VL / Qwen2.5-VL / Qwen3-VL processors always build a video processor, and that
needs torchvision; without it the processor cannot be constructed at all, although captioning images
never touches video. `ImageTextProcessor` does what those processors do for images and text, from the
checkpoint's own files (its tokenizer, its image processor, its chat template):

    1. the image processor resizes each image to its native grid (within min / max pixels) and gives
       `pixel_values` (flattened patches) and `image_grid_thw` per image;
    2. each image placeholder of the text (`<|image_pad|>`) becomes t x h x w / merge^2 of them, image
       by image in order (what the model's masked_scatter fills);
    3. the tokenizer pads the batch (on the left, as the engine sets it), and `mm_token_type_ids`
       marks image (1) and video (2) placeholders, which the model needs for its 3-D positions.

`tokencarve.loading.load_processor` picks it only where the real processor cannot be built.
"""

from __future__ import annotations

import torch
from transformers import BatchFeature

# model class -> the processor class its checkpoints name (processor_config.json)
PROCESSOR_CLASSES = {
    "Qwen2VLForConditionalGeneration": "Qwen2VLProcessor",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2_5_VLProcessor",
    "Qwen3VLForConditionalGeneration": "Qwen3VLProcessor",
}


class ImageTextProcessor:
    """A Qwen-VL processor for images and text only (see the module doc); same outputs, no torchvision."""

    def __init__(self, tokenizer, image_processor, chat_template: str | None = None):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)

    @classmethod
    def from_pretrained(cls, path: str, revision: str | None = None) -> ImageTextProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer
        from transformers.utils import cached_file

        template_file = cached_file(
            path, "chat_template.jinja", revision=revision, _raise_exceptions_for_missing_entries=False
        )
        template = open(template_file, encoding="utf-8").read() if template_file else None
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        return cls(tokenizer, AutoImageProcessor.from_pretrained(path, revision=revision), template)

    def __call__(self, images=None, text=None, return_tensors="pt", padding=False, **kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        image_inputs = {}
        if images:
            image_inputs = dict(self.image_processor(images=images, return_tensors=return_tensors))
            merge = self.image_processor.merge_size**2
            counts = iter((image_inputs["image_grid_thw"].prod(-1) // merge).tolist())
            texts = [self._expand(t, counts) for t in texts]
            if next(counts, None) is not None:
                raise ValueError("more images were given than the prompts hold image placeholders")
        encoded = dict(self.tokenizer(texts, return_tensors=return_tensors, padding=padding, **kwargs))
        ids = encoded["input_ids"]
        types = torch.zeros_like(ids)
        types[ids == self.image_token_id] = 1
        types[ids == self.video_token_id] = 2
        return BatchFeature({**encoded, "mm_token_type_ids": types, **image_inputs})

    def _expand(self, text: str, counts) -> str:
        pieces = text.split(self.image_token)
        expanded = [pieces[0]]
        for piece in pieces[1:]:
            try:
                count = next(counts)
            except StopIteration:
                raise ValueError("the prompts hold more image placeholders than images were given") from None
            expanded += [self.image_token * count, piece]
        return "".join(expanded)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kwargs):
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=tokenize,
            **kwargs,
        )

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
