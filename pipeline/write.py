"""Every part file of an output is written here: rows the prepare stage refused, captioned bundles,
and a finished unit's merge. Parts are atomic and named after the rows they hold (pipeline.output),
so a retried task rewrites the same file instead of adding a copy."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .job import CaptionJob
from .output import GENERATION_FAILED, Output, output_schema
from .records import REPORT, PartReport, UnitEnd


def write_rows(output: Output, unit: str, rows: list[dict], job: CaptionJob) -> str:
    """Write one unit's output rows (dicts of output columns) as a part; returns its name."""
    return output.write_part(unit, pa.Table.from_pylist(rows, schema=output_schema(job.carry)), job.run_id)


def write_parts(table: pa.Table, job: CaptionJob) -> pa.Table:
    """The write stage: each unit's rows in this bundle as one part; a PartReport per unit to the driver."""
    output, reports = Output(job.output), []
    for unit in pc.unique(table.column("unit")).to_pylist():
        mine = table.filter(pc.equal(table.column("unit"), unit))
        rows = mine.filter(pc.is_null(mine.column("unit_end"))).drop_columns(["unit", "unit_end"])
        ends = mine.filter(pc.is_valid(mine.column("unit_end"))).column("unit_end").to_pylist()
        part = output.write_part(unit, rows, job.run_id) if len(rows) else None
        failed = len(rows) - rows.column("error_code").null_count
        end = UnitEnd.from_json(ends[0]) if ends else None
        reports.append(PartReport(unit, part, len(rows), failed, end).to_row())
    return pa.Table.from_pylist(reports, schema=REPORT)


def merge_unit(output: Output, unit: str, run: str) -> pa.Table:
    """Rewrite a unit's parts as one part holding each source row once (returned). Safe to interrupt: the
    merged part is complete before any old one is deleted, and a part left over from an interrupted
    merge is a duplicate the next finish of the unit removes (before its record is written)."""
    old = output.unit_parts(unit)
    table = output.unit_rows(unit, None)
    rows = table.column("source_row").to_numpy()
    # A row whose generation failed and was captioned again (a resumed unit: pipeline.prepare) is there
    # twice: the retry's row is kept. Otherwise the copies are alike and the first is kept.
    failed = pc.fill_null(pc.equal(table.column("error_code"), GENERATION_FAILED), False)
    order = np.lexsort((failed.to_numpy(zero_copy_only=False), rows))  # stable: by row, then failed last
    _, first = np.unique(rows[order], return_index=True)
    merged = table.take(order[first])
    name = output.write_part(unit, merged, run)
    for path in old:
        if not path.endswith("/" + name):
            output.fs.delete_file(path)
    return merged
