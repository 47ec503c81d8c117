"""The prepare stage (CPU tasks, one unit at a time): read, skip rows written before (resume), decode,
validate, make the image what the model sees, check the prompt. A refused row is written at once as an
error row (it needs no model); good rows go on in blocks of one generate() batch each, and one last row
closes the unit with its UnitEnd."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from PIL import Image

from tokencarve.engine import EngineConfig, ModelInputs
from tokencarve.images import RowError, decode_image

from .job import CaptionJob
from .output import GENERATION_FAILED, Output
from .records import UnitEnd, output_row, prepared_schema
from .sources import ShardError, Unit, carried_name, read_unit, uri
from .write import write_rows

EXAMPLES = 5  # repeated ids listed by name (the count is complete)

_inputs: dict[EngineConfig, ModelInputs] = {}


def _model_inputs(config: EngineConfig) -> ModelInputs:
    if config not in _inputs:  # the tokenizer and image settings, loaded once per worker process
        _inputs[config] = ModelInputs.load(config)
    return _inputs[config]


def prepare_units(units: pa.Table, job: CaptionJob) -> Iterator[pa.Table]:
    for item in units.to_pylist():
        yield from prepare_unit(Unit.from_item(item), job)


def prepare_unit(unit: Unit, job: CaptionJob) -> Iterator[pa.Table]:
    output, inputs, schema = Output(job.output), _model_inputs(job.engine), prepared_schema(job.carry)
    # A resumed unit: rows earlier runs wrote are skipped (never this run's: a retried task must emit
    # exactly what its first attempt did, so that its blocks and parts come out the same), but for rows
    # whose generation failed: an unfinished unit's are captioned again (a job stopped by a systemic
    # failure leaves such units for the rerun), and the unit's merge keeps the new row (merge_unit).
    written = output.unit_rows(unit.key, ["source_row", "error_code"], before_run=job.run_id)
    if written is not None:
        written = written.filter(pc.fill_null(pc.not_equal(written.column("error_code"), GENERATION_FAILED), True))
    done = np.sort(written.column("source_row").to_numpy()) if written is not None else np.empty(0, np.int64)
    rows, emitted, ids, block, refused = 0, 0, [], [], []
    refused_by_code: dict[str, int] = {}
    shard_error = None
    try:
        for table in read_unit(unit, job.carry):
            rows += len(table)
            ids.append(table.column("id"))
            if len(done):
                table = table.filter(pa.array(~np.isin(table.column("source_row").to_numpy(), done)))
            for row in table.to_pylist():
                image = prepare_row(row, inputs, job)
                if isinstance(image, RowError):
                    refused.append(output_row(row, job, image))
                    refused_by_code[image.code] = refused_by_code.get(image.code, 0) + 1
                    continue
                block.append(_prepared_row(row, unit, image, job.carry))
                if len(block) == job.batch_size:
                    emitted += len(block)
                    yield pa.Table.from_pylist(block, schema=schema)
                    block = []
            if len(refused) >= job.rows_per_file:
                write_rows(output, unit.key, refused, job)
                refused = []
    except ShardError as err:
        shard_error = RowError(err.code, err.message)
    if refused:
        write_rows(output, unit.key, refused, job)
    end = UnitEnd(
        unit=unit.key,
        source=unit.path,
        rows=rows,
        to_caption=emitted + len(block),
        refused=refused_by_code,
        shard_error=shard_error,
        **_repeated_ids(ids),
    )
    yield pa.Table.from_pylist(block + [end.closing_row()], schema=schema)


def prepare_row(row: dict, inputs: ModelInputs, job: CaptionJob) -> Image.Image | RowError:
    """The image as the model will see it, or why the row gets no caption."""
    if row["error_code"] is not None:  # the reader's reason
        return RowError(row["error_code"], row["error_message"])
    if row["id"] is None:
        return RowError("missing_id", "the row has no id")
    if row["image"] is None and row["image_path"] is None:
        return RowError("missing_image", "the row has no image")
    error = inputs.prompt_error(row["prompt"])
    if error is not None:
        return error
    data = row["image"] if row["image"] is not None else _read_path(row["image_path"])
    if isinstance(data, RowError):
        return data
    image = decode_image(data, max_bytes=job.max_image_bytes, max_pixels=job.max_image_pixels)
    return image if isinstance(image, RowError) else inputs.image(image)


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
