"""The Serve app's settings: every engine setting, derived from `tokencarve.engine.EngineConfig`, plus
what only Serve has (request limits, batching, scaling, the API key file). No Ray here.

Each EngineConfig field becomes a setting with the field's type, default, help and choices, so Serve's
defaults cannot drift from the engine's (the batch job's and the harness's options come from the same
fields, through tokencarve.settings), and a field added to EngineConfig is a Serve setting at once.
The values are checked once, by EngineConfig itself.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, create_model, model_validator

from tokencarve.budgets import Adaptive, budget_label, parse_budget
from tokencarve.engine import EngineConfig
from tokencarve.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS

DEFAULT_MODEL = "models/carve-tiny"  # EngineConfig.model has no default; Serve's is the bundled model


class ServeOnlySettings(BaseModel):
    """The settings only Serve has; `ServeSettings` adds every engine setting to these."""

    model_config = ConfigDict(extra="forbid")
    engine_class: ClassVar[type] = EngineConfig

    # Per-request limits.
    max_new_tokens_limit: int = Field(512, ge=1, description="the most new tokens a request may ask for")
    # bounds for a per-request budget given as a count (LLaVA-1.5 has 576 tokens an image, NeXT up to
    # 2,928, OneVision 7,371); a fraction in (0, 1) of each image's tokens is always accepted
    min_keep: int = Field(16, ge=1, description="the smallest per-request budget given as a count")
    max_keep: int = Field(8192, ge=1, description="the largest per-request budget given as a count")
    max_image_bytes: int = Field(MAX_IMAGE_BYTES, ge=1, description="413 beyond")
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1, description="413 beyond")
    # Batching and scaling (one GPU per replica on GPU clusters: num_gpus=1).
    max_batch_size: int = Field(8, ge=1, description="requests per generate() call")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="how long a batch waits to fill")
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8, gt=0, description="scale out beyond ~ one full batch per replica")
    max_ongoing_requests: int = Field(16, ge=1, description="per replica; >= max_batch_size, or batches never fill")
    max_queued_requests: int = Field(64, description="per caller (each proxy); beyond it: 503 + Retry-After")
    retry_after_s: float = Field(2.0, ge=0, description="the Retry-After of a 503 (rounded up to whole seconds)")
    # A file on every node that runs a replica (e.g. a mounted secret): one key per line. The keys
    # themselves are never a setting (pipeline.auth says why); TOKENCARVE_API_KEY is the other source.
    api_key_file: str | None = Field(None, description="a file of API keys, one per line")

    @model_validator(mode="after")
    def _check(self):
        engine = self.engine_config()  # the engine's own checks: method, budget, layer, policies, decode path
        check_calibrated(engine.keep)
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be >= max_batch_size, or batches never fill")
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("max_new_tokens (the default per request) must be <= max_new_tokens_limit")
        return self

    def engine_config(self) -> EngineConfig:
        """The engine settings these hold."""
        return self.engine_class(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self.engine_class)})


def check_calibrated(keep) -> None:
    """Serve takes an adaptive budget with its tau only: replicas must agree on every image's count, and
    a request is no sample to calibrate on."""
    if isinstance(keep, Adaptive) and keep.tau is None:
        raise ValueError(
            f"keep={keep} needs its tau on Serve (e.g. {keep},tau=0.93): calibrate it with the batch job "
            "(its summary and _job.json record tau) or the harness (results.json), on images like the traffic's"
        )


def _written_budget(value):
    return parse_budget(value) if isinstance(value, str) else value


def engine_fields(config_class: type = EngineConfig) -> dict:
    """pydantic field definitions for every field of an EngineConfig-like dataclass: its type, its
    default (the model's: DEFAULT_MODEL), its help as the description and its choices in the schema."""
    hints = typing.get_type_hints(config_class)
    fields = {}
    for field in dataclasses.fields(config_class):
        default = DEFAULT_MODEL if field.default is dataclasses.MISSING else field.default
        choices = field.metadata.get("choices")
        schema = {"choices": list(choices)} if choices else None
        described = Field(default, description=field.metadata.get("help"), json_schema_extra=schema)
        hint = hints[field.name]
        if Adaptive in typing.get_args(hint):
            # a budget: written as text ("auto:64,tau=0.93", "64") or given as a number; dumped as JSON holds it
            hint = Annotated[hint, BeforeValidator(_written_budget), PlainSerializer(budget_label)]
        fields[field.name] = (hint, described)
    return fields


def settings_model(config_class: type = EngineConfig) -> type[ServeOnlySettings]:
    """The settings model: Serve's own fields and one per field of `config_class`."""
    model = create_model(
        "ServeSettings", __base__=ServeOnlySettings, __module__=__name__, **engine_fields(config_class)
    )
    model.engine_class = config_class
    return model


ServeSettings = settings_model()
