"""The Ray Data captioning pipeline: read -> prepare (CPU) -> caption (actor pool) -> write Parquet.

    read_corpus      any corpus -> id, image bytes / path, prompt
    prepare_rows     CPU tasks: skip ids already written, read paths, decode + validate + square
    CaptionActor     actor pool (GPU or CPU): one CaptionEngine per actor, generate in batches
    write_part       CPU tasks: one Parquet file per bundle of rows, written atomically

Every input row leaves exactly one output row, with a caption or an error reason. Output files are
named after the ids they hold and appear only once complete (write to a hidden temp name, then
rename), so a task retried after a crash rewrites the same file, and a rerun into the same output
skips every id already there: a killed job resumes without losing or duplicating rows. Only the
model, method and budget that wrote an output may resume it (`check_resumable`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from PIL import Image

from monitoring.metrics import MetricsRecorder
from tokencarve.eval.scoring import correct

from .engine import CaptionEngine, EngineConfig
from .images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, ImageError, decode_image, square
from .sources import read_corpus

PREPARED = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("answer", pa.string()), ("pixels", pa.binary()),
                      ("error", pa.string())])
OUTPUT = pa.schema([
    ("id", pa.string()), ("caption", pa.string()), ("error", pa.string()), ("prompt", pa.string()),
    ("model", pa.string()), ("method", pa.string()), ("keep", pa.int32()),
    ("visual_tokens_in", pa.int32()), ("visual_tokens_kept", pa.int32()),
    ("kv_bytes_held", pa.int64()), ("kv_bytes_uncompressed", pa.int64()),
    ("generated_tokens", pa.int32()), ("prompt_tokens", pa.int32()), ("latency_s", pa.float64()),
    # with a reference answer in the input: it, and whether the caption matches it (tokencarve.eval's rules)
    ("answer", pa.string()), ("correct", pa.bool_()),
])
SUMMARY_NAME = "_summary.json"


@dataclass
class CaptionJob:
    inputs: list[str]
    output: str
    engine: EngineConfig
    input_format: str = "auto"
    batch_size: int = 8  # rows per generate() call
    min_actors: int = 1
    max_actors: int = 1
    num_gpus: float = 0.0  # per actor
    actor_cpus: float = 1.0
    rows_per_file: int = 1000
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    image_size: int = 336  # the model's input side; set from its config by the job
    pad_color: tuple[int, int, int] = (122, 116, 104)  # the processor's mean colour


# -- stage 1: prepare (CPU) ---------------------------------------------------------------------------

_done_cache: dict = {}


def _done_ids(ref) -> frozenset:
    if ref is None:
        return frozenset()
    key = ref.hex()
    if key not in _done_cache:  # fetched once per worker process
        _done_cache[key] = ray.get(ref)
    return _done_cache[key]


def prepare_rows(table: pa.Table, job: CaptionJob, done_ref=None) -> pa.Table:
    """Decode and validate each row; rows already in the output are dropped (resume)."""
    done = _done_ids(done_ref)
    out = {name: [] for name in PREPARED.names}
    for row in table.to_pylist():
        row_id = row["id"] if row["id"] is not None else ""
        if row_id in done:
            continue
        pixels, error = None, row["source_error"]
        if row["id"] is None:
            error = "missing_id: the row has no id"
        if error is None:
            data = row["image"] if row["image"] is not None or row["image_path"] is None else _read_path(row["image_path"])
            image = data if isinstance(data, ImageError) else decode_image(
                data, max_bytes=job.max_image_bytes, max_pixels=job.max_image_pixels)
            if isinstance(image, ImageError):
                error = str(image)
            else:
                pixels = square(image, job.image_size, job.pad_color).tobytes()
        for name, value in zip(PREPARED.names, (row_id, row["prompt"], row["answer"], pixels, error)):
            out[name].append(value)
    return pa.table(out, schema=PREPARED)


def _correct(caption: str | None, answer: str | None) -> bool | None:
    return None if caption is None or answer is None else correct(caption, answer)


def _read_path(path: str) -> bytes | ImageError:
    try:
        fs, inner = pafs.FileSystem.from_uri(path if "://" in path else os.path.abspath(path))
        with fs.open_input_stream(inner) as stream:
            return stream.read()
    except Exception as err:  # missing file, permissions, bad URI: a row error, not a job error
        return ImageError("unreadable_path", f"{path}: {err}")


# -- stage 2: caption (actor pool) ---------------------------------------------------------------------

class CaptionActor:
    """Holds one engine (model loaded once per actor) and captions the prepared rows it is given."""

    def __init__(self, job: CaptionJob):
        self.job = job
        self.engine = CaptionEngine(job.engine)
        self.metrics = MetricsRecorder(self.engine.model_name, job.engine.method, job.engine.keep)

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        results: list[dict] = [{"error": r["error"]} for r in rows]
        todo = [i for i, r in enumerate(rows) if r["error"] is None]
        for i, result in zip(todo, self._caption([rows[i] for i in todo])):
            results[i] = result
        for result in results:
            if result["error"] is not None:
                self.metrics.failed(result["error"].split(":", 1)[0])
        cfg = self.job.engine
        out = []
        for row, result in zip(rows, results):
            out.append({
                "id": row["id"], "prompt": row["prompt"], "model": cfg.model_name,
                "method": cfg.method, "keep": cfg.budget,
                "caption": None, **result,
                "answer": row["answer"], "correct": _correct(result.get("caption"), row["answer"]),
            })
        return pa.Table.from_pylist(out, schema=OUTPUT)

    def _caption(self, rows: list[dict]) -> list[dict]:
        if not rows:
            return []
        side = self.job.image_size
        images = [Image.frombytes("RGB", (side, side), r["pixels"]) for r in rows]
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
                results.append({"error": f"generation_failed: {type(err).__name__}: {err}"})
        return results

    def _caption_batch(self, images, prompts) -> list[dict]:
        captions = self.engine.caption(images, prompts)
        self.metrics.batch(captions, self.engine.last_timing)
        return [asdict(c) | {"error": None} for c in captions]


# -- stage 3: write (CPU) -------------------------------------------------------------------------------

def write_part(table: pa.Table, output: str) -> pa.Table:
    """Write one Parquet file named after its ids; complete or absent, never half-written."""
    ids = "\n".join(sorted(i or "" for i in table.column("id").to_pylist()))
    name = f"part-{hashlib.sha1(ids.encode()).hexdigest()[:24]}.parquet"
    fs, root = pafs.FileSystem.from_uri(_output_uri(output))
    temp = f"{root}/.{name}.tmp"  # hidden: Parquet readers and resume ignore it
    pq.write_table(table, temp, filesystem=fs)
    fs.move(temp, f"{root}/{name}")
    return pa.table({"written": [table.num_rows]})


def _output_uri(output: str) -> str:
    return output if "://" in output else os.path.abspath(output)


# -- the job ----------------------------------------------------------------------------------------------

# what resuming needs of the rows written so far: their ids and the setting that wrote them
RESUME_COLUMNS = ["id", "model", "method", "keep"]


def read_output(output: str, columns: list[str] | None = None) -> pa.Table:
    """Every row written so far (an empty table if nothing is), all columns or only `columns`."""
    fs, root = pafs.FileSystem.from_uri(_output_uri(output))
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        empty = OUTPUT.empty_table()
        return empty if columns is None else empty.select(columns)
    return pads.dataset(root, filesystem=fs, format="parquet", schema=OUTPUT).to_table(columns=columns)


class SettingsMismatch(ValueError):
    """The output already holds rows of another model, method or budget."""


def check_resumable(job: CaptionJob, written: pa.Table | None = None) -> None:
    """A rerun resumes an output only with the model, method and budget that wrote it: skipping its
    ids would otherwise leave one output (and its summary) describing two different runs."""
    written = read_output(job.output, RESUME_COLUMNS) if written is None else written
    settings = zip(*(written.column(c).to_pylist() for c in ("model", "method", "keep")))
    wanted = (job.engine.model_name, job.engine.method, job.engine.budget)
    other = sorted({s for s in settings if s != wanted}, key=str)
    if other:
        model, method, keep = other[0]
        raise SettingsMismatch(
            f"{job.output} already holds rows written with model={model} method={method} keep={keep}; this run "
            f"is model={wanted[0]} method={wanted[1]} keep={wanted[2]}. Write to a new --output (or remove "
            f"that one) rather than mix settings in one output")


def run(job: CaptionJob) -> dict:
    """Run the pipeline on the connected Ray cluster; returns (and writes) the run summary."""
    fs, root = pafs.FileSystem.from_uri(_output_uri(job.output))
    written = read_output(job.output, RESUME_COLUMNS)
    check_resumable(job, written)
    fs.create_dir(root, recursive=True)
    done = frozenset(written.column("id").to_pylist())
    done_ref = ray.put(done) if done else None

    started = time.perf_counter()
    ds = read_corpus(job.inputs, job.input_format)
    ds = ds.map_batches(prepare_rows, batch_format="pyarrow", fn_kwargs={"job": job, "done_ref": done_ref})
    # One block per generate() batch: rows stream through the actors and out to files as they are
    # done (a big input file would otherwise be one block, written only when all of it is captioned).
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
    ds = ds.map_batches(write_part, batch_size=job.rows_per_file, batch_format="pyarrow", fn_kwargs={"output": job.output})
    result = ds.materialize()
    written = sum(result.to_pandas()["written"]) if result.count() else 0
    seconds = time.perf_counter() - started

    summary = summarize(read_output(job.output), job, written, seconds, skipped=len(done))
    summary["ray_data_stats"] = result.stats()
    with fs.open_output_stream(f"{root}/{SUMMARY_NAME}") as stream:
        stream.write(json.dumps(summary, indent=2).encode())
    return summary


def summarize(table: pa.Table, job: CaptionJob, written: int, seconds: float, skipped: int) -> dict:
    rows = table.to_pylist()
    ok = [r for r in rows if r["error"] is None]
    errors: dict[str, int] = {}
    for r in rows:
        if r["error"] is not None:
            code = r["error"].split(":", 1)[0]
            errors[code] = errors.get(code, 0) + 1
    tokens_in = sum(r["visual_tokens_in"] for r in ok)
    tokens_kept = sum(r["visual_tokens_kept"] for r in ok)
    kv_held = sum(r["kv_bytes_held"] for r in ok)
    kv_full = sum(r["kv_bytes_uncompressed"] for r in ok)
    answered = [r for r in ok if r["correct"] is not None]
    return {
        "output": job.output,
        "model": job.engine.model,
        "method": job.engine.method,
        "keep": job.engine.budget,
        "rows_total": len(rows),
        "rows_ok": len(ok),
        "rows_failed": len(rows) - len(ok),
        "errors_by_reason": dict(sorted(errors.items())),
        "rows_this_run": written,
        "rows_skipped_as_done": skipped,
        "seconds": round(seconds, 3),
        "rows_per_s": round(written / seconds, 3) if seconds > 0 else None,
        "visual_tokens_in": tokens_in,
        "visual_tokens_kept": tokens_kept,
        "visual_tokens_kept_pct": round(100 * tokens_kept / tokens_in, 2) if tokens_in else None,
        "generated_tokens": sum(r["generated_tokens"] for r in ok),
        "kv_bytes_held": kv_held,
        "kv_bytes_uncompressed": kv_full,
        "kv_bytes_saved": kv_full - kv_held,
        "kv_saved_pct": round(100 * (kv_full - kv_held) / kv_full, 2) if kv_full else None,
        "rows_with_answers": len(answered),
        "accuracy_pct": round(100 * sum(r["correct"] for r in answered) / len(answered), 2) if answered else None,
    }
