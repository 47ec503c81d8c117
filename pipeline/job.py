"""The captioning job's settings: what to read, where to write, the engine, and how the work is spread."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tokencarve.engine import EngineConfig
from tokencarve.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from tokencarve.settings import claim_settings

from .faults import FAULTS_ENV, parse_faults

RESERVED_CARRY = {"file", "row"}  # source_file / source_row are the job's own columns


@dataclass
class CaptionJob:
    inputs: list[str]
    output: str
    engine: EngineConfig
    input_format: str = "auto"
    carry: tuple[str, ...] = ()  # source columns copied to the output as source_<name>
    batch_size: int = 8  # rows per generate() call
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
    # the test hook (pipeline.faults): faults to inject, read from the environment where the job is built
    faults: str = field(default_factory=lambda: os.environ.get(FAULTS_ENV, ""))
    run_id: str = ""  # set by run(): names this run's parts (a resumed unit re-checks earlier runs' rows)

    def __post_init__(self):
        self.carry = tuple(self.carry)
        clash = RESERVED_CARRY & set(self.carry)
        if clash:
            raise ValueError(f"--carry {sorted(clash)}: source_file / source_row are the job's own columns")
        if self.block_attempts < 1:
            raise ValueError("block_attempts must be >= 1")
        parse_faults(self.faults)  # a mistyped hook fails here, not inside an actor

    def settings(self) -> dict:
        """What an output records and a rerun must match: the engine's whole setting (the model's
        identity, method, budget, cut, generation, prompt template, image policy, decode path) and the
        carried columns."""
        return claim_settings(self.engine) | {"carry": list(self.carry)}
