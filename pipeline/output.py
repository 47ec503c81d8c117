"""A job's output: where rows and records go, what is finished, and the totals, in bounded memory.

    <output>/_job.json                  the setting that owns the output (the engine's whole setting, the
                                        model's identity, carried columns) and the layout's FORMAT_VERSION
    <output>/<unit>/part-*.parquet      the output rows of one input unit, one row per input row
    <output>/_units/<unit>.<status>.json  a finished unit (status done or failed): its totals, its shard error
    <output>/_summary.json              the sum of every unit record (written at the end of each run)

Parquet readers skip names starting with `_` or `.`, so `pq.read_table(<output>)` reads the rows
only. A part is written under a hidden name and renamed: it is complete or absent. Its name comes
from the rows it holds, so a retried task rewrites the same file instead of adding a copy. A unit
record is written last, after its rows: a rerun skips units that have one (a listing of `_units/`,
one name per unit) and re-checks the rows of the others, one unit at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .sources import carried_name

# 3: _job.json holds the engine's whole setting and the model's identity; 4: `keep` is the budget as
# written (a string: "64", "0.1", "auto:64,tau=0.93"), unit totals count rows by visual tokens kept
FORMAT_VERSION = 4
JOB_FILE, SUMMARY_FILE, UNITS_DIR = "_job.json", "_summary.json", "_units"

OUTPUT_FIELDS = [
    ("id", pa.string()),
    ("caption", pa.string()),
    # null when the row has a caption; else a low-cardinality reason and a message for people
    ("error_code", pa.string()),
    ("error_message", pa.string()),
    ("prompt", pa.string()),
    ("model", pa.string()),
    ("method", pa.string()),
    # the budget per image as written: tokens ("64"), a fraction of them ("0.1") or adaptive with its
    # calibrated tau ("auto:64,tau=0.93"); null: the stock model
    ("keep", pa.string()),
    ("visual_tokens_in", pa.int32()),
    ("visual_tokens_kept", pa.int32()),
    ("kv_bytes_held", pa.int64()),
    ("kv_bytes_uncompressed", pa.int64()),
    ("generated_tokens", pa.int32()),
    ("prompt_tokens", pa.int32()),
    ("latency_s", pa.float64()),
    # with a reference answer in the input: it, and whether the caption matches it (tokencarve.eval's rules)
    ("answer", pa.string()),
    ("correct", pa.bool_()),
    # where the row came from: (source_file, source_row) is unique, even when ids repeat
    ("source_file", pa.string()),
    ("source_row", pa.int64()),
]
# what a unit's totals are computed from (never the captions)
TOTALS_COLUMNS = [
    "source_row",
    "error_code",
    "visual_tokens_in",
    "visual_tokens_kept",
    "kv_bytes_held",
    "kv_bytes_uncompressed",
    "generated_tokens",
    "correct",
]


def output_schema(carry: tuple[str, ...] = ()) -> pa.Schema:
    return pa.schema(OUTPUT_FIELDS + [(carried_name(c), pa.string()) for c in carry])


class SettingsMismatch(ValueError):
    """The output already belongs to another setting (model, method, budget, generation, carried
    columns, ...), or was written in another layout."""


# a row whose generation raised: final in a finished unit, captioned again when its unit is resumed
GENERATION_FAILED = "generation_failed"

HEADLINE = ("model", "method", "keep", "carry")  # what a refusal names first; every difference follows


def _headline(settings: dict) -> str:
    return " ".join(f"{k}={settings[k]}" for k in HEADLINE if k in settings)


def _differences(held: dict, new: dict) -> str:
    names = sorted(k for k in held.keys() | new.keys() if held.get(k) != new.get(k))
    return "differs in " + ", ".join(f"{k}: {held.get(k)!r} then, {new.get(k)!r} now" for k in names)


def _check_format(location: str, version) -> None:
    """Refuse a layout this version cannot resume, saying what to do."""
    if version == FORMAT_VERSION:
        return
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise SettingsMismatch(
            f"{location} was written by a newer version of the job (output format {version}; this one "
            f"reads format {FORMAT_VERSION}): upgrade tokencarve to resume it, or write to a new --output"
        )
    raise SettingsMismatch(
        f"{location} was written by an older version of the job (output format {version}; this one "
        f"writes format {FORMAT_VERSION}): its rows stay readable, but it cannot be resumed. Write to a new "
        "--output, or finish it with the version that started it"
    )


@dataclass
class Totals:
    """Counts and sums over output rows; adding two Totals is adding their rows."""

    rows: int = 0
    rows_ok: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    visual_tokens_in: int = 0
    visual_tokens_kept: int = 0
    kv_bytes_held: int = 0
    kv_bytes_uncompressed: int = 0
    generated_tokens: int = 0
    rows_with_answers: int = 0
    rows_correct: int = 0
    # captioned rows by their visual tokens kept ({"64": 812, ...}): the distribution the summary's
    # p50 / p95 come from; as many keys as distinct counts (an adaptive budget's are multiples of 8)
    rows_by_visual_tokens_kept: dict[str, int] = field(default_factory=dict)

    def add(self, other: Totals) -> Totals:
        for name, value in asdict(other).items():
            if isinstance(value, dict):  # counts by key: errors by reason, rows by tokens kept
                counts = getattr(self, name)
                for key, count in value.items():
                    counts[key] = counts.get(key, 0) + count
            else:
                setattr(self, name, getattr(self, name) + value)
        return self

    @classmethod
    def of(cls, table: pa.Table) -> Totals:
        """Vectorised over the numeric columns of output rows."""
        ok = pc.is_null(table.column("error_code"))
        good = table.filter(ok)
        reasons = pc.value_counts(table.column("error_code").drop_null())

        def total(name):
            return int(pc.sum(good.column(name)).as_py() or 0)

        answered = good.column("correct").drop_null()
        kept = pc.value_counts(good.column("visual_tokens_kept").drop_null()).to_pylist() if len(good) else []
        return cls(
            rows=len(table),
            rows_ok=len(good),
            errors_by_reason={r["values"]: r["counts"] for r in reasons.to_pylist()},
            visual_tokens_in=total("visual_tokens_in"),
            visual_tokens_kept=total("visual_tokens_kept"),
            kv_bytes_held=total("kv_bytes_held"),
            kv_bytes_uncompressed=total("kv_bytes_uncompressed"),
            generated_tokens=total("generated_tokens"),
            rows_with_answers=len(answered),
            rows_correct=int(pc.sum(answered).as_py() or 0),
            rows_by_visual_tokens_kept={str(k["values"]): k["counts"] for k in sorted(kept, key=lambda k: k["values"])},
        )

    @classmethod
    def from_dict(cls, values: dict) -> Totals:
        return cls(**values)


def _part_run(path: str) -> str:
    return path.rsplit("/", 1)[-1].split("-")[1]  # part-<run>-<first row>-<digest>.parquet


def _location(output: str) -> str:
    return output if "://" in output else os.path.abspath(output)


class Output:
    """One output folder or prefix on any pyarrow filesystem."""

    def __init__(self, location: str):
        self.location = location
        self.fs, self.root = pafs.FileSystem.from_uri(_location(location))
        self.root = self.root.rstrip("/")
        self._schema: pa.Schema | None = None

    # -- settings -------------------------------------------------------------------------------------

    def settings(self) -> dict | None:
        return self._read_json(JOB_FILE)

    def schema(self) -> pa.Schema:
        """The output's columns (the carried ones named in _job.json), read once per Output: the
        driver finishes every unit through one Output, and a claimed output's settings never change."""
        if self._schema is None:
            settings = self.settings()
            if settings is None:  # nothing claimed yet: the columns every output has
                return output_schema()
            self._schema = output_schema(tuple(settings.get("carry", ())))
        return self._schema

    def claim(self, settings: dict, defaults: dict | None = None, upgrade=None) -> None:
        """Make the output this job's, or refuse: an output holds the rows of one setting only
        (a resumed run with another budget would mix two runs in one output and one summary), and of
        one layout (FORMAT_VERSION). `defaults`: what a setting the held claim lacks stands for (one
        added to the engine since the output was claimed: tokencarve.settings.claim_defaults).
        `upgrade`: (held claim, this run's settings) -> the held claim in today's form, where a setting's
        recorded form changed or what it left unknown can now be told (tokencarve.settings.upgrade_claim:
        the model fingerprint, a hub id's revision, runtime-only settings older claims recorded)."""
        settings = json.loads(json.dumps(settings, default=str))  # as _job.json will hold it
        held = self.settings()
        if held is None:
            if self._has_rows():
                raise SettingsMismatch(
                    f"{self.location} holds Parquet files but no {JOB_FILE}: it was not written "
                    "by this version of the job; write to a new --output"
                )
            self.fs.create_dir(self.root, recursive=True)
            self._write_json(JOB_FILE, {"format_version": FORMAT_VERSION, **settings})
            return
        recorded = dict(held)
        _check_format(self.location, recorded.pop("format_version", None))
        held = upgrade(recorded, settings) if upgrade is not None else recorded
        upgraded = held != recorded
        held = held | {k: v for k, v in (defaults or {}).items() if k not in held and k in settings}
        if held != settings:
            raise SettingsMismatch(
                f"{self.location} already holds rows written with {_headline(held)}; this run is "
                f"{_headline(settings)} ({_differences(held, settings)}). "
                "Write to a new --output (or remove that one) rather than mix settings in one output"
            )
        if upgraded:  # an older or less complete form that matched: record today's, so the next run compares it
            self._write_json(JOB_FILE, {"format_version": FORMAT_VERSION, **settings})

    def _has_rows(self) -> bool:
        if self.fs.get_file_info(self.root).type == pafs.FileType.NotFound:
            return False
        listing = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True))
        return any(f.path.endswith(".parquet") for f in listing)

    # -- rows -------------------------------------------------------------------------------------------

    def write_part(self, unit: str, table: pa.Table, run: str) -> str:
        """Write one unit's rows as a part named after the run and the rows it holds; returns the name."""
        rows = table.column("source_row").to_numpy()
        digest = hashlib.sha1(np.sort(rows).astype("<i8").tobytes()).hexdigest()[:16]
        name = f"part-{run}-{int(rows.min()):09d}-{digest}.parquet"
        folder = f"{self.root}/{unit}"
        self.fs.create_dir(folder, recursive=True)
        temp = f"{folder}/.{name}.tmp"
        pq.write_table(table, temp, filesystem=self.fs)
        self.fs.move(temp, f"{folder}/{name}")
        return name

    def unit_parts(self, unit: str) -> list[str]:
        """Paths of the unit's parts."""
        folder = f"{self.root}/{unit}"
        if self.fs.get_file_info(folder).type == pafs.FileType.NotFound:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(folder))
        return sorted(i.path for i in infos if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))

    def unit_rows(self, unit: str, columns: list[str] | None, before_run: str | None = None) -> pa.Table | None:
        """The rows written for one unit (these columns only), or None if there are none; with
        `before_run`, only those of earlier runs (what a retried task of this run must see is what
        its first attempt saw, whatever that attempt wrote since)."""
        parts = [p for p in self.unit_parts(unit) if before_run is None or not _part_run(p) == before_run]
        if not parts:
            return None
        schema = self.schema()
        return pads.dataset(parts, filesystem=self.fs, format="parquet", schema=schema).to_table(columns=columns)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """Every row written so far (tests and small outputs; a large one is read with Ray Data or DuckDB)."""
        schema = self.schema()
        if self.fs.get_file_info(self.root).type == pafs.FileType.NotFound:
            empty = schema.empty_table()
            return empty if columns is None else empty.select(columns)
        return pads.dataset(self.root, filesystem=self.fs, format="parquet", schema=schema).to_table(columns=columns)

    # -- unit records -----------------------------------------------------------------------------------

    def finish_unit(self, record: dict) -> None:
        """Record a unit as done or failed (replacing an earlier record of it)."""
        for status in ("done", "failed"):
            if status != record["status"]:
                self._delete(f"{UNITS_DIR}/{record['unit']}.{status}.json")
        self._write_json(f"{UNITS_DIR}/{record['unit']}.{record['status']}.json", record)

    def reopen_unit(self, unit: str) -> None:
        """Take back a unit's done record: a rerun re-checks the unit (a job stopped by a systemic
        failure reopens the units of the rows that failed, so that the rerun captions them again)."""
        self._delete(f"{UNITS_DIR}/{unit}.done.json")

    def unit_statuses(self) -> Iterator[tuple[str, str]]:
        """(unit, status) of every recorded unit, from the listing alone."""
        for name in self._list(UNITS_DIR):
            unit, status, _ = name.rsplit(".", 2)
            yield unit, status

    def records(self, threads: int = 16) -> Iterator[dict]:
        """Every unit record, read concurrently (object stores answer slowly but in parallel)."""
        names = (f"{UNITS_DIR}/{n}" for n in self._list(UNITS_DIR))
        with ThreadPoolExecutor(threads) as pool:
            yield from (r for r in pool.map(self._read_json, names) if r is not None)

    def write_summary(self, summary: dict) -> None:
        self._write_json(SUMMARY_FILE, summary)

    # -- files ------------------------------------------------------------------------------------------

    def _list(self, folder: str) -> list[str]:
        path = f"{self.root}/{folder}"
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(path))
        return sorted(i.base_name for i in infos if i.base_name.endswith(".json") and not i.base_name.startswith("."))

    def _read_json(self, name: str) -> dict | None:
        try:
            with self.fs.open_input_stream(f"{self.root}/{name}") as stream:
                return json.loads(stream.read())
        except FileNotFoundError:
            return None

    def _write_json(self, name: str, value: dict) -> None:
        path = f"{self.root}/{name}"
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        temp = f"{path.rsplit('/', 1)[0]}/.{path.rsplit('/', 1)[1]}.tmp"
        with self.fs.open_output_stream(temp) as stream:
            stream.write(json.dumps(value, indent=1, default=str).encode())
        self.fs.move(temp, path)

    def _delete(self, name: str) -> None:
        try:
            self.fs.delete_file(f"{self.root}/{name}")
        except FileNotFoundError:
            pass
