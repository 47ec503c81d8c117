"""The job's adaptive budget (auto:64): tau from the first rows the job reads, once, before any row is
captioned; an output that already records a tau keeps it.

    pending(job)            an adaptive budget without tau: calibrate before claiming the output
    recorded_tau(job, out)  the job with the tau its output was started with (a resumed run)
    calibrated(job)         tau from the first `calibration_rows` readable rows, on a worker that has the
                            actors' resources (a GPU where they have one), as a Ray task

The tau becomes part of the budget (`auto:64,tau=0.93`), so the output's claim (_job.json), every row's
`keep`, the metrics' labels and the summary carry it, and a rerun resumes with the same counts. The
sample is bounded (calibration_rows images, held by the task only while it runs).
"""

from __future__ import annotations

from dataclasses import replace

import ray
from PIL import Image

from tokencarve.budgets import Adaptive, parse_budget
from tokencarve.engine import CaptionEngine, ModelInputs
from tokencarve.images import RowError

from .job import CaptionJob
from .output import Output
from .prepare import prepare_row
from .sources import ShardError, plan_units, read_unit


def pending(job: CaptionJob) -> bool:
    keep = job.engine.budget
    return isinstance(keep, Adaptive) and keep.tau is None


def with_budget(job: CaptionJob, keep: Adaptive) -> CaptionJob:
    return replace(job, engine=replace(job.engine, keep=keep))


def recorded_tau(job: CaptionJob, output: Output) -> CaptionJob:
    """The job with the tau of the same adaptive budget recorded in `output`'s claim, if there is one."""
    if not pending(job):
        return job
    held = (output.settings() or {}).get("keep")
    try:
        recorded = parse_budget(held) if isinstance(held, str) else None
    except ValueError:
        return job
    if isinstance(recorded, Adaptive) and recorded.tau is not None and recorded.uncalibrated == job.engine.keep:
        return with_budget(job, recorded)
    return job  # another setting: the claim refuses it


def calibrated(job: CaptionJob) -> CaptionJob:
    """The job with its adaptive budget calibrated on the corpus' first rows (on the connected Ray cluster)."""
    if not pending(job):
        return job
    task = _calibrate.options(num_gpus=job.num_gpus, num_cpus=job.actor_cpus)
    return with_budget(job, ray.get(task.remote(job)))


@ray.remote(max_retries=3)
def _calibrate(job: CaptionJob) -> Adaptive:
    images, prompts = first_rows(job, job.engine.calibration_rows)
    if not images:
        raise ValueError(f"no readable row to calibrate {job.engine.keep} on in {job.inputs}")
    return CaptionEngine(job.engine).calibrate(images, prompts)


def first_rows(job: CaptionJob, count: int) -> tuple[list[Image.Image], list[str | None]]:
    """The first `count` rows of the corpus that would be captioned (in the job's unit order; rows the
    prepare stage refuses and shards that cannot be read are passed over), as the model sees them."""
    inputs = ModelInputs.load(job.engine)
    images, prompts = [], []
    for unit in plan_units(job.inputs, job.input_format):
        try:
            for table in read_unit(unit):
                for row in table.to_pylist():
                    image = prepare_row(row, inputs, job)
                    if isinstance(image, RowError):
                        continue
                    images.append(image)
                    prompts.append(row["prompt"])
                    if len(images) == count:
                        return images, prompts
        except ShardError:
            continue
    return images, prompts
