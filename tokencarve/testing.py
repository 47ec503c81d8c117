"""Tiny random LLaVA models for tests and CPU benchmarks (576 visual tokens per image, like LLaVA-1.5).

Speed and plumbing do not depend on the weight values, so a model built from a config with random
weights is enough to exercise TokenCarve end to end without downloading anything.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 120
PAD = 0


def tiny_llava_config(hidden_size: int = 64, num_layers: int = 4, vocab_size: int = 128) -> LlavaConfig:
    """CLIP-style tower at 336 px / patch 14 (576 patches) + 2-layer MLP projector + Llama decoder."""
    vision = CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, projection_dim=32,
    )
    # initializer_range 0.2 (not 0.02) gives logits with clear margins, so greedy choices are
    # decided by the model and not by float rounding noise. No eos: decodes run to full length.
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, initializer_range=0.2, pad_token_id=PAD, bos_token_id=1, eos_token_id=None,
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
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    processor.save_pretrained(path)
    tiny_llava(seed).save_pretrained(path)
