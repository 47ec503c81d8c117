"""What differs between the model families TokenCarve supports: one small table, one adapter.

All three families share what the adapter relies on: the decoder stack is a Llama-style
`language_model` one level below the top model, the processor expands every `<image>` into one
placeholder per visual token (all carrying `config.image_token_id` in input_ids: base grid, tiles
and newline tokens alike), and the model writes image i's features into the next N_i placeholders
in row-major order (`inputs_embeds.masked_scatter`). They differ in N_i, the tokens per image:

    LLaVA-1.5   fixed: (image_size / patch_size)^2 (+1 with the "full" strategy); 576
    LLaVA-NeXT  base grid + the unpadded tiles + one newline token per tile row; depends on
                image_sizes (up to 2,928 tokens: 576 + 48 x 48 + 48 at 336 px tiles)
    OneVision   as NeXT, but tiles beyond vision_aspect_ratio's budget are shrunk, and the images
                of a multi-image prompt are not tiled (base grid + one newline); up to 7,371

    Qwen-VL     native resolution: (t x h x w) patches / merge^2, from image_grid_thw (Qwen2-VL,
                Qwen2.5-VL, Qwen3-VL; see below)

N_i is taken from the model's own helpers (`pack_image_features` on a 1-channel stand-in), not
from our own formula, so it is right by construction for whatever the installed transformers does.
`image_spans` then cuts the row-major placeholder positions into one span per image, exactly as
masked_scatter fills them; that also separates consecutive images with no text between them.

The Qwen-VL family has the same shape (a text model one level below, placeholders filled in
row-major order) and three differences the adapter and the decode loop follow from this table:
- positions are 3-D (mRoPE): [3, B, L] (or [4, B, L] from generate(), a 1-D text row first); the
  cut gathers all rows at the kept tokens and rebuilds the shared (cos, sin) from them, and decoding
  continues from max(position) + 1 (`rope_deltas`), not from the prompt's length (`prefill_positions`);
- Qwen3-VL normalises queries and keys (the attention row applies q_norm / k_norm), and adds
  "deepstack" vision features to the visual positions after its first decoder layers; the adapter
  maps those additions onto the kept tokens after a cut that comes before the last of them;
- their processors need torchvision (tokencarve.processing has the image path without it).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.llava_next import modeling_llava_next
from transformers.models.llava_onevision import modeling_llava_onevision


@dataclass(frozen=True)
class Family:
    """What the adapter needs to know about one LLaVA family.

    multimodal:  attribute path from the top model to the module whose forward sees input_ids,
                 pixel_values and image_sizes (and writes the image features into inputs_embeds)
    language:    attribute path to the decoder stack (`.layers`, `.rotary_emb`, `.config`)
    token_counts(multimodal_module, forward_kwargs, image_mask) -> N_i per image of the forward,
                 in row-major order, or None when it cannot be told (then: contiguous runs)
    fixed_tokens(config) -> N when every image has the same count (LLaVA-1.5), else None
    mrope:       3-D rotary positions (Qwen-VL): position_ids [3 or 4, B, L], decode from rope_deltas
    native_resolution: images keep their own size within the image processor's min / max pixels
    """

    name: str
    model_class: type
    token_counts: Callable[[torch.nn.Module, dict, torch.Tensor], list[int] | None]
    fixed_tokens: Callable[[object], int | None]
    multimodal: str = "model"
    language: str = "model.language_model"
    mrope: bool = False
    native_resolution: bool = False

    def multimodal_module(self, model) -> torch.nn.Module:
        return operator.attrgetter(self.multimodal)(model)

    def language_model(self, model) -> torch.nn.Module:
        return operator.attrgetter(self.language)(model)


def tokens_per_image(config) -> int:
    """Visual tokens one LLaVA-1.5 image contributes (576: (336 / 14)^2, CLS dropped). For NeXT and
    OneVision configs this is the base grid only; their images have more tokens, varying by size."""
    vision = config.vision_config
    if getattr(vision, "image_size", None) and getattr(vision, "patch_size", None):
        extra = 1 if config.vision_feature_select_strategy == "full" else 0
        return (vision.image_size // vision.patch_size) ** 2 + extra
    return config.image_seq_length


def max_tokens_per_image(config) -> int:
    """An upper bound on the visual tokens one image can have (what a prompt budget must leave room
    for): LLaVA-1.5's fixed count; for NeXT / OneVision the base grid, the most tiles any grid
    pinpoint gives (OneVision: at most its `anyres_max_<n>` tiles' worth), and a newline per token row."""
    base = tokens_per_image(config)
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    if not pinpoints:
        return base
    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size
    tiles = max((height // tile) * (width // tile) for height, width in pinpoints)
    rows = max(height // tile for height, _ in pinpoints) * side
    ratio = str(getattr(config, "vision_aspect_ratio", "") or "")
    if ratio.startswith("anyres_max_"):
        tiles = min(tiles, int(ratio.rsplit("_", 1)[1]))
    return base + tiles * side * side + rows + 1


def max_image_tokens(config, image_processor) -> int:
    """The most visual tokens one image can have: `max_tokens_per_image`, or for a native-resolution
    family the image processor's largest area (longest_edge pixels) over (patch x merge)^2."""
    if not family_for_config(config).native_resolution:
        return max_tokens_per_image(config)
    side = image_processor.patch_size * image_processor.merge_size
    return image_processor.size["longest_edge"] // (side * side)


def image_placeholder(family: Family, processor) -> str:
    """What stands for an image in a fixed prompt template's text, in this family's own words: LLaVA's
    `<image>` (the processor expands it), Qwen-VL's image pad between its vision start / end tokens."""
    token = getattr(processor, "image_token", None) or "<image>"
    if not family.native_resolution:
        return token
    tokenizer = processor.tokenizer
    start = getattr(tokenizer, "vision_bos_token", None) or "<|vision_start|>"
    end = getattr(tokenizer, "vision_eos_token", None) or "<|vision_end|>"
    return f"{start}{token}{end}"


def family_for_config(config) -> Family:
    """The family of a checkpoint, from its config (before any weights are loaded)."""
    for family in FAMILIES:
        if isinstance(config, family.model_class.config_class):
            return family
    names = ", ".join(f.model_class.config_class.__name__ for f in FAMILIES)
    raise TypeError(f"TokenCarve supports checkpoints with a {names}; got {type(config).__name__}{_why_not(config)}")


# Decoders an in-LLM cut does not fit, by class-name prefix (models and configs), and why.
_REFUSED = {
    "Qwen3_5": "Qwen3.5 interleaves linear-attention (recurrent state) layers with full attention: the "
    "recurrent layers' state cannot drop tokens after the cut",
    "Qwen3VLMoe": "the Qwen3-VL MoE decoders are not supported (only dense Qwen3-VL)",
    "Gemma3": "Gemma 3 alternates sliding-window layers and attends bidirectionally within an image, "
    "which the cut's causal mask and full-length caches do not reproduce",
}


def _why_not(model_or_config) -> str:
    name = type(model_or_config).__name__
    reasons = [why for prefix, why in _REFUSED.items() if name.startswith(prefix)]
    return f" ({reasons[0]})" if reasons else ""


def _fixed_counts(module, kwargs, image_mask: torch.Tensor) -> list[int]:
    """LLaVA-1.5: N tokens per image, whatever the pixels."""
    n = tokens_per_image(module.config)
    per_row = image_mask.sum(1)
    if bool((per_row % n).any()):
        raise ValueError(
            f"image token counts per sample {per_row.tolist()} are not multiples of {n} tokens per image; "
            "was the prompt built by this model's processor?"
        )
    return [n] * (int(per_row.sum()) // n)


def _anyres_counts(module, kwargs, image_mask, *, modeling, tiled, pack) -> list[int] | None:
    """LLaVA-NeXT / OneVision: each image's feature length as the model's own packing makes it."""
    encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
    if encoded is not None:  # features handed in precomputed: their lengths are the counts
        return [len(features) for features in encoded.pooler_output]
    pixel_values, image_sizes = kwargs.get("pixel_values"), kwargs.get("image_sizes")
    if pixel_values is None or image_sizes is None or pixel_values.size(0) == 0:
        return None
    config = module.config
    image_sizes = image_sizes.cpu() if isinstance(image_sizes, torch.Tensor) else torch.as_tensor(image_sizes)
    side = config.vision_config.image_size // config.vision_config.patch_size
    # A tile gives the side x side patch grid (released NeXT / OneVision checkpoints drop CLIP's CLS
    # with "default" or use SigLIP, which has none; the tiling code assumes exactly this grid).
    per_tile = side * side
    stand_ins = []
    for size, is_tiled in zip(image_sizes, tiled(kwargs, len(image_sizes))):
        patches = (
            modeling.image_size_to_num_patches(
                size, grid_pinpoints=config.image_grid_pinpoints, patch_size=config.vision_config.image_size
            )
            if is_tiled
            else 1
        )
        stand_ins.append(torch.zeros(patches, per_tile, 1))  # one channel: only the shapes matter
    _, lengths = pack(module, stand_ins, image_sizes, kwargs)
    return lengths.tolist()


def _strategy(module, kwargs) -> str:
    return kwargs.get("vision_feature_select_strategy") or module.config.vision_feature_select_strategy


def _every_image_tiled(kwargs, num_images: int) -> list[bool]:
    return [True] * num_images


def _onevision_tiled(kwargs, num_images: int) -> list[bool]:
    """OneVision tiles an image only when it is its prompt's single image (batch_num_images)."""
    per_prompt = kwargs.get("batch_num_images")
    if per_prompt is None:
        return [True] * num_images
    return [int(n) == 1 for n in per_prompt for _ in range(int(n))]


def _pack_next(module, stand_ins, image_sizes, kwargs):
    return module.pack_image_features(
        stand_ins, image_sizes, vision_feature_select_strategy=_strategy(module, kwargs), image_newline=torch.zeros(1)
    )


def _pack_onevision(module, stand_ins, image_sizes, kwargs):
    ratio = kwargs.get("vision_aspect_ratio") or module.config.vision_aspect_ratio
    return module.pack_image_features(stand_ins, image_sizes, image_newline=torch.zeros(1), vision_aspect_ratio=ratio)


def _no_fixed_count(config) -> None:
    return None


def _grid_counts(module, kwargs, image_mask) -> list[int] | None:
    """Qwen-VL: t x h x w patches per image (image_grid_thw) merged merge x merge into one token."""
    encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
    if encoded is not None:
        return [len(features) for features in encoded.pooler_output]
    grid = kwargs.get("image_grid_thw")
    if grid is None or len(grid) == 0:
        return None
    merge = module.config.vision_config.spatial_merge_size
    return (torch.as_tensor(grid).prod(-1) // merge**2).tolist()


def text_positions(mask_2d: torch.Tensor) -> torch.Tensor:
    """generate()'s 1-D positions for a left-padded batch: the 2-D mask's cumsum, pads at 0."""
    return (mask_2d.long().cumsum(-1) - 1).masked_fill(mask_2d == 0, 0)


def prefill_positions(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids for the prefill, [B] RoPE position of each row's next token), as generate() makes them.

    1-D families: the mask's cumsum, and the next token at the prompt's (uncompressed) length.
    mRoPE: [4, B, L], the text row and the model's own 3-D rows (get_rope_index), and the next token at
    max(position) + 1 = length + rope_delta, which a carve does not change (kept tokens keep theirs)."""
    mask = inputs["attention_mask"]
    text = text_positions(mask)
    if not family_of(model).mrope:
        return text, mask.sum(1)
    if inputs.get("image_grid_thw") is None and inputs.get("video_grid_thw") is None:
        return text.expand(4, -1, -1), mask.sum(1)  # a text-only prompt: 1-D positions on every row
    spatial, deltas = model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        attention_mask=mask,
    )
    model.model.rope_deltas = deltas  # what the model's own forward would keep for later steps
    return torch.cat([text[None], spatial]), mask.sum(1) + deltas[:, 0]


FAMILIES = (
    Family("llava-1.5", LlavaForConditionalGeneration, _fixed_counts, tokens_per_image),
    Family(
        "llava-next",
        LlavaNextForConditionalGeneration,
        partial(_anyres_counts, modeling=modeling_llava_next, tiled=_every_image_tiled, pack=_pack_next),
        _no_fixed_count,
    ),
    Family(
        "llava-onevision",
        LlavaOnevisionForConditionalGeneration,
        partial(_anyres_counts, modeling=modeling_llava_onevision, tiled=_onevision_tiled, pack=_pack_onevision),
        _no_fixed_count,
    ),
    *(
        Family(name, model_class, _grid_counts, _no_fixed_count, mrope=True, native_resolution=True)
        for name, model_class in (
            ("qwen2-vl", Qwen2VLForConditionalGeneration),
            ("qwen2.5-vl", Qwen2_5_VLForConditionalGeneration),
            ("qwen3-vl", Qwen3VLForConditionalGeneration),
        )
    ),
)


def family_of(model) -> Family:
    for family in FAMILIES:
        if isinstance(model, family.model_class):
            return family
    names = ", ".join(f.model_class.__name__ for f in FAMILIES)
    raise TypeError(f"TokenCarve supports transformers' {names}; got {type(model).__name__}{_why_not(model)}")


@dataclass
class ImageSpans:
    """The visual tokens of every image of a batch, image by image in row-major order."""

    rows: list[int]  # batch row of each image
    positions: list[torch.Tensor]  # [N_i] sequence positions of each image's tokens

    @property
    def counts(self) -> list[int]:
        return [len(p) for p in self.positions]

    def groups(self) -> list[list[int]]:
        """Images of equal token count, for one batched core call each (first-seen order)."""
        by_count: dict[int, list[int]] = {}
        for image, count in enumerate(self.counts):
            by_count.setdefault(count, []).append(image)
        return list(by_count.values())


def image_spans(image_mask: torch.Tensor, counts: list[int] | None) -> ImageSpans:
    """Cut the image-token positions of a [B, L] mask into one span per image.

    With `counts` (N_i per image, row-major), the positions are split exactly as masked_scatter
    fills them. Without (no pixels in this forward), every maximal run of adjacent image tokens
    counts as one image.
    """
    rows, positions = image_mask.nonzero(as_tuple=True)  # row-major
    if counts is None:
        counts = _run_lengths(rows, positions)
    if sum(counts) != len(positions):
        raise ValueError(
            f"the prompts hold {len(positions)} image tokens but the images have {sum(counts)} "
            "features; was the prompt built by this model's processor?"
        )
    sizes = torch.tensor(counts, dtype=torch.long, device=rows.device)
    ends = sizes.cumsum(0)
    first, last = rows[ends - sizes].tolist(), rows[ends - 1].tolist()  # each image's first and last token
    if first != last:
        raise ValueError(
            "an image's tokens span two samples of the batch; was the prompt built by this model's processor?"
        )
    return ImageSpans(first, list(positions.split(counts)))


def _run_lengths(rows: torch.Tensor, positions: torch.Tensor) -> list[int]:
    if len(positions) == 0:
        return []
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[1:] = (rows[1:] != rows[:-1]) | (positions[1:] != positions[:-1] + 1)
    start_index = starts.nonzero().squeeze(1)
    return torch.diff(start_index, append=start_index.new_tensor([len(positions)])).tolist()
