"""The Ray Data captioning job, composed of its stages. A row's way through the job, top to bottom:

    plan        pipeline.sources  the driver lists the corpus' units (files, never rows) and drops those
                                  with a record (run, below)
    prepare     pipeline.prepare  CPU tasks, one unit at a time: read, skip rows written before, decode,
                                  validate, make the image what the model sees, check the prompt. A refused
                                  row is written at once as an error row; good rows go on in blocks of one
                                  generate() batch, and a last row closes the unit (a UnitEnd)
    caption     pipeline.caption  actor pool, one CaptionEngine per actor, one generate() per block; a row's
                                  failure is an error row, a worker's fault restarts the actor (bounded)
    write       pipeline.write    CPU tasks: one Parquet part per unit per bundle, atomically; a PartReport
                                  per unit to the driver
    books       pipeline.books    the driver: a unit whose rows are all written is checked, merged, totalled
                                  and recorded; progress on stderr
    summary     pipeline.summary  the whole output's figures, summed over the unit records

What passes between stages is typed (pipeline.records); a row's result is a Caption or a RowError.
Every input row leaves exactly one output row, across retried tasks, lost nodes, a killed driver and
reruns: parts are named after the rows they hold (a retried task rewrites the same file), a unit is
recorded only once every row of it is on storage, and finishing a unit checks each row is there once.
Nothing here holds per-row state beyond one unit: memory does not grow with the corpus.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pyarrow as pa
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tokencarve import engine as tokencarve_engine
from tokencarve.engine import EngineConfig
from tokencarve.settings import claim_defaults, pinned, upgrade_claim

from . import calibration
from .books import Progress, UnitTracker
from .caption import BlockAttempts, CaptionActor
from .faults import SystemicFailure, systemic_failure
from .job import CaptionJob
from .output import Output, SettingsMismatch
from .prepare import prepare_units
from .records import PartReport
from .sources import plan_units
from .summary import summarize
from .write import write_parts

__all__ = ["CaptionJob", "SettingsMismatch", "SystemicFailure", "run", "read_output", "pin_revision", "preflight"]


def read_output(output: str, columns: list[str] | None = None) -> pa.Table:
    return Output(output).read(columns)


def pin_revision(job: CaptionJob, output: Output) -> CaptionJob:
    """The job with a hub model pinned to one revision, which every load (the driver's checks, the
    calibration task, every actor and prepare task) passes as `revision=`: the one the output's claim
    records, else the hub's current commit (the cache's, offline); tokencarve.settings.pinned."""
    return replace(job, engine=pinned(job.engine, output.settings()))


def preflight(config: EngineConfig) -> None:
    """Every refusal the engine would make of `config` (generation settings, family, method, budget),
    made on the driver from the checkpoint's config and processor (no weights), before the output is
    claimed or an actor started: ValueError with the engine's own message. Once per setting per process
    (the job's main and run() both ask)."""
    key = repr(config)  # a config's fields need not all be hashable
    if key not in _preflighted:
        tokencarve_engine.preflight(config)
        _preflighted.add(key)


_preflighted: set[str] = set()


def run(job: CaptionJob) -> dict:
    """Run the job on the connected Ray cluster; returns (and writes) the summary of the whole output.
    A hub model is pinned to one revision, and the engine's refusals are made, before anything else
    (`pin_revision`, `preflight`). An adaptive budget without tau takes the one its output records, or
    is calibrated on the corpus' first rows (pipeline.calibration) before the output is claimed: the
    claim holds the tau. Raises SystemicFailure when an actor's rows keep failing generation, after
    leaving their units unfinished (a rerun captions them again)."""
    output = Output(job.output)
    job = pin_revision(job, output)
    preflight(job.engine)
    job = calibration.calibrated(calibration.recorded_tau(job, output))
    output.claim(job.settings(), claim_defaults(), upgrade_claim)
    started = time.perf_counter()
    job = replace(job, run_id=time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time_ns() % 10**6:06d}")
    units = plan_units(job.inputs, job.input_format)
    recorded = {unit for unit, status in output.unit_statuses() if status == "done"}  # one name per shard
    pending = [u.to_item() for u in units if u.key not in recorded]
    tracker = UnitTracker(job, output)
    stats = None
    if pending:
        attempts = _block_attempts()
        ds = _dataset(job, pending, attempts)
        try:
            with Progress(job.progress_every_s, len(pending), tracker):
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    for row in batch.to_pylist():
                        tracker.report(PartReport.from_row(row))
                tracker.close()
        except Exception as error:
            stop = _reported_stop(attempts) or systemic_failure(error)
            if stop is None:
                raise
            _stop(tracker, output, stop)
            raise stop from None
        finally:
            ray.kill(attempts)
        stats = ds.stats()
    summary = summarize(
        output, job, units=len(units), rows_this_run=tracker.rows, seconds=time.perf_counter() - started
    )
    output.write_summary(summary | {"ray_data_stats": stats})
    return summary | {"ray_data_stats": stats}


def _reported_stop(attempts) -> SystemicFailure | None:
    """The systemic failure an actor reported before raising it (Ray Data gives the driver an actor's
    exception as text), or None; None too when the ledger cannot be asked (the error it was asked for is
    then raised as it is)."""
    try:
        return ray.get(attempts.stopped.remote(), timeout=60)
    except Exception:
        return None


def _stop(tracker: UnitTracker, output: Output, stop: SystemicFailure) -> None:
    """A systemic failure: no unit is recorded from here on, and the units of the rows that failed are
    taken back where a record was written before the actor stopped (those the actor names, and the last
    ones this run finished with failed rows: an actor's window starts empty after a restart), so that a
    rerun re-checks them and captions their failed rows again (pipeline.prepare); the units in flight
    have no record anyway."""
    tracker.abandon()
    for unit in sorted(set(stop.units) | set(tracker.recent_failures)):
        output.reopen_unit(unit)


def _block_attempts():
    """The attempts ledger, on the driver's node (it lives and dies with this run, not with a worker node)."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return BlockAttempts.options(scheduling_strategy=here).remote()


def _dataset(job: CaptionJob, pending: list[dict], attempts) -> ray.data.Dataset:
    ds = ray.data.from_items(pending, override_num_blocks=len(pending))
    ds = ds.map_batches(prepare_units, batch_size=1, batch_format="pyarrow", fn_kwargs={"job": job})
    # One block per generate() batch, cut inside the prepare task (Ray Data fuses the two): blocks leave a
    # unit as they are ready instead of when the whole unit is read, and the prepare stage stays a CPU task
    # apart from the model actors (no fusion across a repartition), so decoding never takes their time.
    ds = ds.repartition(target_num_rows_per_block=job.batch_size)
    ds = ds.map_batches(
        CaptionActor,
        fn_constructor_kwargs={"job": job, "attempts": attempts},
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
