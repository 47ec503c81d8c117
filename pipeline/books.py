"""The driver's books: which units are in flight, when a unit is finished (its rows checked, merged and
totalled into its record), and the progress line. Never more state than the units in flight."""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from tokencarve.images import RowError

from .job import CaptionJob
from .output import TOTALS_COLUMNS, Output, Totals, output_schema
from .records import PartReport, UnitEnd
from .write import merge_unit

EXAMPLES = 5  # units left unfinished listed by name


@dataclass
class _InFlight:
    parts: set[str] = field(default_factory=set)  # parts written this run (a retried write reports one twice)
    rows: int = 0
    failed: int = 0  # of them, error rows from the caption stage (generation or worker failures)
    end: UnitEnd | None = None  # the prepare stage's closing record, once it has arrived


class UnitTracker:
    """The driver's view of the units this run is working on (never more than are in flight), and the
    last units it finished that hold rows the caption stage failed (bounded: a systemic-failure stop
    takes them back, `recent_failures`)."""

    def __init__(self, job: CaptionJob, output: Output):
        self.job, self.output = job, output
        self.in_flight: dict[str, _InFlight] = {}
        # every failed row in the actors' failure windows is in one of these, also across an actor's
        # restart (which empties its window): at most failure_window rows per actor
        self.recent_failures: deque[str] = deque(maxlen=job.failure_window * max(1, job.max_actors))
        self.finishing = ThreadPoolExecutor(4)  # unit records are written off the reporting loop
        self.pending: list[Future] = []
        self.rows, self.failed, self.units_finished = 0, 0, 0

    def report(self, report: PartReport) -> None:
        unit = self.in_flight.setdefault(report.unit, _InFlight())
        if report.part is not None and report.part not in unit.parts:
            unit.parts.add(report.part)
            unit.rows += report.rows
            unit.failed += report.failed
            self.rows += report.rows
            self.failed += report.failed
        if report.end is not None and unit.end is None:
            unit.end = report.end
            refused = sum(unit.end.refused.values())  # rows the prepare stage wrote itself
            self.rows += refused
            self.failed += refused
        if unit.end is not None and unit.rows >= unit.end.to_caption:
            del self.in_flight[report.unit]
            self.units_finished += 1
            if unit.failed:
                self.recent_failures.append(report.unit)
            self.pending.append(self.finishing.submit(finish_unit, self.output, unit.end, self.job))
            self.pending = [f for f in self.pending if not (f.done() and f.result() is None)]  # raises on error

    def abandon(self) -> None:
        """The run stops short (pipeline.batch.run: a systemic failure): wait for the unit records being
        written, so that none is written after this returns; the units in flight are left for a rerun."""
        self.finishing.shutdown(wait=True)

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


def finish_unit(output: Output, end: UnitEnd, job: CaptionJob) -> None:
    """Check the unit's rows on storage (each source row once, all of them there), merge its parts
    into one, total its numeric columns and write its record: done, or failed with the shard's
    reason (a rerun re-checks it)."""
    table = output.unit_rows(end.unit, TOTALS_COLUMNS)
    table = table if table is not None else output_schema(job.carry).empty_table().select(TOTALS_COLUMNS)
    distinct = len(np.unique(table.column("source_row").to_numpy()))
    parts = len(output.unit_parts(end.unit))
    # A row written twice (a task re-run after a lost node) must go; many small parts (a write bundle
    # holds every unit in flight, so it splits into small per-unit parts) are merged while small enough.
    if distinct < len(table) or 1 < parts and len(table) <= job.merge_rows:
        table = merge_unit(output, end.unit, job.run_id).select(TOTALS_COLUMNS)
    failure = end.shard_error
    if failure is None and distinct != end.rows:
        failure = _incomplete(distinct, end.rows)
    output.finish_unit(
        {
            "unit": end.unit,
            "source": end.source,
            "status": "failed" if failure else "done",
            "error_code": failure.code if failure else None,
            "error_message": failure.message if failure else None,
            "rows_read": end.rows,
            "totals": asdict(Totals.of(table)),
            "repeated_ids": end.repeated_ids,
            "repeated_id_examples": end.repeated_id_examples,
        }
    )


def _incomplete(written: int, read: int) -> RowError:
    return RowError("incomplete_unit", f"{written} of {read} rows are written; a rerun completes it")


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
