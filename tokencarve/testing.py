"""Tiny random LLaVA models for tests and CPU benchmarks, one per family TokenCarve supports.

    tiny_llava            LLaVA-1.5: 576 visual tokens per image (CLIP 336 px / 14), Llama decoder
    tiny_llava_next       LLaVA-NeXT: 56 px tiles of 4 x 4 tokens, any resolution (base + tiles + a
                          newline per row: 36 to 172 tokens per image), Mistral decoder (GQA, untied)
    tiny_llava_onevision  OneVision: SigLIP tiles, anyres_max_4 (larger images are shrunk), Qwen2
                          decoder (GQA, q/k/v biases, tied embeddings)

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
    Qwen2Config,
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


def _word_tokenizer(vocab_size: int, specials: dict[str, int]):
    """A word-level tokenizer over WORDS and fillers w0, w1, ..., padding on the left."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fillers = list(WORDS) + [f"w{i}" for i in range(vocab_size)]
    free = [i for i in range(vocab_size) if i not in specials.values()]
    core = Tokenizer(models.WordLevel(dict(specials, **dict(zip(fillers, free))), unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece()  # joins words with spaces
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
