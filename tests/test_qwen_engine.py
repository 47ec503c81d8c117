"""The Qwen-VL family through the engine, the job, Serve and the evaluation harness: native-resolution
images with their own token counts, min / max pixels as settings, budgets as counts or fractions."""

from __future__ import annotations

import base64
import math
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.batch import CaptionJob, read_output, run
from tokencarve.engine import CaptionEngine, EngineConfig, ModelInputs
from tokencarve.eval import __main__ as eval_cli

from .conftest import free_port
from .test_family_engine import png
from .tiny_family import picture

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.mark.slow
def test_job_on_qwen_with_a_fractional_budget(ray_cluster, qwen_model_dir, tmp_path):
    (tmp_path / "in").mkdir()
    sizes = [(90, 40), (40, 40), (40, 120), (70, 70), (300, 30)]
    pq.write_table(
        pa.table({"id": [f"img-{i}" for i in range(len(sizes))], "image": [png(*s) for s in sizes]}),
        tmp_path / "in" / "shard.parquet",
    )
    engine = EngineConfig(model=qwen_model_dir, keep=0.5, max_new_tokens=3, max_pixels=224 * 224)
    summary = run(
        CaptionJob(
            inputs=[str(tmp_path / "in")], output=str(tmp_path / "out"), engine=engine, batch_size=3, progress_every_s=0
        )
    )
    rows = read_output(str(tmp_path / "out")).to_pylist()
    assert summary["rows_ok"] == len(rows) == len(sizes) and {str(r["keep"]) for r in rows} == {"0.5"}
    assert len({r["visual_tokens_in"] for r in rows}) > 1  # different sizes, different counts, one batch
    assert all(r["visual_tokens_kept"] == math.ceil(0.5 * r["visual_tokens_in"]) for r in rows)


@pytest.mark.slow
def test_serve_on_qwen_with_a_fractional_budget(ray_cluster, qwen_model_dir):
    from ray import serve

    from pipeline.serve import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(
            build_app({"model": qwen_model_dir, "keep": 0.5, "max_new_tokens": 3, "max_replicas": 1}),
            name="qwen",
            route_prefix="/",
        )
        image = base64.b64encode(png(200, 90)).decode()
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/caption", json={"image": image, "keep": 0.25}, timeout=120)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["visual_tokens_in"] == 21 and body["visual_tokens_kept"] == 6  # ceil(0.25 x 21)
    finally:
        serve.shutdown()


def test_eval_harness_on_qwen_with_counts_and_fractions(qwen_model_dir, tmp_path):
    sample = pq.read_table(sorted((ROOT / "data" / "sample").glob("*.parquet"))[0]).slice(0, 4)
    pq.write_table(sample, tmp_path / "questions.parquet")
    result = eval_cli.main(
        [
            "--model",
            qwen_model_dir,
            "--data",
            str(tmp_path / "questions.parquet"),
            "--methods",
            "none,tokencarve",
            "--budgets",
            "0.5,8",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "3",
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    by_setting = {(r["setting"]["method"], r["setting"]["keep"]): r["summary"] for r in result["results"]}
    assert set(by_setting) == {("none", None), ("tokencarve", 0.5), ("tokencarve", 8)}
    assert by_setting[("tokencarve", 8)]["information"]["visual_tokens"] == 8
    everything = by_setting[("none", None)]["information"]["visual_tokens"]
    assert by_setting[("tokencarve", 0.5)]["information"]["visual_tokens"] == math.ceil(everything / 2)
