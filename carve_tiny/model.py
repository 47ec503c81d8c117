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

carve-tiny-qwen (`build_untrained_qwen`) is the Qwen2.5-VL architecture at the same toy width: its own
windowed ViT with 2-D rotary (patch 14, 2 x 2 merger: a 224-448 px side is 8-16 tokens), an 8-layer
mRoPE decoder 128 wide (Qwen2 layers: q/k/v biases), the same WordPiece vocabulary plus Qwen's vision
special tokens, and the prompt `USER: <|vision_start|><|image_pad|>...<|vision_end|>{question} ASSISTANT:`.
Saved as a Qwen2.5-VL checkpoint (tokencarve.loading loads it; without torchvision through
tokencarve.processing.ImageTextProcessor).
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

from .scenes import PATCH, SIZE, words

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
PAD, BOS, EOS, UNK, IMAGE = range(len(SPECIALS))
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


def build_tokenizer(scenes: str = "simple", extra: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """The WordPiece tokenizer; `extra` (name -> token, e.g. QWEN_TOKENS) adds named special tokens
    after the existing vocabulary, so every id of the plain tokenizer is unchanged."""
    digits = [str(d) for d in range(10)]
    extra_tokens = list(dict.fromkeys((extra or {}).values()))
    tokens = [*SPECIALS, *words(scenes), *digits, *("##" + d for d in digits), *extra_tokens]
    vocab = {token: i for i, token in enumerate(tokens)}
    core = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix="##"))
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*SPECIALS, *extra_tokens)])
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
        extra_special_tokens=extra or {"image_token": "<image>"},
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


# -- carve-tiny-qwen: the Qwen2.5-VL architecture ---------------------------------------------------
# Qwen's vision special tokens, named as its tokenizers name them (tokencarve.families reads the names)
QWEN_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
}
# carve-tiny's USER / ASSISTANT prompt with Qwen's image span: `USER: <|vision_start|><|image_pad|>
# <|vision_end|>{question} ASSISTANT:` (the processor expands the image pad to the image's tokens)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% else %}{{ part['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_SIDES = (224, 448)  # native sizes: 8-16 tokens a side after the 2 x 2 merger, 64-256 per image
# A windowed ViT as Qwen2.5-VL's: 112-px windows (4 x 4 tokens), the last block full attention;
# head_dim 32 -> 2-D rotary over 8 frequency pairs per axis. No absolute position anywhere.
QWEN_VISION = dict(
    depth=4,
    hidden_act="quick_gelu",  # CLIP's, so that carve-tiny-hard's tower carries over (clip_to_qwen_tower)
    hidden_size=96,
    intermediate_size=384,
    num_heads=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[3],
)
# The decoder: carve-tiny-hard's shape (8 layers, 128 wide, 4 heads of 32: 16 rotary pairs). mRoPE
# gives pairs 0 / 1-4 / 5-15 to time / height / width, highest frequency first. rope_theta 1e3, not
# carve-tiny's 1e6: at 1e6 the width section's frequencies would be <= 1.8e-4 rad per token, so a
# column's rotary angle would differ by < 0.003 rad across a 16-token row and the decoder (the only
# place a visual token's absolute position exists) could not tell columns apart. At 1e3 height runs
# over 0.65-0.18 and width over 0.12-0.0015 rad per token: monotone over 16 rows / columns, and the
# lowest pairs still nearly position-free for content lookups over a ~300-token prompt.
QWEN_ROPE = {"rope_type": "default", "rope_theta": 1000.0, "mrope_section": [1, 4, 11]}
# vision tower init: every head starts as a local window over its 2-D rotary (see init_qwen_vision_tower);
# the attention-score drop from a patch to its neighbour, per head
QWEN_LOCAL_DROP = (0.5, 1.5, 4.0)


def qwen_tokenizer(scenes: str = "hard") -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer(scenes, QWEN_TOKENS)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def build_qwen_processor(scenes: str = "hard"):
    """(ImageTextProcessor over the tokenizer and Qwen2.5-VL's PIL image processor, image processor):
    the image path the engine builds from the saved files where torchvision is missing."""
    from tokencarve.processing import ImageTextProcessor
    from tokencarve.testing import qwen_image_processor

    image_processor = qwen_image_processor("qwen2.5-vl", max_side=QWEN_SIDES[1], min_side=QWEN_SIDES[0])
    return ImageTextProcessor(qwen_tokenizer(scenes), image_processor, QWEN_CHAT_TEMPLATE)


def build_qwen_config(tokenizer, decoder_layers: int = DECODER_LAYERS["hard"], rope: dict | None = None):
    from transformers import Qwen2_5_VLConfig

    vocab = tokenizer.get_vocab()
    text = dict(
        vocab_size=len(vocab),
        max_position_embeddings=2048,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        num_hidden_layers=decoder_layers,
        rope_parameters=dict(rope or QWEN_ROPE),
        tie_word_embeddings=False,
        **{k: v for k, v in TEXT.items() if k != "rope_theta"},
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(QWEN_VISION, out_hidden_size=TEXT["hidden_size"]),
        image_token_id=vocab[QWEN_TOKENS["image_token"]],
        video_token_id=vocab[QWEN_TOKENS["video_token"]],
        vision_start_token_id=vocab[QWEN_TOKENS["vision_bos_token"]],
        vision_end_token_id=vocab[QWEN_TOKENS["vision_eos_token"]],
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )


@torch.no_grad()
def init_qwen_vision_tower(model) -> None:
    """Locality-biased init of the windowed ViT, as `init_vision_tower` for CLIP, but through its 2-D
    rotary: with the query and key projections zeroed and their biases one constant vector b per head,
    a head's score between patches at offset d is sum over rotary pairs |b|^2 cos(w d), which peaks at
    d = 0: every head starts as a local window (one width per head, QWEN_LOCAL_DROP), and stays
    translation-invariant as the architecture is."""
    tower = model.model.visual
    heads, width = tower.config.num_heads, tower.config.hidden_size
    head_dim = width // heads
    # 8 frequencies per axis; a pair (k, k + head_dim/2) of equal entries c adds 2 c^2 cos(w_k d) to q.k
    freqs = tower.rotary_pos_emb.inv_freq.double()
    drop_per_c2 = 2 * (1 - torch.cos(freqs)).sum().item() * head_dim**-0.5  # one step along an axis
    for block in tower.blocks:
        qkv = block.attn.qkv
        qkv.weight[: 2 * width].zero_()
        for h, drop in enumerate(QWEN_LOCAL_DROP[:heads]):
            value = (drop / drop_per_c2) ** 0.5
            for part in (0, 1):  # query, key
                qkv.bias[part * width + h * head_dim : part * width + (h + 1) * head_dim] = value


def build_untrained_qwen(path: str | Path | None = None, seed: int = 0, scenes: str = "hard", rope: dict | None = None):
    """A freshly initialised carve-tiny-qwen and its processor (saved to `path` if given); `rope`
    overrides QWEN_ROPE (tests: carve-tiny-hard's rope_theta, to check the warm start exactly)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = build_qwen_processor(scenes)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(build_qwen_config(processor.tokenizer, rope=rope))
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.normal_(0.0, 1.0)  # as carve-tiny's
        for layer in model.model.language_model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.zero_()
    init_qwen_vision_tower(model)
    model.generation_config.update(
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=64, do_sample=False
    )
    if path is not None:
        save_qwen(model, processor, path)
    return model, processor


def save_qwen(model, processor, path: str | Path) -> None:
    from tokencarve.testing import save_qwen_processor_files

    path = Path(path)
    model.save_pretrained(path)
    save_qwen_processor_files(
        path, type(model).__name__, processor.tokenizer, processor.image_processor, QWEN_CHAT_TEMPLATE
    )
    model.generation_config.save_pretrained(path)
