"""The default path as a user starts it: the job on a real local Ray with the static step compiled over
ragged blocks (no row fails, generate()'s captions), and a Qwen2.5-VL checkpoint with the generation
settings Qwen ships (repetition penalty, do_sample with top_k 1) captioned on the static path."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.batch import read_output

from .conftest import job_command
from .test_generation import shipped_qwen

pytestmark = pytest.mark.slow  # a real Ray cluster, and compiling

ROOT = Path(__file__).resolve().parent.parent


def run(corpus, out: Path, model: str, address: str, *options: str) -> dict:
    command = job_command(str(corpus), str(out), model, "--progress-every", "0", "--address", address, *options)
    done = subprocess.run(
        command, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{") :])


def by_source(out: Path) -> dict:
    table = read_output(str(out))
    rows = table.to_pylist()
    assert len({(r["source_file"], r["source_row"]) for r in rows}) == len(rows)  # each source row once
    return {(r["source_file"], r["source_row"]): r for r in rows}


def test_a_compiled_job_over_ragged_blocks_fails_no_row_and_writes_generates_captions(ray_cluster, tmp_path):
    """23 rows in blocks of 5 (the last one short) through 4 compiled slots in a budget of 256 entries per
    slot, questions and captions of natural lengths: the same captions as the generate() path, no error."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pq.read_table(ROOT / "data" / "sample" / "shard-00000.parquet").slice(0, 23), corpus / "a.parquet")
    model = str(ROOT / "models" / "carve-tiny-hard")
    common = ("--keep", "32", "--max-new-tokens", "48", "--batch-size", "5")
    # 4 slots x 256 entries of carve-tiny-hard's cache (8 layers x 2 x 128 x 4 B per entry) and their books
    compiled = run(corpus, tmp_path / "static", model, ray_cluster, *common, "--compile-decode", "yes",
                   "--decode-slots", "4", "--kv-cache-memory", "1e7")  # fmt: skip
    reference = run(corpus, tmp_path / "generate", model, ray_cluster, *common, "--decode", "generate")
    assert compiled["rows_ok"] == reference["rows_ok"] == 23 and compiled["rows_failed"] == 0
    static, expected = by_source(tmp_path / "static"), by_source(tmp_path / "generate")
    assert {k: r["caption"] for k, r in static.items()} == {k: r["caption"] for k, r in expected.items()}
    assert len({r["generated_tokens"] for r in static.values()}) >= 3  # rows of natural, different lengths


def test_a_qwen_checkpoint_with_qwens_shipped_generation_settings_runs_the_job_static(ray_cluster, tmp_path):
    model = shipped_qwen(tmp_path / "qwen-instruct")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    table = pq.read_table(ROOT / "data" / "sample-qwen" / "shard-00000.parquet").slice(0, 12)
    pq.write_table(table, corpus / "a.parquet")
    summary = run(corpus, tmp_path / "out", model, ray_cluster, "--keep", "0.25", "--max-new-tokens", "32")
    rows = by_source(tmp_path / "out")
    assert summary["rows_ok"] == 12 and summary["rows_failed"] == 0
    assert all(r["caption"] and r["error_code"] is None for r in rows.values())
    claim = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert claim["keep"] == 0.25 and claim["repetition_penalty"] is None  # the checkpoint's own settings
    assert "decode" not in claim  # runtime-only: a rerun may switch paths
    # the same rows through the engine's generate() path: the static path wrote generate()'s captions
    again = run(corpus, tmp_path / "generate", model, ray_cluster, "--keep", "0.25", "--max-new-tokens", "32",
                "--decode", "generate")  # fmt: skip
    assert again["rows_ok"] == 12
    assert {k: r["caption"] for k, r in by_source(tmp_path / "generate").items()} == {
        k: r["caption"] for k, r in rows.items()
    }


def test_a_compiled_serve_replica_compiles_its_buckets_once_over_batches_of_1_to_16(ray_cluster):
    """Waves of 1 to 16 concurrent requests with mixed max_new_tokens into one replica whose step is
    compiled: every shape was compiled before the replica took work, none after, nothing ran eagerly,
    no request failed, and every answer is generate()'s (the stock model: no carve to differ by batch)."""
    import base64
    import io
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from PIL import Image
    from ray import serve

    from pipeline.serve import build_app
    from tokencarve.engine import CaptionEngine, EngineConfig

    from .conftest import free_port

    model = str(ROOT / "models" / "carve-tiny-hard")
    settings = {"model": model, "method": "none", "max_new_tokens": 40, "max_batch_size": 16}
    settings |= {"max_ongoing_requests": 32, "batch_wait_timeout_s": 0.2, "max_replicas": 1}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # 4 slots x 1024 entries: a stock row (576 visual tokens, its prompt, 40 new) fits one slot
    app = build_app(settings | {"compile_decode": "yes", "decode_slots": 4, "kv_cache_memory": 4e7})
    serve.run(app, name="compiled", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        warm = httpx.get(f"{url}/healthz", timeout=60).json()["decode"]
        assert warm["shapes_compiled"] == 5 and warm["capacity"] == 1024 and warm["warmup_seconds"] > 0
        table = pq.read_table(ROOT / "data" / "sample" / "shard-00000.parquet").slice(0, 16)
        images = [Image.open(io.BytesIO(data)).convert("RGB") for data in table.column("image").to_pylist()]
        encoded = [base64.b64encode(data).decode() for data in table.column("image").to_pylist()]
        prompts = table.column("prompt").to_pylist()
        caps = [(4, 16, 40)[i % 3] for i in range(16)]
        reference = CaptionEngine(EngineConfig(model=model, method="none", decode="generate"))
        expected = [reference.caption([images[i]], [prompts[i]], max_new_tokens=caps[i])[0].caption for i in range(16)]

        def ask(i: int) -> str:
            body = {"image": encoded[i], "prompt": prompts[i], "max_new_tokens": caps[i]}
            reply = httpx.post(f"{url}/v1/caption", json=body, timeout=300)
            assert reply.status_code == 200, reply.text
            return reply.json()["text"]

        with ThreadPoolExecutor(16) as pool:
            for wave in (1, 2, 3, 5, 8, 13, 16):
                assert list(pool.map(ask, range(wave))) == expected[:wave]
        after = httpx.get(f"{url}/healthz", timeout=60).json()["decode"]
        assert after["shapes_compiled"] == 5 and after["eager_fallbacks"] == 0 and after["relayouts"] == 0
        assert after["peak_pool_bytes"] <= after["budget_bytes"]
    finally:
        serve.delete("compiled")
        serve.shutdown()
