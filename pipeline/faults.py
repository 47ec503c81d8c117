"""Which failures are a row's, which are a worker's and which are the job's, and the test hook that
injects them.

A row-level failure (generation raises on one row's input) becomes an error row; a worker-level
fault (CUDA out of memory, a lost or broken device, a torch.compile error) leaves the worker process
unusable, so the actor ends its process and Ray restarts it and retries the block (pipeline.caption).
A systemic failure (more than a share of the last rows an actor captioned failed generation: a broken
setting, a transformers regression, not the rows) stops the job (`FailureWindow`, `SystemicFailure`).

The test hook: `TOKENCARVE_INJECT_FAULTS`, in the environment of the process that builds the job
(`CaptionJob.faults` reads it there and carries it to the actors), a comma-separated list of
`<kind>@<row id>[#<attempts>]`:

    raise@<id>   generation raises on every batch that holds the row (a row-level failure); raise@*:
                 on every batch (every row fails: a systemic failure)
    oom@<id>     generation raises torch.OutOfMemoryError (a worker-level fault)
    kill@<id>    the actor's process is killed (SIGKILL) mid-block, as by the kernel's OOM killer
    #<n>         only on the block's first n attempts (kill@row-7#1: killed once, then captioned)

Nothing is injected when the variable is unset or empty.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import deque
from dataclasses import dataclass

import torch

FAULTS_ENV = "TOKENCARVE_INJECT_FAULTS"
KINDS = ("raise", "oom", "kill")
# RuntimeError texts of a CUDA worker that cannot go on (its context or device is gone)
WORKER_FAULT_TEXTS = ("out of memory", "CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert", "NCCL")


def is_worker_fault(error: BaseException) -> bool:
    """A fault of the worker (its memory, its device, its compiled code), not of the rows it was given."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError, *compile_errors())):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in WORKER_FAULT_TEXTS)


def compile_errors() -> tuple[type[BaseException], ...]:
    """torch.compile's exception types (dynamo's, a recompile limit hit, inductor's), from the modules
    that raise them where they are loaded: an error of theirs can only come from a loaded module, and
    a worker that never compiled does not pay for importing the compiler."""
    dynamo, inductor = sys.modules.get("torch._dynamo.exc"), sys.modules.get("torch._inductor.exc")
    names = [(dynamo, "TorchDynamoException"), (dynamo, "FailOnRecompileLimitHit"), (inductor, "InductorError")]
    return tuple(getattr(module, name) for module, name in names if hasattr(module, name))


class SystemicFailure(Exception):
    """More than `share` of the last `window` rows an actor captioned failed generation: the fault is
    the job's (a setting, the model, the software), not the rows'. The job stops (exit status 4)
    rather than write a corpus of error rows; `units` (those of the failed rows) are left unfinished,
    so that a rerun captions their rows again."""

    def __init__(self, failed: int, seen: int, window: int, share: float, first_error: str, units: tuple[str, ...]):
        self.failed, self.seen, self.window, self.share = failed, seen, window, share
        self.first_error, self.units = first_error, units
        super().__init__(
            f"{failed} of the last {seen} rows an actor captioned failed generation (the limit: {share:.0%} of "
            f"the last {window}): a systemic fault, not the rows'. The first of them: {first_error}"
        )

    def __reduce__(self):  # crosses from the actor to the driver intact
        return type(self), (self.failed, self.seen, self.window, self.share, self.first_error, self.units)


def systemic_failure(error: BaseException | None) -> SystemicFailure | None:
    """The SystemicFailure an exception is or wraps (Ray and Ray Data wrap an actor's exception: `cause`,
    `__cause__`), or None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error) is SystemicFailure:  # Ray's wrapper is a subclass of it without its fields
            return error
        cause = getattr(error, "cause", None)
        error = cause if isinstance(cause, BaseException) else error.__cause__ or error.__context__
    return None


class FailureWindow:
    """Which of the last `size` rows an actor captioned failed generation (a deque: bounded, whatever
    the corpus). `check` raises SystemicFailure when more than `share` x `size` of them did; isolated
    failures (fewer) stay error rows. An actor that captions fewer than that many rows never stops."""

    def __init__(self, size: int, share: float):
        self.size, self.share = size, share
        self.rows: deque[tuple[str, str] | None] = deque(maxlen=size)  # (unit, error) of a failed row; None: ok

    def add(self, unit: str, error: str | None) -> None:
        """One captioned row: `error` is its generation's failure, None when it was captioned."""
        self.rows.append(None if error is None else (unit, error))

    def check(self) -> None:
        failed = [row for row in self.rows if row is not None]
        if len(failed) > self.share * self.size:
            units = tuple(sorted({unit for unit, _ in failed}))
            raise SystemicFailure(len(failed), len(self.rows), self.size, self.share, failed[0][1], units)


@dataclass(frozen=True)
class Fault:
    kind: str
    row_id: str
    attempts: int | None = None  # None: every attempt

    def fires(self, ids: list[str], attempt: int) -> bool:
        hit = self.row_id in ids or self.row_id == "*" and bool(ids)
        return hit and (self.attempts is None or attempt <= self.attempts)


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
        row_id = ids[0] if fault.row_id == "*" else fault.row_id
        raise RuntimeError(f"generation failed (injected for row {row_id})")
