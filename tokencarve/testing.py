"""Tiny random LLaVA models for tests and CPU benchmarks, one per family TokenCarve supports.

    tiny_llava            LLaVA-1.5: 576 visual tokens per image (CLIP 336 px / 14), Llama decoder
    tiny_llava_next       LLaVA-NeXT: 56 px tiles of 4 x 4 tokens, any resolution (base + tiles + a
                          newline per row: 36 to 172 tokens per image), Mistral decoder (GQA, untied)
    tiny_llava_onevision  OneVision: SigLIP tiles, anyres_max_4 (larger images are shrunk), Qwen2
                          decoder (GQA, q/k/v biases, tied embeddings)
    tiny_qwen_vl          Qwen2-VL / Qwen2.5-VL / Qwen3-VL: native resolution (16 to 64 tokens per image
                          at 56 to 224 px), 2 x 2 merger, mRoPE decoder (Qwen3-VL: query / key norms,
                          interleaved mRoPE, deepstack after decoder layers 0, 1 and 2)

Speed and plumbing do not depend on the weight values, so a model built from a config with random
weights is enough to exercise TokenCarve end to end without downloading anything.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    MistralConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
)

IMAGE_TOKEN = 120
VIDEO_TOKEN = 121  # OneVision's; never used by the tests' prompts
PAD = 0
TILE = 56  # NeXT / OneVision tile side in pixels for tests: 4 x 4 patches of 14 (benchmarks: 336, 24 x 24)


def pinpoints(tile: int = TILE) -> list[list[int]]:
    """(height, width) resolutions an image may be tiled to: 1 x 2 up to 3 x 3 tiles."""
    return [[tile * h, tile * w] for h, w in [(1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (3, 3)]]


def tiny_llava_config(hidden_size: int = 64, num_layers: int = 4, vocab_size: int = 128) -> LlavaConfig:
    """CLIP-style tower at 336 px / patch 14 (576 patches) + 2-layer MLP projector + Llama decoder."""
    vision = CLIPVisionConfig(
        image_size=336,
        patch_size=14,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    )
    # initializer_range 0.2 (not 0.02) gives logits with clear margins, so greedy choices are
    # decided by the model and not by float rounding noise. No eos: decodes run to full length.
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.2,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=None,
    )
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2)


def tiny_llava(seed: int = 0, **config) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(tiny_llava_config(**config)).eval()


WORDS = ["USER", "ASSISTANT", ":", "Describe", "the", "image", ".", "What", "is", "in", "a", "?", "colour", "shape"]


def save_tiny_llava_with_processor(path, seed: int = 0) -> None:
    """A random tiny LLaVA plus a real (word-level) tokenizer and LLaVA processor, saved to `path`,
    so that AutoProcessor / LlavaForConditionalGeneration.from_pretrained(path) work offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip import CLIPImageProcessorPil

    config = tiny_llava_config()
    specials = {"<pad>": PAD, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": IMAGE_TOKEN}
    fillers = [w for w in WORDS] + [f"w{i}" for i in range(config.text_config.vocab_size)]
    free = [i for i in range(config.text_config.vocab_size) if i not in specials.values()]
    vocab = dict(specials, **dict(zip(fillers, free)))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(path)
    tiny_llava(seed).save_pretrained(path)


def _vision(kind, tile: int, **overrides):
    return kind(
        image_size=tile,
        patch_size=14,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        **overrides,
    )


def tiny_llava_next_config(
    hidden_size: int = 64, num_layers: int = 4, vocab_size: int = 128, tile: int = TILE
) -> LlavaNextConfig:
    """CLIP tiles (CLS dropped: 16 tokens each) + Mistral decoder with grouped-query attention,
    untied embeddings and no sliding window (TokenCarve refuses sliding-window decoders)."""
    text = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=None,
        max_position_embeddings=4096,
        initializer_range=0.2,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlavaNextConfig(
        vision_config=_vision(CLIPVisionConfig, tile, projection_dim=32),
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        image_grid_pinpoints=pinpoints(tile),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(tile // 14) ** 2,
        tie_word_embeddings=False,
    )


def tiny_llava_onevision_config(
    hidden_size: int = 64,
    num_layers: int = 4,
    vocab_size: int = 128,
    tile: int = TILE,
    vision_aspect_ratio: str = "anyres_max_4",
) -> LlavaOnevisionConfig:
    """SigLIP tiles (no CLS: 16 tokens each), at most ~4 tiles' worth of tokens per image (anyres_max_4,
    so a 3 x 3 tiling is shrunk), + Qwen2 decoder: grouped-query attention, q/k/v biases, tied embeddings."""
    text = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.2,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=None,
        tie_word_embeddings=True,
    )
    return LlavaOnevisionConfig(
        vision_config=_vision(SiglipVisionConfig, tile),
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        image_grid_pinpoints=pinpoints(tile),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        tie_word_embeddings=True,
    )


def tiny_llava_next(seed: int = 0, **config) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(tiny_llava_next_config(**config)).eval()


def tiny_llava_onevision(seed: int = 0, **config) -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(tiny_llava_onevision_config(**config)).eval()
    # transformers initialises biases to zero; random ones make the tests see whether they are used
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.normal_(0.0, 0.5)
    return model


def _word_tokenizer(vocab_size: int, specials: dict[str, int], extra: dict[str, str] | None = None):
    """A word-level tokenizer over WORDS and fillers w0, w1, ..., padding on the left; `extra`: named
    special tokens (default: LLaVA's image token, and OneVision's video token where it is in `specials`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fillers = list(WORDS) + [f"w{i}" for i in range(vocab_size)]
    free = [i for i in range(vocab_size) if i not in specials.values()]
    core = Tokenizer(models.WordLevel(dict(specials, **dict(zip(fillers, free))), unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece()  # joins words with spaces
    if extra is None:
        extra = {"image_token": "<image>", **({"video_token": "<video>"} if "<video>" in specials else {})}
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=extra,
        padding_side="left",
    )


SPECIALS = {"<pad>": PAD, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": IMAGE_TOKEN}


def next_image_processor(tile: int = TILE):
    from transformers.models.llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints(tile)
    )


def onevision_image_processor(tile: int = TILE):
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

    return LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints(tile))


def save_tiny_llava_next_with_processor(path, seed: int = 0) -> None:
    """tiny_llava_next + tokenizer + LlavaNextProcessor, saved so that from_pretrained(path) works offline."""
    from transformers import LlavaNextProcessor

    model = tiny_llava_next(seed)
    image_processor = next_image_processor(TILE)
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=_word_tokenizer(128, SPECIALS),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(path)
    model.save_pretrained(path)


def save_tiny_llava_onevision_with_processor(path, seed: int = 0) -> None:
    """tiny_llava_onevision + tokenizer + image processor, saved for from_pretrained(path).

    Not a full LlavaOnevisionProcessor: that one needs its video processor, which needs torchvision
    (not installed here). AutoTokenizer and AutoImageProcessor load from `path`; prompts expand
    `<image>` to the counts `image_token_counts` gives.
    """

    model = tiny_llava_onevision(seed)
    onevision_image_processor(TILE).save_pretrained(path)
    _word_tokenizer(128, dict(SPECIALS, **{"<video>": VIDEO_TOKEN})).save_pretrained(path)
    model.save_pretrained(path)


def image_token_counts(model, image_inputs: dict) -> list[int]:
    """Visual tokens per image as the model itself packs them (base + tiles + newlines), from the
    image processor's output (pixel_values, image_sizes and, for OneVision, batch_num_images)."""
    with torch.no_grad():
        features = model.model.get_image_features(**image_inputs, return_dict=True).pooler_output
    return [len(f) for f in features]


LLAVA15_IMAGE_TOKEN = 32000  # llava-hf/llava-1.5-7b-hf's <image> id (its vocabulary: 32064)
# (vision width, MLP, layers, heads; decoder width, MLP, layers, heads) per scale: "7b" is LLaVA-1.5-7B
# itself (CLIP ViT-L/14-336, 32-layer 4096-wide Llama); "tiny" keeps its token geometry and vocabulary
_LLAVA15_SCALES = {"7b": (1024, 4096, 24, 16, 4096, 11008, 32, 32), "tiny": (64, 128, 2, 2, 256, 512, 4, 4)}


def llava15_config(scale: str = "7b") -> LlavaConfig:
    """LLaVA-1.5's architecture (576 visual tokens per image, vocab 32064, no eos: decodes run to the
    length asked for) at `scale` "7b" (the real sizes, for GPU benchmarks) or "tiny" (the same code on a
    CPU in seconds). Random weights are enough: speed does not depend on their values."""
    vision_width, vision_mlp, vision_layers, vision_heads, width, mlp, layers, heads = _LLAVA15_SCALES[scale]
    vision = CLIPVisionConfig(
        image_size=336,
        patch_size=14,
        hidden_size=vision_width,
        intermediate_size=vision_mlp,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        projection_dim=768 if scale == "7b" else vision_width,
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        eos_token_id=None,
        pad_token_id=0,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=LLAVA15_IMAGE_TOKEN, vision_feature_layer=-2
    )


# -- the Qwen-VL family ---------------------------------------------------------------------------
# Native resolution: an image is resized to a multiple of patch x merge pixels within [min, max]
# pixels and gives (h / patch / merge) x (w / patch / merge) tokens, so counts vary per image. Tests use
# 14 px patches (16 for Qwen3-VL, as released), a 2 x 2 merger and images of 56 to 224 px a side.
QWEN_SPECIALS = {
    "<pad>": PAD,
    "<s>": 1,
    "</s>": 2,
    "<unk>": 3,
    "<|im_start|>": 114,
    "<|im_end|>": 115,
    "<|vision_start|>": 117,
    "<|vision_end|>": 118,
    "<|image_pad|>": IMAGE_TOKEN,
    "<|video_pad|>": VIDEO_TOKEN,
}
QWEN_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
# the released checkpoints' chat template, reduced to one user turn of images and text
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|> <|image_pad|> <|vision_end|> "
    "{% else %}{{ part['text'] }} {% endif %}{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def _qwen_text(family: str, hidden_size: int, num_layers: int) -> dict:
    text = dict(
        vocab_size=128,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.2,  # clear logit margins: greedy picks decided by the model, not by rounding
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=None,
        # head_dim 16 = 8 frequency pairs: temporal 2, height 3, width 3
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    if family == "qwen3-vl":
        # interleaved as released ([24, 20, 20] of 64 pairs): h and w on every third pair, t on the rest
        text.update(head_dim=hidden_size // 4, attention_bias=True)
        text["rope_parameters"].update(mrope_section=[4, 2, 2], mrope_interleaved=True)
    return text


def _qwen_vision(family: str, hidden_size: int) -> dict:
    common = dict(depth=2, num_heads=2, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if family == "qwen2-vl":
        return dict(common, embed_dim=32, hidden_size=hidden_size, mlp_ratio=2, patch_size=14)
    if family == "qwen2.5-vl":  # windowed attention in block 0, full attention in block 1
        return dict(
            common,
            hidden_size=32,
            out_hidden_size=hidden_size,
            intermediate_size=64,
            patch_size=14,
            window_size=56,
            fullatt_block_indexes=[1],
        )
    # Qwen3-VL: deepstack features of vision blocks 0, 1 and 2 added after decoder layers 0, 1 and 2 (three,
    # as released), so that a cut before layer 2 has a deepstack addition after it
    return dict(
        common,
        depth=3,
        hidden_size=32,
        out_hidden_size=hidden_size,
        intermediate_size=64,
        patch_size=16,
        deepstack_visual_indexes=[0, 1, 2],
        num_position_embeddings=64,
    )


QWEN_CLASSES = {
    "qwen2-vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2.5-vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    "qwen3-vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
}


def tiny_qwen_vl_config(family: str, hidden_size: int = 64, num_layers: int = 4):
    config_class, _ = QWEN_CLASSES[family]
    return config_class(
        text_config=_qwen_text(family, hidden_size, num_layers),
        vision_config=_qwen_vision(family, hidden_size),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=QWEN_SPECIALS["<|vision_start|>"],
        vision_end_token_id=QWEN_SPECIALS["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def tiny_qwen_vl(family: str, seed: int = 0, **config):
    """A random tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL (family: one of QWEN_FAMILIES)."""
    torch.manual_seed(seed)
    model = QWEN_CLASSES[family][1](tiny_qwen_vl_config(family, **config)).eval()
    with torch.no_grad():  # random biases, so that the tests see whether they are used
        for layer in model.model.language_model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.normal_(0.0, 0.5)
    return model


def qwen_image_processor(family: str, max_side: int = 224, min_side: int | None = None):
    """The checkpoint's own image processor (its PIL backend), at test sizes: 56 px (or min_side) up to
    max_side a side (as areas: min_side^2 .. max_side^2 pixels)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    patch = 16 if family == "qwen3-vl" else 14
    return Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=(min_side or 2 * patch) ** 2,
        max_pixels=max_side**2,
    )


def qwen_tokenizer():
    extra = {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
    }
    tokenizer = _word_tokenizer(128, QWEN_SPECIALS, extra)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def save_tiny_qwen_vl_with_processor(path, family: str, seed: int = 0, **config) -> None:
    """tiny_qwen_vl + the files its processor is built from (tokenizer, image processor, chat template,
    processor_config naming the family's processor class), saved for from_pretrained(path) offline.
    The full processor also builds a video processor, which needs torchvision: where it is missing,
    tokencarve.loading.load_processor builds the image-and-text path from the same files."""
    model = tiny_qwen_vl(family, seed, **config)
    save_qwen_processor_files(
        path, type(model).__name__, qwen_tokenizer(), qwen_image_processor(family), QWEN_CHAT_TEMPLATE
    )
    model.save_pretrained(path)


def save_qwen_processor_files(path, model_class: str, tokenizer, image_processor, chat_template: str) -> None:
    """A Qwen-VL checkpoint's processor files (tokenizer, image processor, chat template, processor_config
    naming the family's processor class) for `model_class`, loadable offline with or without torchvision."""
    import json
    from pathlib import Path

    from .processing import PROCESSOR_CLASSES

    image_processor.save_pretrained(path)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    Path(path, "chat_template.jinja").write_text(chat_template)
    Path(path, "processor_config.json").write_text(json.dumps({"processor_class": PROCESSOR_CLASSES[model_class]}))


QWEN25VL_IMAGE_TOKEN = 151655  # Qwen/Qwen2.5-VL-7B-Instruct's <|image_pad|> (vocabulary: 152064)
# (vision width, MLP, blocks, heads; decoder width, MLP, layers, heads, kv heads) per scale: "7b" is
# Qwen2.5-VL-7B itself (a 32-block 1280-wide windowed ViT, 28-layer 3584-wide mRoPE decoder, GQA 28 / 4);
# "tiny" keeps its token geometry (14 px patches, 2 x 2 merger) and vocabulary
_QWEN25VL_SCALES = {"7b": (1280, 3420, 32, 16, 3584, 18944, 28, 28, 4), "tiny": (64, 128, 4, 2, 256, 512, 4, 4, 2)}


def qwen25vl_config(scale: str = "7b") -> Qwen2_5_VLConfig:
    """Qwen2.5-VL's architecture at `scale` "7b" (the real sizes, for GPU benchmarks) or "tiny", random
    weights, no eos (decodes run to the length asked for). Its images are native resolution: a 1008 x
    1008 px image is 72 x 72 patches, 36 x 36 = 1,296 tokens after the merger."""
    vision_width, vision_mlp, blocks, vision_heads, width, mlp, layers, heads, kv_heads = _QWEN25VL_SCALES[scale]
    vision = dict(
        depth=blocks,
        hidden_size=vision_width,
        intermediate_size=vision_mlp,
        num_heads=vision_heads,
        out_hidden_size=width,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[i for i in (7, 15, 23, 31) if i < blocks] or [blocks - 1],
    )
    head_dim = width // heads
    text = dict(
        vocab_size=152064,
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128000,
        eos_token_id=None,
        pad_token_id=0,
        # 7B: head_dim 128 = 64 pairs in sections 16 / 24 / 24, scaled to the tiny decoder's head_dim
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16],
        },
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=QWEN25VL_IMAGE_TOKEN,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
    )
