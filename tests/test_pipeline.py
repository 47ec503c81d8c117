"""The Ray Data captioning job end to end, on a real local Ray cluster with a tiny model."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import subprocess
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.batch import CaptionJob, SettingsMismatch, read_output, run
from pipeline.output import Output
from tokencarve.engine import DEFAULT_METHOD, EngineConfig

from .bad_images import broken_images, encode, gradient, valid_images
from .conftest import job_command, wait_until

pytestmark = pytest.mark.slow  # a real Ray cluster

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 2 * 1024 * 1024


def write_corpus(folder: Path) -> dict[str, str | None]:
    """A corpus of every input kind with good and bad rows; returns {id: expected error code}."""
    folder.mkdir(parents=True)
    expected: dict[str, str | None] = {}
    rows = []
    for name, data in valid_images().items():
        rows.append({"id": f"pq/{name}", "image": data, "image_path": None, "prompt": "What is in the image ?"})
        expected[f"pq/{name}"] = None
    for name, (data, code) in broken_images().items():
        rows.append({"id": f"pq/{name}", "image": data, "image_path": None, "prompt": None})
        expected[f"pq/{name}"] = code
    (folder / "files").mkdir()
    (folder / "files" / "on-disk.png").write_bytes(valid_images()["square-336"])
    rows.append(
        {"id": "pq/by-path", "image": None, "image_path": str(folder / "files" / "on-disk.png"), "prompt": None}
    )
    rows.append({"id": "pq/bad-path", "image": None, "image_path": str(folder / "nowhere.png"), "prompt": None})
    expected.update({"pq/by-path": None, "pq/bad-path": "unreadable_path"})
    pq.write_table(pa.Table.from_pylist(rows[:10]), folder / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[10:]), folder / "b.parquet")

    # A Parquet file whose image column has the wrong type.
    wrong = folder / "wrong"
    wrong.mkdir()
    pq.write_table(pa.table({"id": ["wrong/int"], "image": [7]}), wrong / "c.parquet")
    expected["wrong/int"] = "wrong_type"

    # A folder of image files (one of them is not an image).
    images = folder / "images"
    (images / "sub").mkdir(parents=True)
    (images / "cat.jpg").write_bytes(encode(gradient(50, 80), "JPEG"))
    (images / "sub" / "dog.png").write_bytes(valid_images()["palette-png"])
    (images / "notes.txt").write_bytes(b"not an image")
    expected.update({"cat.jpg": None, "sub/dog.png": None, "notes.txt": "undecodable_image"})

    # A WebDataset shard.
    shards = folder / "wds"
    shards.mkdir()
    with tarfile.open(shards / "shard-000.tar", "w") as tar:
        for key, suffix, data in [
            ("wds-1", "jpg", encode(gradient(64, 64), "JPEG")),
            ("wds-1", "prompt", b"Describe the image ."),
            ("wds-2", "png", valid_images()["rgba-png"]),
            ("wds-3", "jpg", b"garbage"),
        ]:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    expected.update({"wds-1": None, "wds-2": None, "wds-3": "undecodable_image"})
    return expected


def corpus_inputs(folder: Path) -> list[str]:
    return [
        str(folder / "a.parquet"),
        str(folder / "b.parquet"),
        str(folder / "wrong"),
        str(folder / "images"),
        str(folder / "wds"),
    ]


def job(tiny_model_dir, folder, output, **kwargs) -> CaptionJob:
    engine = EngineConfig(model=tiny_model_dir, keep=32, max_new_tokens=4)
    return CaptionJob(
        inputs=corpus_inputs(folder),
        output=str(output),
        engine=engine,
        batch_size=4,
        max_image_bytes=LIMIT,
        rows_per_file=8,
        **kwargs,
    )


def test_every_input_row_gives_exactly_one_output_row(ray_cluster, tiny_model_dir, tmp_path):
    expected = write_corpus(tmp_path / "corpus")
    summary = run(job(tiny_model_dir, tmp_path / "corpus", tmp_path / "out"))
    table = read_output(str(tmp_path / "out"))
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(expected)  # every row, once
    sources = list(zip(table.column("source_file").to_pylist(), table.column("source_row").to_pylist()))
    assert len(set(sources)) == len(sources) and all(f and r >= 0 for f, r in sources)
    for row in table.to_pylist():
        code = expected[row["id"]]
        if code is None:
            assert row["error_code"] is None and row["error_message"] is None and row["caption"], row
            assert row["visual_tokens_in"] == 576 and row["visual_tokens_kept"] == 32
            assert row["kv_bytes_held"] < row["kv_bytes_uncompressed"]
            assert row["generated_tokens"] == 4 and row["method"] == DEFAULT_METHOD and row["keep"] == "32"
        else:
            assert row["error_code"] == code and row["error_message"], row
            assert row["caption"] is None
    ok = sum(code is None for code in expected.values())
    assert summary["rows_total"] == len(expected) and summary["rows_ok"] == ok
    assert summary["rows_failed"] == len(expected) - ok and summary["rows_this_run"] == len(expected)
    assert summary["visual_tokens_kept_pct"] == pytest.approx(100 * 32 / 576, abs=0.01)
    assert summary["kv_bytes_saved"] > 0 and summary["rows_per_s"] > 0
    assert "CaptionActor" in summary["ray_data_stats"]  # Ray Data's per-operator stats are kept
    assert table.column("correct").null_count == len(expected) and summary["accuracy_pct"] is None  # no answers
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["rows_total"] == len(expected)

    again = run(job(tiny_model_dir, tmp_path / "corpus", tmp_path / "out"))  # a rerun: nothing to do
    assert again["rows_this_run"] == 0 and again["rows_skipped_as_done"] == len(expected)
    assert sorted(read_output(str(tmp_path / "out")).column("id").to_pylist()) == sorted(expected)

    # another budget or method into the same output is refused before any work; the output is untouched
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    other_budget = job(tiny_model_dir, tmp_path / "corpus", tmp_path / "out")
    other_budget.engine = EngineConfig(model=tiny_model_dir, keep=16, max_new_tokens=4)
    with pytest.raises(
        SettingsMismatch, match=f"keep=32 carry=\\[\\]; this run is model=.* method={DEFAULT_METHOD} keep=16"
    ):
        run(other_budget)
    other_budget.engine = EngineConfig(model=tiny_model_dir, method="none", max_new_tokens=4)
    with pytest.raises(SettingsMismatch, match="method=none keep=None"):
        run(other_budget)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


@pytest.mark.filterwarnings("ignore")
def test_job_refuses_to_mix_settings_in_one_output(tiny_model_dir, tmp_path, capsys):
    """The job checks before starting Ray: exit status 2, the reason on stderr, nothing written."""
    spec = importlib.util.spec_from_file_location("caption_corpus", ROOT / "jobs" / "caption_corpus.py")
    caption_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(caption_corpus)
    output = tmp_path / "out"
    Output(str(output)).claim({"model": Path(tiny_model_dir).name, "method": "tokencarve", "keep": 64, "carry": []})
    before = sorted(p.name for p in output.iterdir())
    code = caption_corpus.main(["--output", str(output), "--model", tiny_model_dir, "--keep", "128"])
    assert code == 2 and sorted(p.name for p in output.iterdir()) == before
    assert "already holds rows written with model=" in capsys.readouterr().err


def test_reference_answers_are_scored(ray_cluster, tmp_path):
    """A corpus with an `answer` column (the bundled sample) gets a per-row verdict and an accuracy,
    by the evaluation harness's rules, from the trained carve-tiny model."""
    from tokencarve.eval.scoring import correct

    sample = pq.read_table(sorted((ROOT / "data" / "sample").glob("*.parquet"))[0]).slice(0, 12)
    (tmp_path / "in").mkdir()
    pq.write_table(sample, tmp_path / "in" / "sample.parquet")
    engine = EngineConfig(model=str(ROOT / "models" / "carve-tiny"), keep=128, max_new_tokens=40)
    summary = run(CaptionJob(inputs=[str(tmp_path / "in")], output=str(tmp_path / "out"), engine=engine, batch_size=6))
    rows = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    assert sorted(rows) == sorted(sample.column("id").to_pylist())
    for expected in sample.to_pylist():
        row = rows[expected["id"]]
        assert row["answer"] == expected["answer"] and row["correct"] == correct(row["caption"], expected["answer"])
    verdicts = [r["correct"] for r in rows.values()]
    assert summary["rows_with_answers"] == 12
    assert summary["accuracy_pct"] == pytest.approx(100 * sum(verdicts) / 12, abs=0.01)
    assert summary["accuracy_pct"] >= 50  # the trained model answers (81 % uncompressed on fresh questions)


def test_no_carve_runs_the_stock_model(ray_cluster, tiny_model_dir, tmp_path):
    write_corpus(tmp_path / "corpus")
    stock = job(tiny_model_dir, tmp_path / "corpus", tmp_path / "out")
    stock.inputs = [str(tmp_path / "corpus" / "images")]
    stock.engine = EngineConfig(model=tiny_model_dir, method="none", max_new_tokens=4)
    run(stock)
    rows = [r for r in read_output(str(tmp_path / "out")).to_pylist() if r["error_code"] is None]
    assert rows and all(r["visual_tokens_kept"] == r["visual_tokens_in"] == 576 and r["keep"] is None for r in rows)
    assert all(r["kv_bytes_held"] == r["kv_bytes_uncompressed"] for r in rows)


def test_killed_job_resumes_without_losing_or_duplicating_rows(ray_cluster, tiny_model_dir, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    rows = [{"id": f"row-{i:03d}", "image": encode(gradient(30 + i, 40), "PNG"), "prompt": None} for i in range(96)]
    pq.write_table(pa.Table.from_pylist(rows), folder / "big.parquet", row_group_size=8)
    output = tmp_path / "out"
    command = job_command(
        str(folder),
        str(output),
        tiny_model_dir,
        "--keep",
        "16",
        "--max-new-tokens",
        "64",
        "--batch-size",
        "2",
        "--rows-per-file",
        "2",
        "--address",
        ray_cluster,
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    first = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    wait_until(lambda: len(list(output.glob("*/part-*.parquet"))) >= 2, 300, "the first parts")
    os.killpg(first.pid, signal.SIGKILL)  # the driver dies mid-run; Ray then stops its tasks
    first.wait()
    # Ray cancels the dead driver's tasks; wait until no part appears for a while before counting
    counts = []
    wait_until(
        lambda: counts.append(len(list(output.glob("*/part-*.parquet")))) or counts[-3:] == [counts[-1]] * 3,
        120,
        "the killed run's tasks to stop writing",
        interval=1.0,
    )
    partial = read_output(str(output)).column("id").to_pylist()
    assert 0 < len(partial) < len(rows) and len(partial) == len(set(partial))

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout[second.stdout.index("{") :])
    ids = read_output(str(output)).column("id").to_pylist()
    assert sorted(ids) == [r["id"] for r in rows]  # every id exactly once
    assert summary["rows_skipped_as_done"] == len(partial) and summary["rows_this_run"] == len(rows) - len(partial)
    assert summary["units_done"] == 1
