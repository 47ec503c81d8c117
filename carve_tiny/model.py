"""carve-tiny's architecture, tokenizer and processor: LLaVA-1.5's shape at toy width.

- vision tower: CLIP ViT at 336 px / patch 14 -> 1 CLS + 576 patch tokens; LLaVA takes the last
  layer's hidden states and drops CLS ("default" strategy), so every image is 576 visual tokens;
- projector: LLaVA-1.5's 2-layer MLP (Linear, GELU, Linear) into the decoder's width;
- decoder: a Llama with 4 layers (carve-tiny) or 8 (carve-tiny-hard; `DECODER_LAYERS`); the TokenCarve
  cut sits before layer 2;
- tokenizer: WordPiece over the scene vocabulary (whole words; numbers read digit by digit, "42" ->
  "4" "##2"), special tokens <pad> <s> </s> <unk> <image>, saved as tokenizer.json;
- prompt: LLaVA-1.5's `USER: <image>\\n{question} ASSISTANT:`; the answer ends with </s>.

Saved in llava-hf format, so `AutoProcessor.from_pretrained(path)` and
`LlavaForConditionalGeneration.from_pretrained(path)` load it with nothing but transformers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip import CLIPImageProcessorPil  # the PIL backend: no torchvision needed

from .scenes import SIZE, words

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
PAD, BOS, EOS, UNK, IMAGE = range(len(SPECIALS))
PATCH = 14
IMAGE_TOKENS = (SIZE // PATCH) ** 2  # 576
TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# llava-hf/llava-1.5's chat template, so processor.apply_chat_template gives TEMPLATE
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# The architecture (see docs/CARVE-TINY.md): sized so that training fits a 2-core CPU.
VISION = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=3)  # head_dim 32
# decoder depth per scene variant: the hard model's cut (before layer 2) sits at a quarter of its depth
DECODER_LAYERS = {"simple": 4, "hard": 8}
TEXT = dict(
    hidden_size=128,
    intermediate_size=384,
    num_attention_heads=4,
    num_key_value_heads=4,
    initializer_range=0.08,
    rope_theta=1e6,
)
# initializer_range ~ 1/sqrt(width) (HF's 0.02 suits width ~2500, not 128); rope_theta 1e6 (as Llama 3's
# 5e5) leaves more rotary channels nearly position-free over the ~600-token prompt, for content lookups


def build_tokenizer(scenes: str = "simple") -> PreTrainedTokenizerFast:
    digits = [str(d) for d in range(10)]
    vocab = {token: i for i, token in enumerate([*SPECIALS, *words(scenes), *digits, *("##" + d for d in digits)])}
    core = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix="##"))
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # "4 ##2" -> "42", "left ," -> "left,"
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=2048,
    )


def build_processor(scenes: str = "simple") -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": SIZE},
        crop_size={"height": SIZE, "width": SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(scenes),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=CHAT_TEMPLATE,
    )


# Vision tower init (see `init_vision_tower`): the last POSITION_DIMS channels carry 2-D position codes,
# and every attention head starts as a local (Gaussian-like) window over them, one width per head.
POSITION_DIMS = 32
LOCAL_SHARPNESS = (0.4, 0.8, 1.5)


def build_config(vocab_size: int, decoder_layers: int = DECODER_LAYERS["simple"]) -> LlavaConfig:
    vision = CLIPVisionConfig(image_size=SIZE, patch_size=PATCH, projection_dim=VISION["hidden_size"], **VISION)
    text = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
        num_hidden_layers=decoder_layers,
        **TEXT,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=IMAGE_TOKENS,
        projector_hidden_act="gelu",
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )


def position_codes(grid: int, dim: int, low: float = 0.15, high: float = 1.2) -> torch.Tensor:
    """[grid*grid, dim] 2-D sine-cosine codes (row-major patches): dim/4 frequencies per axis, evenly
    spread over [low, high] radians per patch, so that the dot product of two codes is a peaked
    function of their distance (about 2 patches wide)."""
    freqs = torch.linspace(low, high, dim // 4, dtype=torch.float64)
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


@torch.no_grad()
def init_vision_tower(model: LlavaForConditionalGeneration) -> None:
    """Locality-biased init of the from-scratch CLIP tower (cf. ConViT / mimetic initialisation).

    A 14-px patch inside a shape looks the same for every shape, so shapes are told apart only by
    looking at neighbouring patches, which a randomly initialised ViT learns slowly. Here the last
    POSITION_DIMS channels of the position embedding hold `position_codes` (the patch embedding does
    not write there at first), and the query and key projections of every head read only those
    channels, so each head starts as a local window over the grid (widths LOCAL_SHARPNESS). All of
    it is trained afterwards like any other weight."""
    tower = model.model.vision_tower
    width, dims = tower.config.hidden_size, POSITION_DIMS
    head_dim = width // tower.config.num_attention_heads
    assert head_dim == dims and len(LOCAL_SHARPNESS) == tower.config.num_attention_heads
    position = tower.embeddings.position_embedding.weight
    position.zero_()
    position[1:, width - dims :] = position_codes(SIZE // PATCH, dims)
    tower.embeddings.patch_embedding.weight[width - dims :] = 0.0
    eye = torch.eye(dims)
    for layer in tower.encoder.layers:
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            projection.weight.zero_()
            projection.bias.zero_()
            for h, sharpness in enumerate(LOCAL_SHARPNESS):
                projection.weight[h * dims : (h + 1) * dims, width - dims :] = eye * sharpness**0.5


def build_untrained(path: str | Path | None = None, seed: int = 0, scenes: str = "simple"):
    """A freshly initialised carve-tiny (or carve-tiny-hard, scenes="hard") and its processor (saved to
    `path` if given)."""
    processor = build_processor(scenes)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(len(processor.tokenizer), DECODER_LAYERS[scenes]))
    with torch.no_grad():
        # ~unit-norm token embeddings: a question word keeps its identity in the residual stream
        # next to the (larger) visual tokens instead of being drowned by them
        model.model.language_model.embed_tokens.weight.normal_(0.0, 1.0)
    init_vision_tower(model)
    model.generation_config.update(
        # a hard caption (9 objects) is ~55 tokens
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        max_new_tokens=40 if scenes == "simple" else 64,
        do_sample=False,
    )
    if path is not None:
        save(model, processor, path)
    return model, processor


def save(model: LlavaForConditionalGeneration, processor: LlavaProcessor, path: str | Path) -> None:
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    model.generation_config.save_pretrained(path)


def pixel_values(images) -> torch.Tensor:
    """What the processor computes for 336 x 336 RGB images (no resize or crop), without its overhead."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images]) / 255.0
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
