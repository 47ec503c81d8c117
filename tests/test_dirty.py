"""Dirty corpora on a real local Ray: bad shards, schema drift, runaway prompts, repeated ids."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.batch import CaptionJob, read_output, run
from pipeline.synthetic import img2dataset_samples, small_png, tar_bytes
from tokencarve.engine import EngineConfig, ModelInputs

from .conftest import job_command

pytestmark = pytest.mark.slow  # a real Ray cluster

ROOT = Path(__file__).resolve().parent.parent
RUNAWAY = "Describe every detail of the scene. " * 50_000  # ~350 k tokens


def engine(model: str, **kwargs) -> EngineConfig:
    return EngineConfig(model=model, keep=32, max_new_tokens=4, **kwargs)


def dirty_corpus(folder: Path, at_limit: str) -> dict:
    """A folder of shards as a long crawl leaves them; returns what each shard should give."""
    folder.mkdir(parents=True)
    png = small_png(1)
    pq.write_table(
        pa.table(
            {
                "id": ["ok-1", "dup", "dup", "runaway", "at-limit", "over-limit"],
                "image": [png] * 6,
                "prompt": [None, "What is it?", "What is it?", RUNAWAY, at_limit, at_limit + " please"],
            }
        ),
        folder / "a-good.parquet",
    )
    # schema drift: int64 ids, no prompt column, an extra column, another column order
    pq.write_table(
        pa.table({"url": ["u1", "u2"], "image": [png, png], "id": pa.array([10, 11], pa.int64())}),
        folder / "b-drift.parquet",
    )
    (folder / "c-garbage.parquet").write_bytes(b"\x00garbage from a crashed download")
    pq.write_table(pa.table({"name": ["x"], "image": [png]}), folder / "d-noid.parquet")
    samples = img2dataset_samples(7, 6)
    whole = tar_bytes(samples)
    (folder / "e-cut.tar").write_bytes(whole[: whole.index(samples[5]["jpg"]) + 20])  # cut in the 6th sample
    return {"tar_keys": [s["__key__"] for s in samples[:5]]}


def test_a_dirty_corpus_finishes_and_reports_what_it_could_not_read(ray_cluster, tiny_model_dir, tmp_path):
    inputs = ModelInputs.load(engine(tiny_model_dir))
    at_limit = "Describe the colours and the shapes in this picture."
    limit = inputs.prompt_tokens(at_limit)
    corpus = tmp_path / "corpus"
    expected = dirty_corpus(corpus, at_limit)
    out = tmp_path / "out"
    job = CaptionJob(
        inputs=[str(corpus)],
        output=str(out),
        engine=engine(tiny_model_dir, max_prompt_tokens=limit),
        batch_size=4,
        progress_every_s=0,
    )
    summary = run(job)  # no exception: the bad shards are reported, the rest is captioned

    table = read_output(str(out))
    rows = {(r["source_file"].rsplit("/", 1)[1], r["source_row"]): r for r in table.to_pylist()}
    assert len(rows) == table.num_rows == 6 + 2 + 5  # every readable row once, by (source_file, source_row)
    good = {r["id"]: r for k, r in rows.items() if k[0] == "a-good.parquet"}
    assert good["ok-1"]["caption"] and good["at-limit"]["caption"] and good["at-limit"]["error_code"] is None
    assert good["runaway"]["error_code"] == good["over-limit"]["error_code"] == "prompt_too_long"
    assert "the limit is" in good["runaway"]["error_message"] and good["runaway"]["caption"] is None
    dups = [r for (f, _), r in rows.items() if r["id"] == "dup"]
    assert len(dups) == 2 and {r["source_row"] for r in dups} == {1, 2}  # told apart by source_row
    drift = [r for (f, _), r in rows.items() if f == "b-drift.parquet"]
    assert sorted(r["id"] for r in drift) == ["10", "11"] and all(r["caption"] for r in drift)
    tar = sorted((r["source_row"], r["id"]) for (f, _), r in rows.items() if f == "e-cut.tar")
    assert tar == list(enumerate(expected["tar_keys"]))  # the samples before the damage

    failed = {Path(s["source"]).name: s["error_code"] for s in summary["failed_shards"]}
    assert failed == {
        "c-garbage.parquet": "unreadable_shard",
        "d-noid.parquet": "no_id_column",
        "e-cut.tar": "truncated_shard",
    }
    assert summary["units_failed"] == 3 and summary["units_done"] == 2 and summary["units_total"] == 5
    assert summary["rows_total"] == 13 and summary["errors_by_reason"] == {"prompt_too_long": 2}
    assert summary["repeated_ids"] == 1 and summary["repeated_id_examples"] == ["dup"]
    assert "within each shard" in summary["repeated_ids_scope"]

    # --strict: the same output, rerun by the CLI: the failed shards are retried (and fail again), the
    # rest is skipped; exit status 3, and each bad shard named on stderr
    command = job_command(
        str(corpus),
        str(out),
        tiny_model_dir,
        "--keep",
        "32",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "4",
        "--max-prompt-tokens",
        str(limit),
        "--strict",
        "--address",
        ray_cluster,
    )
    strict = subprocess.run(
        command, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600
    )
    assert strict.returncode == 3, strict.stderr[-3000:]
    assert "failed shard: " in strict.stderr and "c-garbage.parquet: unreadable_shard" in strict.stderr
    again = json.loads(strict.stdout[strict.stdout.index("{") :])
    assert again["rows_this_run"] == 0 and again["rows_total"] == 13 and again["units_failed"] == 3

    # the crawler re-downloads the garbage shard: a rerun picks it up, nothing else is redone
    pq.write_table(
        pa.table({"id": ["fixed-1", "fixed-2"], "image": [small_png(2), b"not an image"]}), corpus / "c-garbage.parquet"
    )
    fixed = run(job)
    assert fixed["rows_this_run"] == 2 and fixed["rows_total"] == 15 and fixed["units_failed"] == 2
    assert fixed["errors_by_reason"] == {"prompt_too_long": 2, "undecodable_image": 1}
    final = read_output(str(out))
    keys = pc.binary_join_element_wise(
        final.column("source_file"), pc.cast(final.column("source_row"), pa.string()), "#"
    )
    assert len(pc.unique(keys)) == final.num_rows == 15


def test_the_context_window_bounds_prompts_without_a_limit(tiny_model_dir):
    inputs = ModelInputs.load(engine(tiny_model_dir))
    assert inputs.prompt_limit() == inputs.context_window - 576 - 4
    assert inputs.prompt_error(RUNAWAY).code == "prompt_too_long"
    assert inputs.prompt_error("What is it?") is None
    assert inputs.prompt_error("Compare <image> with this").code == "invalid_prompt"
