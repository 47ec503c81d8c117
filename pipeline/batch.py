"""The Ray Data captioning job: units -> prepare (CPU tasks) -> caption (actor pool) -> write -> driver.

    plan             the driver lists the corpus' units (files, never rows) and drops those with a record
    prepare_units    CPU tasks, one unit at a time: read, re-check rows written before (resume), decode,
                     validate, square the image, check the prompt. Rows that fail are written at once
                     (they need no model); good rows go on in blocks of one generate() batch each, and a
                     last "unit end" row tells what the unit held.
    CaptionActor     actor pool (GPU or CPU): one CaptionEngine per actor, one generate() per block
    write_parts      CPU tasks: one Parquet part per unit per bundle of rows, written atomically
    UnitTracker      the driver: counts parts as they are reported; when a unit's reader has finished and
                     all its rows are written, the unit's totals are computed from its parts' numeric
                     columns and its record is written. Progress is printed as it goes.

Every input row leaves exactly one output row (a caption, or an error code and message), across retried
tasks, lost nodes, a killed driver and reruns: parts are named after the rows they hold (a retried task
rewrites the same file), a unit is recorded only once every row of it is on storage (a rerun skips
recorded units and re-checks the others' rows), and finishing a unit checks its rows are each there once.
Nothing here holds per-row state beyond one unit: memory does not grow with the corpus.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
from PIL import Image

from monitoring.metrics import MetricsRecorder
from tokencarve.engine import CaptionEngine, EngineConfig, ModelInputs
from tokencarve.eval.scoring import correct
from tokencarve.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, RowError, decode_image

from .output import TOTALS_COLUMNS, Output, SettingsMismatch, Totals, output_schema
from .sources import ShardError, Unit, carried_name, plan_units, read_unit, uri

__all__ = ["CaptionJob", "SettingsMismatch", "run", "read_output"]

EXAMPLES = 5  # repeated ids / failed shards listed by name (the counts are complete)
RESERVED_CARRY = {"file", "row"}  # source_file / source_row are the job's own columns


@dataclass
class CaptionJob:
    inputs: list[str]
    output: str
    engine: EngineConfig
    input_format: str = "auto"
    carry: tuple[str, ...] = ()  # source columns copied to the output as source_<name>
    batch_size: int = 8  # rows per generate() call
    min_actors: int = 1
    max_actors: int = 1
    num_gpus: float = 0.0  # per actor
    actor_cpus: float = 1.0
    rows_per_file: int = 4096  # rows per written bundle (a part holds one unit's share of it)
    merge_rows: int = 200_000  # a finished unit of at most this many rows is merged into one part
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    progress_every_s: float = 30.0  # seconds between progress lines on stderr (0: none)
    run_id: str = ""  # set by run(): names this run's parts (a resumed unit re-checks earlier runs' rows)

    def __post_init__(self):
        self.carry = tuple(self.carry)
        clash = RESERVED_CARRY & set(self.carry)
        if clash:
            raise ValueError(f"--carry {sorted(clash)}: source_file / source_row are the job's own columns")

    def settings(self) -> dict:
        """What an output records and a rerun must match."""
        e = self.engine
        return {"model": e.model_name, "method": e.method, "keep": e.budget, "carry": list(self.carry)}


def read_output(output: str, columns: list[str] | None = None) -> pa.Table:
    return Output(output).read(columns)


# -- stage 1: prepare (CPU tasks, one unit at a time) -------------------------------------------------

_inputs: dict[EngineConfig, ModelInputs] = {}


def _model_inputs(config: EngineConfig) -> ModelInputs:
    if config not in _inputs:  # the tokenizer and image settings, loaded once per worker process
        _inputs[config] = ModelInputs.load(config)
    return _inputs[config]


def prepared_schema(carry: tuple[str, ...]) -> pa.Schema:
    return pa.schema(
        [
            ("unit", pa.string()),
            ("source_file", pa.string()),
            ("source_row", pa.int64()),
            ("id", pa.string()),
            ("prompt", pa.string()),
            ("answer", pa.string()),
            ("pixels", pa.binary()),
            ("width", pa.int32()),
            ("height", pa.int32()),  # RGB, as the model will see it
            *[(carried_name(c), pa.string()) for c in carry],
            ("unit_end", pa.string()),  # JSON on the one row that closes a unit; null on rows to caption
        ]
    )


def prepare_units(units: pa.Table, job: CaptionJob) -> Iterator[pa.Table]:
    for item in units.to_pylist():
        yield from prepare_unit(Unit.from_item(item), job)


def prepare_unit(unit: Unit, job: CaptionJob) -> Iterator[pa.Table]:
    output, inputs = Output(job.output), _model_inputs(job.engine)
    # A resumed unit: rows earlier runs wrote are skipped (never this run's: a retried task must emit
    # exactly what its first attempt did, so that its blocks and parts come out the same).
    written = output.unit_rows(unit.key, ["source_row"], before_run=job.run_id)
    done = np.sort(written.column("source_row").to_numpy()) if written is not None else np.empty(0, np.int64)
    rows, emitted, ids, block, failed = 0, 0, [], [], []
    failed_by_reason: dict[str, int] = {}
    shard_error = None
    try:
        for table in read_unit(unit, job.carry):
            rows += len(table)
            ids.append(table.column("id"))
            if len(done):
                table = table.filter(pa.array(~np.isin(table.column("source_row").to_numpy(), done)))
            for row in table.to_pylist():
                image, error = _prepare_row(row, inputs, job)
                if error is not None:
                    failed.append(_output_row(row, job, {"error_code": error.code, "error_message": error.message}))
                    failed_by_reason[error.code] = failed_by_reason.get(error.code, 0) + 1
                    continue
                block.append(_prepared_row(row, unit, image, job.carry))
                if len(block) == job.batch_size:
                    emitted += len(block)
                    yield pa.Table.from_pylist(block, schema=prepared_schema(job.carry))
                    block = []
            if len(failed) >= job.rows_per_file:
                output.write_part(unit.key, pa.Table.from_pylist(failed, schema=output_schema(job.carry)), job.run_id)
                failed = []
    except ShardError as err:
        shard_error = err
    if failed:
        output.write_part(unit.key, pa.Table.from_pylist(failed, schema=output_schema(job.carry)), job.run_id)
    end = {
        "unit": unit.key,
        "source": unit.path,
        "rows": rows,
        "to_caption": emitted + len(block),
        "error_code": shard_error.code if shard_error else None,
        "error_message": shard_error.message if shard_error else None,
        "failed_by_reason": failed_by_reason,
        **_repeated_ids(ids),
    }
    block.append({"unit": unit.key, "source_file": unit.path, "source_row": -1, "unit_end": json.dumps(end)})
    yield pa.Table.from_pylist(block, schema=prepared_schema(job.carry))


def _prepare_row(row: dict, inputs: ModelInputs, job: CaptionJob) -> tuple[Image.Image | None, RowError | None]:
    """(the image as the model will see it, None), or (None, why the row gets no caption)."""
    if row["error_code"] is not None:
        return None, RowError(row["error_code"], row["error_message"])
    if row["id"] is None:
        return None, RowError("missing_id", "the row has no id")
    if row["image"] is None and row["image_path"] is None:
        return None, RowError("missing_image", "the row has no image")
    error = inputs.prompt_error(row["prompt"])
    if error is not None:
        return None, error
    data = row["image"] if row["image"] is not None or row["image_path"] is None else _read_path(row["image_path"])
    image = (
        data
        if isinstance(data, RowError)
        else decode_image(data, max_bytes=job.max_image_bytes, max_pixels=job.max_image_pixels)
    )
    if isinstance(image, RowError):
        return None, image
    return inputs.image(image), None


def _read_path(path: str) -> bytes | RowError:
    try:
        fs, inner = pafs.FileSystem.from_uri(uri(path))
        with fs.open_input_stream(inner) as stream:
            return stream.read()
    except Exception as err:  # missing file, permissions, bad URI: a row error, not a job error
        return RowError("unreadable_path", f"{path}: {err}")


def _prepared_row(row: dict, unit: Unit, image: Image.Image, carry) -> dict:
    prepared = {k: row[k] for k in ("source_file", "source_row", "id", "prompt", "answer")}
    prepared.update({carried_name(c): row[carried_name(c)] for c in carry})
    return prepared | {
        "unit": unit.key,
        "pixels": image.tobytes(),
        "width": image.width,
        "height": image.height,
        "unit_end": None,
    }


def _repeated_ids(ids: list) -> dict:
    """Ids that occur more than once within this unit (bounded memory: one unit's ids)."""
    counts = pc.value_counts(pa.chunked_array(ids, pa.string()).drop_null()) if ids else pa.array([])
    repeated = [c for c in counts.to_pylist() if c["counts"] > 1] if len(counts) else []
    return {
        "repeated_ids": sum(c["counts"] - 1 for c in repeated),
        "repeated_id_examples": [c["values"] for c in repeated[:EXAMPLES]],
    }


def _output_row(row: dict, job: CaptionJob, result: dict) -> dict:
    """One output row: the input's identity and carried columns, the job's setting, the result."""
    cfg = job.engine
    caption, answer = result.get("caption"), row.get("answer")
    out = {
        "id": row["id"],
        "prompt": row.get("prompt"),
        "model": cfg.model_name,
        "method": cfg.method,
        "keep": cfg.budget,
        "answer": answer,
        "correct": None if caption is None or answer is None else correct(caption, answer),
        "source_file": row["source_file"],
        "source_row": row["source_row"],
        **result,
    }
    out.update({carried_name(c): row.get(carried_name(c)) for c in job.carry})
    return out


# -- stage 2: caption (actor pool) ---------------------------------------------------------------------


def captioned_schema(carry: tuple[str, ...]) -> pa.Schema:
    return output_schema(carry).append(pa.field("unit", pa.string())).append(pa.field("unit_end", pa.string()))


class CaptionActor:
    """Holds one engine (model loaded once per actor) and captions the prepared rows it is given."""

    def __init__(self, job: CaptionJob):
        self.job = job
        self.engine = CaptionEngine(job.engine)
        self.metrics = MetricsRecorder(self.engine.model_name, job.engine.method, job.engine.keep)

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        todo = [r for r in rows if r["unit_end"] is None]
        out = []
        for row, result in zip(todo, self._caption(todo)):
            if result.get("error_code"):
                self.metrics.failed(result["error_code"])
            out.append(_output_row(row, self.job, result) | {"unit": row["unit"], "unit_end": None})
        for end in (r for r in rows if r["unit_end"] is not None):
            for code, count in json.loads(end["unit_end"])["failed_by_reason"].items():
                self.metrics.failed(code, count)  # rows the prepare stage refused
            out.append(
                {"unit": end["unit"], "unit_end": end["unit_end"], "source_file": end["source_file"], "source_row": -1}
            )
        return pa.Table.from_pylist(out, schema=captioned_schema(self.job.carry))

    def _caption(self, rows: list[dict]) -> list[dict]:
        if not rows:
            return []
        images = [Image.frombytes("RGB", (r["width"], r["height"]), r["pixels"]) for r in rows]
        prompts = [r["prompt"] for r in rows]
        try:
            return self._caption_batch(images, prompts)
        except Exception:
            if len(rows) == 1:
                raise
        # A failing batch: retry row by row so one bad row cannot take the others down.
        results = []
        for image, prompt in zip(images, prompts):
            try:
                results += self._caption_batch([image], [prompt])
            except Exception as err:
                results.append({"error_code": "generation_failed", "error_message": f"{type(err).__name__}: {err}"})
        return results

    def _caption_batch(self, images, prompts) -> list[dict]:
        captions = self.engine.caption(images, prompts)
        self.metrics.batch(captions, self.engine.last_timing)
        return [asdict(c) | {"error_code": None, "error_message": None} for c in captions]


# -- stage 3: write (CPU tasks) --------------------------------------------------------------------------

REPORT = pa.schema(
    [
        ("unit", pa.string()),
        ("part", pa.string()),
        ("rows", pa.int64()),
        ("failed", pa.int64()),
        ("unit_end", pa.string()),
    ]
)


def write_parts(table: pa.Table, job: CaptionJob) -> pa.Table:
    """Write each unit's rows in this bundle as one part; report (unit, part, rows) to the driver."""
    output, reports = Output(job.output), []
    for unit in pc.unique(table.column("unit")).to_pylist():
        mine = table.filter(pc.equal(table.column("unit"), unit))
        rows = mine.filter(pc.is_null(mine.column("unit_end"))).drop_columns(["unit", "unit_end"])
        ends = mine.filter(pc.is_valid(mine.column("unit_end"))).column("unit_end").to_pylist()
        part = output.write_part(unit, rows, job.run_id) if len(rows) else None
        failed = len(rows) - rows.column("error_code").null_count
        reports.append(
            {"unit": unit, "part": part, "rows": len(rows), "failed": failed, "unit_end": (ends or [None])[0]}
        )
    return pa.Table.from_pylist(reports, schema=REPORT)


# -- the driver ---------------------------------------------------------------------------------------------


@dataclass
class _InFlight:
    parts: set[str] = field(default_factory=set)  # parts written this run (a retried write reports one twice)
    rows: int = 0
    end: dict | None = None  # the reader's closing report, once it has arrived


class UnitTracker:
    """The driver's view of the units this run is working on (never more than are in flight)."""

    def __init__(self, job: CaptionJob, output: Output):
        self.job, self.output = job, output
        self.in_flight: dict[str, _InFlight] = {}
        self.finishing = ThreadPoolExecutor(4)  # unit records are written off the reporting loop
        self.pending = []
        self.rows, self.failed, self.units_finished = 0, 0, 0

    def report(self, report: dict) -> None:
        unit = self.in_flight.setdefault(report["unit"], _InFlight())
        if report["part"] is not None and report["part"] not in unit.parts:
            unit.parts.add(report["part"])
            unit.rows += report["rows"]
            self.rows += report["rows"]
            self.failed += report["failed"]
        if report["unit_end"] is not None and unit.end is None:
            unit.end = json.loads(report["unit_end"])
            refused = sum(unit.end["failed_by_reason"].values())  # rows the prepare stage wrote itself
            self.rows += refused
            self.failed += refused
        if unit.end is not None and unit.rows >= unit.end["to_caption"]:
            del self.in_flight[report["unit"]]
            self.units_finished += 1
            self.pending.append(self.finishing.submit(finish_unit, self.output, unit.end, self.job))
            self.pending = [f for f in self.pending if not (f.done() and f.result() is None)]  # raises on error

    def close(self) -> None:
        self.finishing.shutdown(wait=True)
        for future in self.pending:
            future.result()  # surfaces an error in writing a record
        if self.in_flight:  # a bug, not a data problem: say which units are left for the rerun
            print(
                f"warning: {len(self.in_flight)} unit(s) did not finish and are left for a rerun: "
                f"{sorted(self.in_flight)[:EXAMPLES]}",
                file=sys.stderr,
            )


def finish_unit(output: Output, end: dict, job: CaptionJob) -> None:
    """Check the unit's rows on storage (each source row once, all of them there), merge its parts
    into one, total its numeric columns and write its record: done, or failed with the shard's
    reason (a rerun re-checks it)."""
    table = output.unit_rows(end["unit"], TOTALS_COLUMNS)
    table = table if table is not None else output_schema(job.carry).empty_table().select(TOTALS_COLUMNS)
    distinct = len(np.unique(table.column("source_row").to_numpy()))
    parts = len(output.unit_parts(end["unit"]))
    # A row written twice (a task re-run after a lost node) must go; many small parts (a write bundle
    # holds every unit in flight, so it splits into small per-unit parts) are merged while small enough.
    if distinct < len(table) or 1 < parts and len(table) <= job.merge_rows:
        table = merge_unit(output, end["unit"], job.run_id).select(TOTALS_COLUMNS)
    code, message = end["error_code"], end["error_message"]
    if code is None and distinct != end["rows"]:
        code, message = "incomplete_unit", f"{distinct} of {end['rows']} rows are written; a rerun completes it"
    output.finish_unit(
        {
            "unit": end["unit"],
            "source": end["source"],
            "status": "failed" if code else "done",
            "error_code": code,
            "error_message": message,
            "rows_read": end["rows"],
            "totals": asdict(Totals.of(table)),
            "repeated_ids": end["repeated_ids"],
            "repeated_id_examples": end["repeated_id_examples"],
        }
    )


def merge_unit(output: Output, unit: str, run: str) -> pa.Table:
    """Rewrite a unit's parts as one part holding each source row once (returned). Safe to interrupt: the
    merged part is complete before any old one is deleted, and a part left over from an interrupted
    merge is a duplicate the next finish of the unit removes (before its record is written)."""
    old = output.unit_parts(unit)
    table = output.unit_rows(unit, None)
    _, first = np.unique(table.column("source_row").to_numpy(), return_index=True)
    merged = table.take(first)
    name = output.write_part(unit, merged, run)
    for path in old:
        if not path.endswith("/" + name):
            output.fs.delete_file(path)
    return merged


class Progress:
    """A line on stderr every `every` seconds, from a thread (the report loop blocks between reports):
    rows written, failures, units finished, rate, ETA."""

    def __init__(self, every: float, units: int, tracker: UnitTracker):
        self.every, self.units, self.tracker = every, units, tracker
        self.started = time.perf_counter()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def __enter__(self) -> Progress:
        if self.every:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        if self.every:
            self.thread.join()
            self.print()

    def _loop(self) -> None:
        while not self.stopped.wait(self.every):
            self.print()

    def print(self) -> None:
        t, elapsed = self.tracker, time.perf_counter() - self.started
        rate = t.rows / max(elapsed, 1e-9)
        # A shard's row count is known only once it is read: the ETA extrapolates the units' pace.
        eta = (
            f"~{elapsed * (self.units - t.units_finished) / t.units_finished:,.0f} s" if t.units_finished else "unknown"
        )
        print(
            f"progress: {t.rows:,} rows written ({t.failed:,} failed) | units {t.units_finished:,}/{self.units:,} "
            f"done | {rate:,.1f} rows/s | ETA {eta}",
            file=sys.stderr,
            flush=True,
        )


def run(job: CaptionJob) -> dict:
    """Run the job on the connected Ray cluster; returns (and writes) the summary of the whole output."""
    output = Output(job.output)
    output.claim(job.settings())
    started = time.perf_counter()
    job = replace(job, run_id=time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time_ns() % 10**6:06d}")
    units = plan_units(job.inputs, job.input_format)
    recorded = {unit for unit, status in output.unit_statuses() if status == "done"}  # one name per shard
    pending = [u.to_item() for u in units if u.key not in recorded]
    tracker = UnitTracker(job, output)
    stats = None
    if pending:
        ds = _dataset(job, pending)
        with Progress(job.progress_every_s, len(pending), tracker):
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for report in batch.to_pylist():
                    tracker.report(report)
            tracker.close()
        stats = ds.stats()
    summary = summarize(
        output, job, units=len(units), rows_this_run=tracker.rows, seconds=time.perf_counter() - started
    )
    output.write_summary(summary | {"ray_data_stats": stats})
    return summary | {"ray_data_stats": stats}


def _dataset(job: CaptionJob, pending: list[dict]) -> ray.data.Dataset:
    ds = ray.data.from_items(pending, override_num_blocks=len(pending))
    ds = ds.map_batches(prepare_units, batch_size=1, batch_format="pyarrow", fn_kwargs={"job": job})
    # One block per generate() batch, cut inside the prepare task (Ray Data fuses the two): blocks leave a
    # unit as they are ready instead of when the whole unit is read, and the prepare stage stays a CPU task
    # apart from the model actors (no fusion across a repartition), so decoding never takes their time.
    ds = ds.repartition(target_num_rows_per_block=job.batch_size)
    ds = ds.map_batches(
        CaptionActor,
        fn_constructor_kwargs={"job": job},
        batch_size=job.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=job.min_actors, max_size=job.max_actors),
        num_gpus=job.num_gpus,
        num_cpus=job.actor_cpus,
    )
    # Writing a part is mostly waiting on storage: a quarter CPU, so that writes are not starved by the
    # decoding tasks and the actors holding every CPU of a small machine (ray#44687).
    return ds.map_batches(
        write_parts, batch_size=job.rows_per_file, batch_format="pyarrow", fn_kwargs={"job": job}, num_cpus=0.25
    )


def summarize(output: Output, job: CaptionJob, units: int, rows_this_run: int, seconds: float) -> dict:
    """The whole output's figures, summed over unit records (streamed: one record in memory at a time)."""
    totals, statuses, repeated, examples, failed_shards = Totals(), {"done": 0, "failed": 0}, 0, [], []
    for record in output.records():
        totals.add(Totals.from_dict(record["totals"]))
        statuses[record["status"]] += 1
        repeated += record["repeated_ids"]
        examples += record["repeated_id_examples"][: EXAMPLES - len(examples)]
        if record["status"] == "failed" and len(failed_shards) < 100:
            failed_shards.append(
                {
                    "source": record["source"],
                    "error_code": record["error_code"],
                    "error_message": record["error_message"],
                }
            )
    t = totals
    return {
        "output": job.output,
        "model": job.engine.model,
        "method": job.engine.method,
        "keep": job.engine.budget,
        "rows_total": t.rows,
        "rows_ok": t.rows_ok,
        "rows_failed": t.rows - t.rows_ok,
        "errors_by_reason": dict(sorted(t.errors_by_reason.items())),
        "rows_this_run": rows_this_run,
        "rows_skipped_as_done": t.rows - rows_this_run,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows_this_run / seconds, 3) if seconds > 0 else None,
        "units_total": units,
        "units_done": statuses["done"],
        "units_failed": statuses["failed"],
        "failed_shards": failed_shards,  # the first 100; units_failed counts them all
        "repeated_ids": repeated,
        "repeated_id_examples": examples,
        "repeated_ids_scope": "within each shard (ids repeated across shards are not counted)",
        "visual_tokens_in": t.visual_tokens_in,
        "visual_tokens_kept": t.visual_tokens_kept,
        "visual_tokens_kept_pct": round(100 * t.visual_tokens_kept / t.visual_tokens_in, 2)
        if t.visual_tokens_in
        else None,
        "generated_tokens": t.generated_tokens,
        "kv_bytes_held": t.kv_bytes_held,
        "kv_bytes_uncompressed": t.kv_bytes_uncompressed,
        "kv_bytes_saved": t.kv_bytes_uncompressed - t.kv_bytes_held,
        "kv_saved_pct": round(100 * (t.kv_bytes_uncompressed - t.kv_bytes_held) / t.kv_bytes_uncompressed, 2)
        if t.kv_bytes_uncompressed
        else None,
        "rows_with_answers": t.rows_with_answers,
        "accuracy_pct": round(100 * t.rows_correct / t.rows_with_answers, 2) if t.rows_with_answers else None,
    }
