"""The captioning job's settings: what to read, where to write, the engine, and how the work is spread."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tokencarve.engine import DEFAULT_SLOTS, EngineConfig
from tokencarve.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from tokencarve.settings import claim_settings

from .faults import FAULTS_ENV, parse_faults

RESERVED_CARRY = {"file", "row"}  # source_file / source_row are the job's own columns
# Rows handed to an engine per call for each of its decode slots: a call's last rows still leave slots
# idle while they finish, so the more rows per slot the less of that tail, at the cost of larger blocks
# in the object store (docs/BENCHMARKS.md, "The job's defaults": on this CPU, 16 slots with 8 rows per
# slot gave 1.18x the old default's rows/s, 4 rows per slot 1.15x)
ROWS_PER_SLOT = 8


@dataclass
class CaptionJob:
    inputs: list[str]
    output: str
    engine: EngineConfig
    input_format: str = "auto"
    carry: tuple[str, ...] = ()  # source columns copied to the output as source_<name>
    # rows per engine call (one block); None: ROWS_PER_SLOT x the engine's slots, so that the static
    # path's finished rows are refilled from the same call instead of waiting for its longest row
    batch_size: int | None = None
    min_actors: int = 1
    max_actors: int = 1
    num_gpus: float = 0.0  # per actor
    actor_cpus: float = 1.0
    rows_per_file: int = 4096  # rows per written bundle (a part holds one unit's share of it)
    merge_rows: int = 200_000  # a finished unit of at most this many rows is merged into one part
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    progress_every_s: float = 30.0  # seconds between progress lines on stderr (0: none)
    # attempts at a block whose actor faults (out of memory, lost device, died) before its rows become
    # `worker_failed` error rows
    block_attempts: int = 3
    # the systemic-failure stop (pipeline.faults.FailureWindow): when more than failure_share of the last
    # failure_window rows an actor captioned failed generation, the job stops (exit status 4) and leaves
    # their units unfinished for a rerun, rather than write a corpus of error rows
    failure_window: int = 200
    failure_share: float = 0.5
    # the test hook (pipeline.faults): faults to inject, read from the environment where the job is built
    faults: str = field(default_factory=lambda: os.environ.get(FAULTS_ENV, ""))
    run_id: str = ""  # set by run(): names this run's parts (a resumed unit re-checks earlier runs' rows)

    def __post_init__(self):
        self.carry = tuple(self.carry)
        clash = RESERVED_CARRY & set(self.carry)
        if clash:
            raise ValueError(f"--carry {sorted(clash)}: source_file / source_row are the job's own columns")
        if self.batch_size is None:
            device = "cuda" if self.num_gpus > 0 else "cpu"
            self.batch_size = ROWS_PER_SLOT * (self.engine.decode_slots or DEFAULT_SLOTS[device])
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.block_attempts < 1:
            raise ValueError("block_attempts must be >= 1")
        if self.failure_window < 1:
            raise ValueError("failure_window must be >= 1")
        if not 0 <= self.failure_share <= 1:
            raise ValueError("failure_share must be in [0, 1] (1: never stop)")
        parse_faults(self.faults)  # a mistyped hook fails here, not inside an actor

    def settings(self) -> dict:
        """What an output records and a rerun must match: the engine's whole setting (the model's
        identity, method, budget, cut, generation, prompt template, image policy, decode path) and the
        carried columns."""
        return claim_settings(self.engine) | {"carry": list(self.carry)}
