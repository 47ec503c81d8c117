"""The failure policy (docs/CLUSTER.md, "When captioning fails"), with faults injected through the job's
test hook (TOKENCARVE_INJECT_FAULTS) on a real local Ray: a row that makes generation raise is an error
row whatever its block's size; a worker fault restarts the actor and retries the block, a bounded number
of times, then the block's rows are error rows. Every source row exactly once, exit status 0. Rows that
keep failing generation stop the job (exit status 4) with their units unfinished, and a rerun captions
them."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.batch import read_output
from pipeline.caption import CaptionActor
from pipeline.faults import FAULTS_ENV
from pipeline.job import CaptionJob
from pipeline.output import Output
from pipeline.prepare import prepare_unit
from pipeline.sources import plan_units
from pipeline.synthetic import small_png
from tokencarve.engine import EngineConfig

from .conftest import job_command

pytestmark = pytest.mark.slow  # a real Ray cluster

ROOT = Path(__file__).resolve().parent.parent


def shard(folder: Path, name: str, rows: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"{name}-{i}" for i in range(rows)]
    pq.write_table(pa.table({"id": ids, "image": [small_png(i) for i in range(rows)]}), folder / f"{name}.parquet")
    return ids


def run_job(corpus: Path, out: Path, model: str, address: str, faults: str, *options: str):
    command = job_command(
        str(corpus), str(out), model, "--keep", "16", "--max-new-tokens", "2", "--batch-size", "4",
        "--progress-every", "0", "--address", address, *options,
    )  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{FAULTS_ENV: faults})
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    summary = json.loads(done.stdout[done.stdout.index("{") :]) if "{" in done.stdout else None
    return done, summary


def results(out: Path) -> dict[str, dict]:
    table = read_output(str(out))
    keys = list(zip(table.column("source_file").to_pylist(), table.column("source_row").to_pylist()))
    assert len(set(keys)) == len(keys) == table.num_rows  # each source row once
    return {r["id"]: r for r in table.to_pylist()}


def test_a_one_row_block_whose_generation_raises_is_an_error_row(ray_cluster, tiny_model_dir, tmp_path, monkeypatch):
    """The case that used to re-raise (and fail the job): the failing row is alone in its block."""
    shard(tmp_path / "in", "tail", 1)
    monkeypatch.setenv(FAULTS_ENV, "raise@tail-0")
    engine = EngineConfig(model=tiny_model_dir, keep=16, max_new_tokens=2)
    job = CaptionJob(inputs=[str(tmp_path / "in")], output=str(tmp_path / "out"), engine=engine, run_id="r")
    block = next(prepare_unit(plan_units(job.inputs)[0], job))  # the row and its unit's end, as Ray passes them
    rows = CaptionActor(job).__call__(block).to_pylist()
    assert [(r["id"], r["error_code"]) for r in rows] == [("tail-0", "generation_failed"), (None, None)]
    assert "injected" in rows[0]["error_message"] and rows[0]["caption"] is None


def test_rows_whose_generation_raises_become_error_rows(ray_cluster, tiny_model_dir, tmp_path):
    corpus = tmp_path / "corpus"
    ids = shard(corpus, "a", 9) + shard(corpus, "b", 1)  # blocks of 4: a's tail and b are one row each
    failing = {"a-2", "a-8", "b-0"}  # mid-block, a shard's one-row tail, a shard's only row
    done, summary = run_job(
        corpus, tmp_path / "out", tiny_model_dir, ray_cluster, ",".join(f"raise@{i}" for i in failing)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = results(tmp_path / "out")
    assert sorted(rows) == sorted(ids)
    for row_id, row in rows.items():
        if row_id in failing:
            assert row["error_code"] == "generation_failed" and "injected" in row["error_message"], row
        else:
            assert row["error_code"] is None and row["caption"], row  # the block's other rows are captioned
    assert summary["errors_by_reason"] == {"generation_failed": 3} and summary["rows_ok"] == len(ids) - 3
    assert summary["units_done"] == 2 and summary["units_failed"] == 0 and summary["rows_worker_failed"] == 0


def test_worker_faults_restart_the_actor_and_a_block_that_keeps_failing_becomes_error_rows(
    ray_cluster, tiny_model_dir, tmp_path
):
    corpus = tmp_path / "corpus"
    ids = shard(corpus, "c", 8) + shard(corpus, "d", 3)
    faults = "kill@c-1#1,oom@c-6,kill@d-1"  # killed once then fine; out of memory always; killed always
    done, summary = run_job(corpus, tmp_path / "out", tiny_model_dir, ray_cluster, faults, "--block-attempts", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = results(tmp_path / "out")
    assert sorted(rows) == sorted(ids)  # nothing lost, nothing twice, across four actor deaths

    # the block killed once was retried on a restarted actor and captioned
    assert all(rows[f"c-{i}"]["error_code"] is None and rows[f"c-{i}"]["caption"] for i in range(4))
    # the blocks that failed on both attempts are error rows, saying why
    gave_up = {i for i, r in rows.items() if r["error_code"] == "worker_failed"}
    assert {"c-6", "d-1"} <= gave_up and len(gave_up) <= 8  # the two blocks' rows, at most 4 each
    assert "2 attempt(s)" in rows["c-6"]["error_message"] and "OutOfMemoryError" in rows["c-6"]["error_message"]
    assert "died" in rows["d-1"]["error_message"]
    assert all(rows[i]["caption"] for i in rows if i not in gave_up)
    assert (
        summary["errors_by_reason"]
        == {"worker_failed": len(gave_up)}
        == {"worker_failed": summary["rows_worker_failed"]}
    )
    assert summary["rows_ok"] == len(ids) - len(gave_up) and summary["units_done"] == 2
    assert "worker_failed error rows" in done.stderr


def test_a_systemic_failure_stops_the_job_and_a_rerun_captions_every_row(ray_cluster, tiny_model_dir, tmp_path):
    """Every row failing generation (a broken setting, say): the job stops with exit status 4, the count
    and the first error, instead of writing a corpus of error rows recorded done; no unit holding such
    rows is recorded done, and the same command without the fault captions every row, once, the failed
    rows written before the stop included."""
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    ids = shard(corpus, "e", 3) + shard(corpus, "f", 6) + shard(corpus, "g", 5)
    # a stop at more than 4 failed rows of an actor's last 8; parts written per 4 rows, so that failed rows
    # reach storage while the actor restarts after f's first block kills it (which also empties its window:
    # the driver takes back e's record, if it wrote one, all the same)
    options = ("--failure-window", "8", "--max-failure-share", "0.5", "--rows-per-file", "4")
    done, summary = run_job(corpus, out, tiny_model_dir, ray_cluster, "kill@f-0#1,raise@*", *options)
    assert done.returncode == 4, done.stderr[-3000:]
    assert summary is None  # no summary of a stopped run
    stopped = re.search(r"error: the job stopped: (\d+) of the last (\d+) rows an actor captioned failed", done.stderr)
    assert stopped and 4 < int(stopped[1]) <= int(stopped[2]) <= 8, done.stderr[-3000:]
    assert "The first of them: RuntimeError: generation failed (injected for row" in done.stderr
    assert [status for _, status in Output(str(out)).unit_statuses() if status == "done"] == []
    written = read_output(str(out))  # what reached storage before the stop: failed rows, in unfinished units
    assert written.num_rows >= 3 and set(written.column("error_code").to_pylist()) == {"generation_failed"}

    done, summary = run_job(corpus, out, tiny_model_dir, ray_cluster, "", *options)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = results(out)
    assert sorted(rows) == sorted(ids)  # one row per input row: the failed ones replaced, none twice
    assert all(r["error_code"] is None and r["caption"] for r in rows.values())
    assert summary["rows_ok"] == summary["rows_total"] == len(ids) and summary["errors_by_reason"] == {}
    assert summary["units_done"] == 3 and summary["units_failed"] == 0
