"""Which failures are a row's and which are a worker's, and the test hook that injects both.

A row-level failure (generation raises on one row's input) becomes an error row; a worker-level
fault (CUDA out of memory, a lost or broken device) leaves the worker process unusable, so the
actor ends its process and Ray restarts it and retries the block (pipeline.caption).

The test hook: `TOKENCARVE_INJECT_FAULTS`, in the environment of the process that builds the job
(`CaptionJob.faults` reads it there and carries it to the actors), a comma-separated list of
`<kind>@<row id>[#<attempts>]`:

    raise@<id>   generation raises on every batch that holds the row (a row-level failure)
    oom@<id>     generation raises torch.OutOfMemoryError (a worker-level fault)
    kill@<id>    the actor's process is killed (SIGKILL) mid-block, as by the kernel's OOM killer
    #<n>         only on the block's first n attempts (kill@row-7#1: killed once, then captioned)

Nothing is injected when the variable is unset or empty.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch

FAULTS_ENV = "TOKENCARVE_INJECT_FAULTS"
KINDS = ("raise", "oom", "kill")
# RuntimeError texts of a CUDA worker that cannot go on (its context or device is gone)
WORKER_FAULT_TEXTS = ("out of memory", "CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert", "NCCL")


def is_worker_fault(error: BaseException) -> bool:
    """A fault of the worker (its memory or device), not of the rows it was given."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in WORKER_FAULT_TEXTS)


@dataclass(frozen=True)
class Fault:
    kind: str
    row_id: str
    attempts: int | None = None  # None: every attempt

    def fires(self, ids: list[str], attempt: int) -> bool:
        return self.row_id in ids and (self.attempts is None or attempt <= self.attempts)


def parse_faults(spec: str) -> tuple[Fault, ...]:
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, target = item.partition("@")
        row_id, _, attempts = target.partition("#")
        if kind not in KINDS or not row_id or (attempts and not attempts.isdigit()):
            raise ValueError(f"{FAULTS_ENV}: {item!r} is not <{'|'.join(KINDS)}>@<row id>[#<attempts>]")
        faults.append(Fault(kind, row_id, int(attempts) if attempts else None))
    return tuple(faults)


def inject(faults: tuple[Fault, ...], ids: list[str], attempt: int) -> None:
    """Called before each generate() of a block's rows: raise or die as the hook says."""
    for fault in faults:
        if not fault.fires(ids, attempt):
            continue
        if fault.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault.kind == "oom":
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected for row {fault.row_id})")
        raise RuntimeError(f"generation failed (injected for row {fault.row_id})")
