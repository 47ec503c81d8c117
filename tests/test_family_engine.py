"""LLaVA-NeXT (and, for the job, Serve and the harness, Qwen2.5-VL: tests/test_qwen_engine.py has the rest
of that family) through the engine, the job, Serve and the evaluation harness: any-resolution images
with their own token counts, budgets as counts or fractions of each image's tokens."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.batch import CaptionJob, read_output, run
from tokencarve.engine import CaptionEngine, EngineConfig, ModelInputs
from tokencarve.eval import __main__ as eval_cli

from .conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def next_model_dir(tmp_path_factory):
    from tokencarve.testing import save_tiny_llava_next_with_processor

    path = tmp_path_factory.mktemp("tiny-llava-next")
    save_tiny_llava_next_with_processor(path)
    return str(path)


@pytest.fixture(scope="module", params=["llava-next", "qwen2.5-vl"])
def anyres_model_dir(request, next_model_dir, tmp_path_factory):
    """A family whose images have their own token counts: NeXT's tiles, Qwen2.5-VL's native grids."""
    if request.param == "llava-next":
        return next_model_dir
    from tokencarve.testing import save_tiny_qwen_vl_with_processor

    path = tmp_path_factory.mktemp("tiny-qwen2.5-vl")
    save_tiny_qwen_vl_with_processor(path, "qwen2.5-vl")
    return str(path)


def png(width: int, height: int, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_engine_carves_each_image_on_its_own_count(next_model_dir):
    engine = CaptionEngine(EngineConfig(model=next_model_dir, keep=0.25, max_new_tokens=3))
    assert not engine.inputs.square  # any resolution: the processor tiles, nothing is padded to a square
    wide, small = Image.new("RGB", (90, 40), (200, 0, 0)), Image.new("RGB", (40, 40), (0, 90, 0))
    assert engine.inputs.image(wide).size == (90, 40)
    huge = engine.inputs.image(Image.new("RGB", (4000, 1000)))
    assert max(huge.size) == engine.inputs.max_side and huge.size[0] / huge.size[1] == pytest.approx(4, rel=0.02)
    captions = engine.caption([wide, small], [None, "What is it?"])
    counts = [c.visual_tokens_in for c in captions]
    assert counts[0] > counts[1]  # the wide image has more tiles
    for c in captions:
        assert (
            c.visual_tokens_kept == math.ceil(0.25 * c.visual_tokens_in) and c.kv_bytes_held < c.kv_bytes_uncompressed
        )
    stock = engine.caption([wide], [None], method="none")[0]
    assert stock.visual_tokens_kept == stock.visual_tokens_in == counts[0]
    fixed = engine.caption([wide, small], [None, None], keep=16)
    assert [c.visual_tokens_kept for c in fixed] == [16, 16]


def test_the_prompt_budget_leaves_room_for_the_largest_image(next_model_dir):
    inputs = ModelInputs.load(EngineConfig(model=next_model_dir, max_new_tokens=8))
    assert inputs.image_tokens > 576 // 4  # base grid + the most tiles + newlines, not the base grid alone
    assert inputs.prompt_limit() == inputs.context_window - inputs.image_tokens - 8


@pytest.mark.slow
def test_job_with_a_fractional_budget(ray_cluster, anyres_model_dir, tmp_path):
    (tmp_path / "in").mkdir()
    sizes = [(90, 40), (40, 40), (40, 120), (70, 70), (300, 30)]
    pq.write_table(
        pa.table({"id": [f"img-{i}" for i in range(len(sizes))], "image": [png(*s) for s in sizes]}),
        tmp_path / "in" / "shard.parquet",
    )
    engine = EngineConfig(model=anyres_model_dir, keep=0.1, max_new_tokens=3)
    summary = run(
        CaptionJob(
            inputs=[str(tmp_path / "in")], output=str(tmp_path / "out"), engine=engine, batch_size=3, progress_every_s=0
        )
    )
    rows = read_output(str(tmp_path / "out")).to_pylist()
    assert summary["rows_ok"] == len(rows) == len(sizes) and {r["keep"] for r in rows} == {"0.1"}
    assert len({r["visual_tokens_in"] for r in rows}) > 1  # different sizes, different counts, one batch
    assert all(r["visual_tokens_kept"] == math.ceil(0.1 * r["visual_tokens_in"]) for r in rows)


@pytest.mark.slow
def test_serve_with_a_fractional_budget(ray_cluster, anyres_model_dir):
    from ray import serve

    from pipeline.serve import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(
            build_app({"model": anyres_model_dir, "keep": 0.5, "max_new_tokens": 3, "max_replicas": 1}),
            name="next",
            route_prefix="/",
        )
        image = base64.b64encode(png(90, 40)).decode()
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/caption", json={"image": image, "keep": 0.25}, timeout=120)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["keep"] == 0.25 and body["visual_tokens_kept"] == math.ceil(0.25 * body["visual_tokens_in"])
        bad = httpx.post(f"http://127.0.0.1:{port}/v1/caption", json={"image": image, "keep": 1.5}, timeout=60)
        assert bad.status_code == 422
    finally:
        serve.shutdown()


def test_eval_harness_with_counts_and_fractions(anyres_model_dir, tmp_path):
    sample = pq.read_table(sorted((ROOT / "data" / "sample").glob("*.parquet"))[0]).slice(0, 4)
    pq.write_table(sample, tmp_path / "questions.parquet")
    result = eval_cli.main(
        [
            "--model",
            anyres_model_dir,
            "--data",
            str(tmp_path / "questions.parquet"),
            "--methods",
            "none,tokencarve",
            "--budgets",
            "0.5,16",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "3",
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    by_setting = {(r["setting"]["method"], r["setting"]["keep"]): r["summary"] for r in result["results"]}
    assert set(by_setting) == {("none", None), ("tokencarve", 0.5), ("tokencarve", 16)}
    assert by_setting[("tokencarve", 16)]["information"]["visual_tokens"] == 16
    everything = by_setting[("none", None)]["information"]["visual_tokens"]
    # more than the count budget (NeXT: base grid + tiles + newlines; Qwen: the sample's native grids)
    assert everything > 16 and by_setting[("tokencarve", 0.5)]["information"]["visual_tokens"] == math.ceil(
        everything / 2
    )
