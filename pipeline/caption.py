"""The caption stage: an actor pool, one CaptionEngine (model loaded once) per actor, one generate() per
block. The failure policy (docs/CLUSTER.md, "When captioning fails"):

- a row-level failure never fails the job: a failing batch is retried row by row, and a row whose
  generation raises on its own becomes a `generation_failed` error row, whatever the block size;
- a worker-level fault (out of memory, a lost device, a torch.compile error: pipeline.faults.is_worker_fault,
  or the actor's process dying) ends the actor's process; Ray restarts the actor and retries the block.
  `BlockAttempts` counts the attempts at each block in flight, so that a block that keeps failing is not
  retried forever: past `CaptionJob.block_attempts` its rows become `worker_failed` error rows, which the
  summary counts;
- a systemic failure stops the job: when more than `CaptionJob.failure_share` of the last
  `CaptionJob.failure_window` rows an actor captioned failed generation (pipeline.faults.FailureWindow),
  the block that crosses the line raises SystemicFailure instead of passing its rows on, after telling
  `BlockAttempts` (Ray Data hands the driver the actor's exception as text only); the driver leaves the
  units of the failed rows unfinished (pipeline.batch.run) and the job exits 4.
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import NoReturn

import pyarrow as pa
import pyarrow.compute as pc
import ray
from PIL import Image

from monitoring.metrics import MetricsRecorder
from tokencarve.engine import Caption, CaptionEngine, row_seed
from tokencarve.images import RowError

from .faults import FailureWindow, SystemicFailure, inject, is_worker_fault, parse_faults
from .job import CaptionJob
from .output import GENERATION_FAILED
from .records import UnitEnd, captioned_schema, output_row

Result = Caption | RowError
DIED = "the actor's process died while captioning it"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class BlockAttempts:
    """The attempts at each block in flight and its last fault, outside the actors (which a fault kills).
    Holds only blocks in flight: a block's entry goes when it is done. Also the systemic failure that
    stopped the run, if one did (one per actor at most)."""

    def __init__(self):
        self.attempts: dict[str, int] = {}
        self.faults: dict[str, str] = {}
        self.stops: list[SystemicFailure] = []

    def start(self, block: str) -> tuple[int, str | None]:
        """Count an attempt at `block`; returns (this attempt's number, how the attempt before it ended).
        An attempt that reports no fault and never finishes died with its process."""
        self.attempts[block] = self.attempts.get(block, 0) + 1
        previous = self.faults.get(block)
        self.faults[block] = DIED
        return self.attempts[block], previous

    def fault(self, block: str, message: str) -> None:
        self.faults[block] = message

    def finish(self, block: str) -> None:
        self.attempts.pop(block, None)
        self.faults.pop(block, None)

    def stop(self, failure: SystemicFailure) -> None:
        self.stops.append(failure)

    def stopped(self) -> SystemicFailure | None:
        """The first systemic failure reported, naming the units of every actor's failed rows."""
        if not self.stops:
            return None
        first, units = self.stops[0], sorted({u for stop in self.stops for u in stop.units})
        return SystemicFailure(first.failed, first.seen, first.window, first.share, first.first_error, tuple(units))


def generation_failed(error: Exception) -> RowError:
    return RowError(GENERATION_FAILED, f"{type(error).__name__}: {error}")


def block_key(rows: pa.Table) -> str:
    """A block's identity across retries: its units and source rows (a retried task gets the same rows)."""
    digest = hashlib.sha1()
    for unit, row in zip(rows.column("unit").to_pylist(), rows.column("source_row").to_numpy()):
        digest.update(f"{unit}#{row};".encode())
    return digest.hexdigest()


class CaptionActor:
    """Holds one engine and captions the prepared blocks it is given; passes unit ends on."""

    def __init__(self, job: CaptionJob, attempts=None):
        self.job, self.attempts = job, attempts  # attempts: a BlockAttempts handle (None: a single attempt)
        self.faults = parse_faults(job.faults)
        self.window = FailureWindow(job.failure_window, job.failure_share)
        self.engine = CaptionEngine(job.engine)
        self.metrics = MetricsRecorder(self.engine.model_name, job.engine.method, job.engine.keep)
        self.metrics.decoder(self.engine.decoder)  # the pool as warm-up left it

    def __call__(self, block: pa.Table) -> pa.Table:
        todo = block.filter(pc.is_null(block.column("unit_end")))
        rows = todo.to_pylist()
        out = []
        for row, result in zip(rows, self._caption_block(todo, rows) if rows else []):
            if isinstance(result, RowError):
                self.metrics.failed(result.code)
            failed = isinstance(result, RowError) and result.code == GENERATION_FAILED
            self.window.add(row["unit"], result.message if failed else None)
            out.append(output_row(row, self.job, result) | {"unit": row["unit"], "unit_end": None})
        try:
            self.window.check()  # a systemic failure: raised before this block's rows are passed on
        except SystemicFailure as stop:
            if self.attempts is not None:  # the driver reads it there
                ray.get(self.attempts.stop.remote(stop))
            raise
        for text in block.filter(pc.is_valid(block.column("unit_end"))).column("unit_end").to_pylist():
            end = UnitEnd.from_json(text)
            for code, count in end.refused.items():
                self.metrics.failed(code, count)  # rows the prepare stage refused
            out.append(end.closing_row())
        return pa.Table.from_pylist(out, schema=captioned_schema(self.job.carry))

    def _caption_block(self, todo: pa.Table, rows: list[dict]) -> list[Result]:
        key = block_key(todo)
        attempt, last_fault = ray.get(self.attempts.start.remote(key)) if self.attempts else (1, None)
        if attempt > self.job.block_attempts:
            results = [self._gave_up(attempt - 1, last_fault)] * len(rows)
        else:
            try:
                results = self._caption_rows(rows, attempt)
            except Exception as err:
                if not is_worker_fault(err):
                    raise  # a bug in this stage, not a row's or a worker's failure: Ray Data reports it
                self._restart(key, err)
        if self.attempts:
            self.attempts.finish.remote(key)
        return results

    def _caption_rows(self, rows: list[dict], attempt: int) -> list[Result]:
        """One generate() for the block; if it fails for a row-level reason, one per row, so that one bad
        row cannot take the others down. Worker-level faults are raised."""
        images = [Image.frombytes("RGB", (r["width"], r["height"]), r["pixels"]) for r in rows]
        prompts = [r["prompt"] for r in rows]
        ids = [r["id"] for r in rows]
        try:
            return self._generate(images, prompts, ids, attempt)
        except Exception as err:
            if is_worker_fault(err):
                raise
            if len(rows) == 1:
                return [generation_failed(err)]
        results: list[Result] = []
        for image, prompt, row_id in zip(images, prompts, ids):
            try:
                results += self._generate([image], [prompt], [row_id], attempt)
            except Exception as err:
                if is_worker_fault(err):
                    raise
                results.append(generation_failed(err))
        return results

    def _generate(self, images, prompts, ids, attempt) -> list[Caption]:
        inject(self.faults, ids, attempt)  # the test hook; nothing unless TOKENCARVE_INJECT_FAULTS names a row
        # each row's sampling seed from its id: a rerun or a retried block draws the same caption
        captions = self.engine.caption(images, prompts, seeds=[row_seed(self.job.engine.seed, i) for i in ids])
        self.metrics.batch(captions, self.engine.last_timing)
        self.metrics.decoder(self.engine.decoder)
        return captions

    def _gave_up(self, attempts: int, last_fault: str | None) -> RowError:
        return RowError("worker_failed", f"the block failed on {attempts} attempt(s); last: {last_fault or DIED}")

    def _restart(self, key: str, error: Exception) -> NoReturn:
        """End this process: Ray restarts the actor (a fresh device context and memory) and retries the block."""
        if self.attempts is None:  # not in a Ray actor pool (a test's direct call): nothing would restart it
            raise error
        message = f"{type(error).__name__}: {error}"
        ray.get(self.attempts.fault.remote(key, message))
        print(f"CaptionActor: worker fault, restarting: {message}", file=sys.stderr, flush=True)
        os._exit(1)
