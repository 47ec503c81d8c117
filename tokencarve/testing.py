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
