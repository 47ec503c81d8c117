"""What passes between the job's stages: one Arrow schema per boundary, and typed records.

    prepare -> caption    prepared_schema: a row to caption (pixels as the model sees them), or the
                          one row that closes a unit (`unit_end`: a UnitEnd, as JSON)
    caption -> write      captioned_schema: output rows, plus the unit-closing rows passed on
    write   -> driver     REPORT: a PartReport per unit per written bundle

A row's result has one shape: a `Caption`, or a `RowError` (a stable `error_code` and a message),
whether the reader, the prepare stage, the model or a worker fault decided it; a shard that cannot
be read is a RowError on its UnitEnd.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import pyarrow as pa

from tokencarve.engine import Caption
from tokencarve.eval.scoring import correct
from tokencarve.images import RowError

from .job import CaptionJob
from .output import output_schema
from .sources import carried_name


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
            ("unit_end", pa.string()),  # a UnitEnd on the one row that closes a unit; null on rows to caption
        ]
    )


def captioned_schema(carry: tuple[str, ...]) -> pa.Schema:
    return output_schema(carry).append(pa.field("unit", pa.string())).append(pa.field("unit_end", pa.string()))


@dataclass(frozen=True)
class UnitEnd:
    """What the prepare stage read of one unit, sent after its last row to caption."""

    unit: str
    source: str
    rows: int  # rows read (the unit's rows before any damage)
    to_caption: int  # rows sent on to the model this run
    refused: dict[str, int]  # rows the prepare stage wrote as error rows, by error code
    shard_error: RowError | None  # why reading stopped early, if it did
    repeated_ids: int
    repeated_id_examples: list[str]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> UnitEnd:
        values = json.loads(text)
        error = values.pop("shard_error")
        return cls(**values, shard_error=RowError(**error) if error else None)

    def closing_row(self) -> dict:
        """The row that carries this record through the caption and write stages."""
        return {"unit": self.unit, "source_file": self.source, "source_row": -1, "unit_end": self.to_json()}


REPORT = pa.schema(
    [
        ("unit", pa.string()),
        ("part", pa.string()),
        ("rows", pa.int64()),
        ("failed", pa.int64()),
        ("unit_end", pa.string()),
    ]
)


@dataclass(frozen=True)
class PartReport:
    """One unit's share of a written bundle: the part it went to, its rows, and the unit's end if the
    bundle held it."""

    unit: str
    part: str | None  # None: the bundle held only the unit's end
    rows: int
    failed: int
    end: UnitEnd | None

    def to_row(self) -> dict:
        end = self.end.to_json() if self.end else None
        return {"unit": self.unit, "part": self.part, "rows": self.rows, "failed": self.failed, "unit_end": end}

    @classmethod
    def from_row(cls, row: dict) -> PartReport:
        end = UnitEnd.from_json(row["unit_end"]) if row["unit_end"] else None
        return cls(row["unit"], row["part"], row["rows"], row["failed"], end)


def output_row(row: dict, job: CaptionJob, result: Caption | RowError) -> dict:
    """One output row: the input's identity and carried columns, the job's setting, the result."""
    cfg = job.engine
    caption = result.caption if isinstance(result, Caption) else None
    answer = row.get("answer")
    figures = asdict(result) if isinstance(result, Caption) else {}
    error = {"error_code": result.code, "error_message": result.message} if isinstance(result, RowError) else {}
    out = {
        "id": row["id"],
        "prompt": row.get("prompt"),
        "model": cfg.model_name,
        "method": cfg.method,
        "keep": None if cfg.budget is None else str(cfg.budget),  # the budget as written (adaptive: with tau)
        "answer": answer,
        "correct": None if caption is None or answer is None else correct(caption, answer),
        "source_file": row["source_file"],
        "source_row": row["source_row"],
        **figures,
        **error,
    }
    out.update({carried_name(c): row.get(carried_name(c)) for c in job.carry})
    return out
