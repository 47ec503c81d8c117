"""The job at a size where a per-row set would show, and on a real S3 API, on a real local Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from pipeline.batch import CaptionJob, run
from pipeline.output import Output
from pipeline.synthetic import img2dataset_samples, tar_bytes, write_parquet_corpus
from tokencarve.engine import EngineConfig

from .conftest import job_command, wait_until

pytestmark = pytest.mark.slow  # a real Ray cluster, servers, 200,000 rows

ROOT = Path(__file__).resolve().parent.parent


def assert_each_source_row_once(table: pa.Table, rows: int) -> None:
    """Exactly once by (source_file, source_row), checked in Arrow (no Python set of rows)."""
    counts = table.group_by(["source_file", "source_row"]).aggregate([([], "count_all")])
    assert counts.num_rows == rows == table.num_rows
    assert pc.max(counts.column("count_all")).as_py() == 1


def test_a_killed_run_of_200k_rows_resumes_exactly_once(ray_cluster, tiny_model_dir, tmp_path):
    shards, per_shard = 20, 10_000
    rows = write_parquet_corpus(str(tmp_path / "corpus"), shards, per_shard, real_every=2500)
    out = tmp_path / "out"
    command = job_command(
        str(tmp_path / "corpus"),
        str(out),
        tiny_model_dir,
        "--keep",
        "16",
        "--max-new-tokens",
        "2",
        "--carry",
        "url,caption",
        "--progress-every",
        "1",
        "--address",
        ray_cluster,
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    first = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    records = out / "_units"
    wait_until(lambda: records.is_dir() and len(list(records.glob("*.done.json"))) >= 3, 600, "three finished shards")
    os.killpg(first.pid, signal.SIGKILL)  # the driver dies with shards finished, in flight and not started
    first.wait()
    finished = len(list(records.glob("*.done.json")))
    assert finished < shards, "the run ended before it could be killed; make the corpus larger"

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "progress: " in second.stderr and " rows/s | ETA " in second.stderr
    summary = json.loads(second.stdout[second.stdout.index("{") :])
    assert summary["rows_total"] == rows and summary["units_done"] == shards and summary["units_failed"] == 0
    assert summary["rows_skipped_as_done"] >= finished * per_shard  # finished shards are not redone
    assert summary["rows_ok"] == shards * per_shard // 2500 and summary["errors_by_reason"] == {
        "missing_image": rows - summary["rows_ok"]
    }

    table = pads.dataset(str(out), format="parquet").to_table(
        columns=["id", "source_file", "source_row", "source_url", "source_caption"]
    )
    assert_each_source_row_once(table, rows)
    sample = table.slice(12_345, 1).to_pylist()[0]
    assert (
        sample["source_url"].endswith(sample["id"] + ".jpg") and sample["source_caption"] == f"alt text {sample['id']}"
    )


def test_s3_round_trip_with_resume(ray_cluster, tiny_model_dir, s3_server):
    query, fs = s3_server
    fs.create_dir("corpus-bucket/parquet")
    fs.create_dir("out-bucket")  # buckets exist before a job writes to them
    write_parquet_corpus("corpus-bucket/parquet", 3, 40, real_every=10, filesystem=fs)
    with fs.open_output_stream("corpus-bucket/wds/00000.tar") as stream:
        stream.write(tar_bytes(img2dataset_samples(9, 4)))
    inputs = [f"s3://corpus-bucket/parquet?{query}", f"s3://corpus-bucket/wds?{query}"]
    output = f"s3://out-bucket/captions?{query}"
    job = CaptionJob(
        inputs=inputs,
        output=output,
        engine=EngineConfig(model=tiny_model_dir, keep=16, max_new_tokens=2),
        carry=("url", "caption"),
        batch_size=4,
        progress_every_s=0,
    )
    summary = run(job)
    assert summary["rows_total"] == 3 * 40 + 4 and summary["units_done"] == 4 and summary["rows_ok"] == 3 * 4 + 4

    written = Output(output)
    table = written.read()
    assert_each_source_row_once(table, 3 * 40 + 4)
    assert all(f.startswith("s3://corpus-bucket/") for f in pc.unique(table.column("source_file")).to_pylist())
    tar_rows = table.filter(pc.ends_with(table.column("source_file"), f".tar?{query}")).to_pylist()
    assert {r["source_caption"] for r in tar_rows} == {f"alt {9:05d}{i:04d}" for i in range(4)}  # .txt members
    assert all(r["source_url"].startswith("https://example.com/") for r in tar_rows)  # .json field
    with fs.open_input_stream("out-bucket/captions/_summary.json") as stream:
        assert json.loads(stream.read())["rows_total"] == 3 * 40 + 4

    # resume there: a rerun skips everything; a shard whose record is lost is re-checked, not redone
    assert run(job)["rows_this_run"] == 0
    record = next(p for p in fs.get_file_info(pafs.FileSelector("out-bucket/captions/_units")) if ".done." in p.path)
    fs.delete_file(record.path)
    again = run(job)
    assert again["rows_this_run"] == 0 and again["units_done"] == 4 and again["rows_total"] == 3 * 40 + 4
    assert_each_source_row_once(written.read(), 3 * 40 + 4)
