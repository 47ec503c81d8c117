"""Reading dirty shards and keeping the output's books, without Ray (fast)."""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.output import Output, SettingsMismatch, Totals, output_schema
from pipeline.sources import ShardError, plan_units, read_unit
from pipeline.synthetic import img2dataset_samples, small_png, tar_bytes


def read_all(unit, carry=()):
    """(rows, ShardError or None): everything a unit yields before it fails."""
    tables, error = [], None
    try:
        for table in read_unit(unit, carry):
            tables.append(table)
    except ShardError as err:
        error = err
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    return rows, error


def test_units_are_files_with_stable_keys(tmp_path):
    for name in ("b.parquet", "a.parquet"):
        pq.write_table(pa.table({"id": ["x"], "image": [b"1"]}), tmp_path / name)
    (tmp_path / "_ignored.parquet").write_bytes(b"not read")  # like the output's own records
    units = plan_units([str(tmp_path)])
    assert [u.path.rsplit("/", 1)[1] for u in units] == ["a.parquet", "b.parquet"]
    assert [u.key for u in units] == [u.key for u in plan_units([str(tmp_path)])]  # same corpus, same units
    assert units[0].key.startswith("a-") and len({u.key for u in units}) == 2


def test_schema_drift_is_normalised(tmp_path):
    """An int64 id, no prompt column, an extra column and another column order: one schema out."""
    path = tmp_path / "drift.parquet"
    pq.write_table(pa.table({"url": ["u1", "u2"], "image": [b"a", None], "id": pa.array([7, 8], pa.int64())}), path)
    rows, error = read_all(plan_units([str(path)])[0], carry=("url", "missing"))
    assert error is None
    assert [(r["id"], r["prompt"], r["source_url"], r["source_missing"], r["source_row"]) for r in rows] == [
        ("7", None, "u1", None, 0),
        ("8", None, "u2", None, 1),
    ]
    assert rows[0]["source_file"].endswith("drift.parquet")


def test_img2dataset_parquet_and_hugging_face_image_structs(tmp_path):
    pq.write_table(pa.table({"key": ["k1"], "jpg": [b"jpeg bytes"], "caption": ["alt"]}), tmp_path / "i2d.parquet")
    struct = pa.array(
        [{"bytes": b"png bytes", "path": "a.png"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    )
    pq.write_table(pa.table({"id": ["h1"], "image": struct}), tmp_path / "hf.parquet")
    rows, _ = read_all(plan_units([str(tmp_path / "i2d.parquet")])[0], carry=("caption",))
    assert (rows[0]["id"], rows[0]["image"], rows[0]["source_caption"]) == ("k1", b"jpeg bytes", "alt")
    rows, _ = read_all(plan_units([str(tmp_path / "hf.parquet")])[0])
    assert (rows[0]["image"], rows[0]["image_path"]) == (b"png bytes", "a.png")


@pytest.mark.parametrize(
    "content,columns,code",
    [
        (b"PAR1 this is not parquet", None, "unreadable_shard"),
        (b"", None, "unreadable_shard"),
        (None, {"name": ["x"], "image": [b"1"]}, "no_id_column"),
        (None, {"id": ["x"], "caption": ["no image here"]}, "no_image_column"),
    ],
)
def test_a_bad_shard_is_a_shard_error(tmp_path, content, columns, code):
    path = tmp_path / "bad.parquet"
    if content is not None:
        path.write_bytes(content)
    else:
        pq.write_table(pa.table(columns), path)
    rows, error = read_all(plan_units([str(path)])[0])
    assert rows == [] and error.code == code and str(path) in error.message


def test_a_truncated_tar_keeps_the_samples_before_the_damage(tmp_path):
    samples = img2dataset_samples(3, 6)
    whole = tar_bytes(samples)
    (tmp_path / "whole.tar").write_bytes(whole)
    rows, error = read_all(plan_units([str(tmp_path / "whole.tar")])[0])
    assert error is None and [r["id"] for r in rows] == [s["__key__"] for s in samples]

    # cut inside the 5th sample's image: samples 0-3 are whole, the 5th is dropped with the damage
    cut = whole.index(samples[4]["jpg"]) + 10
    (tmp_path / "cut.tar").write_bytes(whole[:cut])
    rows, error = read_all(plan_units([str(tmp_path / "cut.tar")])[0])
    assert [r["id"] for r in rows] == [s["__key__"] for s in samples[:4]]
    assert [r["source_row"] for r in rows] == [0, 1, 2, 3]
    assert error.code == "truncated_shard" and "after sample" in error.message


def test_webdataset_carries_img2dataset_members_and_json_fields(tmp_path):
    samples = img2dataset_samples(1, 2)
    samples[1]["prompt"] = b"What is this?"
    (tmp_path / "s.tar").write_bytes(tar_bytes(samples))
    rows, _ = read_all(plan_units([str(tmp_path / "s.tar")])[0], carry=("key", "caption", "url", "json", "width"))
    first = rows[0]
    assert first["source_key"] == samples[0]["__key__"] == first["id"]
    assert first["source_caption"] == samples[0]["txt"].decode()  # caption -> the .txt member
    assert first["source_url"] == json.loads(samples[0]["json"])["url"]  # a field of the .json member
    assert json.loads(first["source_json"])["key"] == first["id"] and first["source_width"] == "24"
    assert first["image"] == samples[0]["jpg"] and rows[1]["prompt"] == "What is this?"


def test_image_folders_are_chunked_into_units(tmp_path, monkeypatch):
    import pipeline.sources as sources

    monkeypatch.setattr(sources, "IMAGES_PER_UNIT", 2)
    for name in ("a.png", "b.png", "sub/c.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(small_png(0))
    units = plan_units([str(tmp_path)], "images")
    assert [len(u.files) for u in units] == [2, 1]
    rows = [r for u in units for r in read_all(u)[0]]
    assert [r["id"] for r in rows] == ["a.png", "b.png", "sub/c.png"] and rows[2]["image_path"].endswith("c.png")


def test_output_refuses_another_setting(tmp_path):
    out = Output(str(tmp_path / "out"))
    settings = {"model": "m", "method": "tokencarve", "keep": 64, "carry": []}
    out.claim(settings)
    out.claim(dict(settings))  # the same setting resumes
    with pytest.raises(SettingsMismatch, match="keep=64 carry=\\[\\]; this run is .* keep=128"):
        out.claim(settings | {"keep": 128})
    with pytest.raises(SettingsMismatch, match="carry"):
        out.claim(settings | {"carry": ["url"]})
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    pq.write_table(pa.table({"id": ["x"]}), legacy / "part-x.parquet")
    with pytest.raises(SettingsMismatch, match="not written by this version"):
        Output(str(legacy)).claim(settings)


def test_totals_add_up_and_parts_are_named_by_their_rows(tmp_path):
    rows = [
        {
            "id": "a",
            "caption": "c",
            "visual_tokens_in": 576,
            "visual_tokens_kept": 64,
            "kv_bytes_held": 10,
            "kv_bytes_uncompressed": 90,
            "generated_tokens": 3,
            "answer": "c",
            "correct": True,
            "source_row": 0,
        },
        {"id": "b", "error_code": "missing_image", "error_message": "no image", "source_row": 1},
        {"id": "c", "error_code": "missing_image", "error_message": "no image", "source_row": 2},
    ]
    table = pa.Table.from_pylist(rows, schema=output_schema())
    totals = Totals.of(table)
    assert (totals.rows, totals.rows_ok, totals.errors_by_reason) == (3, 1, {"missing_image": 2})
    assert (totals.visual_tokens_kept, totals.kv_bytes_held, totals.rows_correct) == (64, 10, 1)
    assert Totals.of(table).add(totals).rows == 6

    out = Output(str(tmp_path / "out"))
    name = out.write_part("u", table, "run1")
    assert out.write_part("u", table, "run1") == name  # the same rows: the same file, rewritten
    assert out.unit_rows("u", ["source_row"], before_run="run1") is None  # this run's parts are not "earlier"
    assert out.unit_rows("u", ["source_row"], before_run="run2").num_rows == 3
    assert [p.rsplit("/", 1)[1] for p in out.unit_parts("u")] == [name]


def test_finishing_a_unit_merges_its_parts_and_drops_rows_written_twice(tmp_path):
    """What a task re-run on a lost node can leave: the same source row in two parts."""
    from pipeline.books import finish_unit
    from pipeline.job import CaptionJob
    from pipeline.records import UnitEnd
    from tokencarve.engine import EngineConfig

    def rows(numbers):
        return pa.Table.from_pylist(
            [
                {
                    "id": f"r{n}",
                    "error_code": "missing_image",
                    "error_message": "none",
                    "source_file": "s.parquet",
                    "source_row": n,
                }
                for n in numbers
            ],
            schema=output_schema(),
        )

    job = CaptionJob(inputs=[], output=str(tmp_path / "out"), engine=EngineConfig(model="m"), run_id="run2")
    out = Output(job.output)
    out.write_part("u", rows([0, 1, 2]), "run1")
    out.write_part("u", rows([2, 3]), "run2")
    end = UnitEnd(
        unit="u",
        source="s.parquet",
        rows=4,
        to_caption=0,
        refused={},
        shard_error=None,
        repeated_ids=0,
        repeated_id_examples=[],
    )
    finish_unit(out, end, job)
    assert len(out.unit_parts("u")) == 1
    assert sorted(out.unit_rows("u", ["source_row"]).column("source_row").to_pylist()) == [0, 1, 2, 3]
    record = json.loads((tmp_path / "out" / "_units" / "u.done.json").read_text())
    assert record["totals"]["rows"] == 4 and record["totals"]["errors_by_reason"] == {"missing_image": 4}

    end = replace(end, rows=5)  # a row the reader read is missing: not done, a rerun completes it
    finish_unit(out, end, job)
    assert not (tmp_path / "out" / "_units" / "u.done.json").exists()
    assert json.loads((tmp_path / "out" / "_units" / "u.failed.json").read_text())["error_code"] == "incomplete_unit"
