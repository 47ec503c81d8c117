"""carve-tiny's architecture, tokenizer and processor: LLaVA-1.5's shape at toy width.

CLIP-style vision tower at 336 px / patch 14 (576 visual tokens per image, CLS dropped), a 2-layer
MLP projector and a 4-layer Llama decoder, with a word-level tokenizer over the scene vocabulary and
the LLaVA-1.5 prompt `USER: <image>\\n... ASSISTANT:`. Saved in llava-hf format, so
`AutoProcessor.from_pretrained(path)` and `LlavaForConditionalGeneration.from_pretrained(path)` load it.
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip import CLIPImageProcessorPil

from .scenes import SIZE, vocabulary

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
PAD, BOS, EOS, UNK, IMAGE = range(5)
TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    core.decoder = decoders.WordPiece()  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left", model_max_length=1024,
    )


def build_processor() -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD), do_convert_rgb=True,
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_config(vocab_size: int) -> LlavaConfig:
    vision = CLIPVisionConfig(image_size=SIZE, patch_size=14, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=64)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=True)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, vision_feature_layer=-1,
                       vision_feature_select_strategy="default", image_seq_length=576, pad_token_id=PAD)


def build_untrained(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    processor = build_processor()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(len(processor.tokenizer)))
    model.generation_config.update(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=48, do_sample=False)
    return model, processor


def pixel_values(images) -> torch.Tensor:
    """What the processor computes for 336 x 336 RGB images (no resize/crop needed), without its overhead."""
    array = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
