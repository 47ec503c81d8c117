"""The Qwen-VL family through the engine: native-resolution images with their own token counts, the
CPU stage's resize to each image's grid, min / max pixels as settings, fixed templates. The job, Serve
and the harness on Qwen2.5-VL are tests/test_family_engine.py's, parametrised over NeXT and Qwen."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from tokencarve.engine import CaptionEngine, EngineConfig, ModelInputs

from .tiny_family import picture


@pytest.fixture(scope="module")
def qwen_model_dir(tmp_path_factory):
    from tokencarve.testing import save_tiny_qwen_vl_with_processor

    path = tmp_path_factory.mktemp("tiny-qwen2.5-vl")
    save_tiny_qwen_vl_with_processor(path, "qwen2.5-vl")
    return str(path)


def test_engine_carves_each_native_size_image_on_its_own_count(qwen_model_dir):
    engine = CaptionEngine(EngineConfig(model=qwen_model_dir, keep=0.25, max_new_tokens=3))
    wide, small = Image.new("RGB", (200, 90), (200, 0, 0)), Image.new("RGB", (60, 60), (0, 90, 0))
    assert engine.inputs.image(wide).size == (196, 84)  # its native grid: no padding, aspect kept
    captions = engine.caption([wide, small], [None, "What is it?"])
    counts = [c.visual_tokens_in for c in captions]
    assert counts == [7 * 3, 2 * 2]  # (200 x 90 -> 196 x 84 px) / 28 px, (60 x 60 -> 56 x 56) / 28
    assert [c.visual_tokens_kept for c in captions] == [math.ceil(0.25 * n) for n in counts]
    assert captions[0].kv_bytes_held < captions[0].kv_bytes_uncompressed
    stock = engine.caption([wide], [None], method="none")[0]
    assert stock.visual_tokens_kept == stock.visual_tokens_in == counts[0]


def test_the_1d_position_ablation_is_an_engine_setting_on_both_decode_paths(qwen_model_dir):
    """`--positions 1d` (the harness's ablation) reaches the carver, decodes the same on the static
    path as through generate(), and keeps the tokens the method keeps (only their positions move)."""
    with pytest.raises(ValueError, match="positions"):
        EngineConfig(model=qwen_model_dir, positions="2d")
    images = [picture(200, 140, seed=1), picture(100, 60, seed=2)]
    prompts = [None, "What is it?"]
    runs = {}
    for positions, decode in (("1d", "static"), ("1d", "generate"), ("3d", "static")):
        config = EngineConfig(model=qwen_model_dir, keep=4, max_new_tokens=6, positions=positions, decode=decode)
        engine = CaptionEngine(config)
        assert engine.model.tokencarve.config.positions == positions
        runs[positions, decode] = [(c.caption, c.visual_tokens_kept) for c in engine.caption(images, prompts)]
    assert runs["1d", "static"] == runs["1d", "generate"]
    assert [kept for _, kept in runs["1d", "static"]] == [kept for _, kept in runs["3d", "static"]] == [4, 4]


def test_the_cpu_stage_resizes_to_the_processors_own_grid_and_refuses_what_it_cannot_take(qwen_model_dir):
    """The job's CPU stage ships each image at its native size: the processor then sees the same
    pixels as from the original (its resize is the identity), and an image it cannot take is a row error."""
    inputs = ModelInputs.load(EngineConfig(model=qwen_model_dir))
    photo = picture(1300, 900, seed=3)
    prepared = inputs.image(photo)
    assert max(prepared.size) < 1300  # shrunk to the largest area, on the CPU stage
    processor = inputs.processor.image_processor
    original, shipped = (
        processor(images=[photo], return_tensors="pt"),
        processor(images=[prepared], return_tensors="pt"),
    )
    assert torch.equal(original["image_grid_thw"], shipped["image_grid_thw"])
    assert torch.equal(original["pixel_values"], shipped["pixel_values"])
    sliver = Image.new("RGB", (4000, 10))
    refused = inputs.image(sliver)
    assert refused.code == "unsupported_image_shape" and "4000x10" in refused.message
    assert inputs.image_error(sliver) == refused and inputs.image_error(photo) is None  # Serve's check


def test_min_and_max_pixels_bound_the_tokens_and_the_prompt_budget(qwen_model_dir):
    config = EngineConfig(model=qwen_model_dir, max_new_tokens=8, max_pixels=112 * 112, min_pixels=56 * 56)
    inputs = ModelInputs.load(config)
    assert inputs.image_tokens == 16  # 112 x 112 px at most: 4 x 4 merged tokens
    assert inputs.prompt_limit() == inputs.context_window - 16 - 8
    engine = CaptionEngine(config)
    big, tiny = Image.new("RGB", (400, 400)), Image.new("RGB", (30, 30))
    assert [c.visual_tokens_in for c in engine.caption([big, tiny], [None, None])] == [16, 4]
    with pytest.raises(ValueError, match="min_pixels"):
        EngineConfig(model=qwen_model_dir, min_pixels=10_000, max_pixels=100)


def test_fixed_templates_name_the_image_in_the_familys_own_tokens(qwen_model_dir):
    inputs = ModelInputs.load(EngineConfig(model=qwen_model_dir, prompt_template="<image> Q: {prompt} A:"))
    assert inputs.prompt_text("w1") == "<|vision_start|><|image_pad|><|vision_end|> Q: w1 A:"
    assert inputs.prompt_error("look <|image_pad|> here").code == "invalid_prompt"
