"""Engine settings on a command line, and what identifies a setting's output; both derived from
`tokencarve.engine.EngineConfig`, the one place engine defaults live.

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser, model_default="models/carve-tiny")   # --model, --keep, --method, ...
    config = engine_config_from_args(parser.parse_args())

Every EngineConfig field becomes an option (`max_new_tokens` -> `--max-new-tokens`) with the field's
default, help and choices, so the batch job and the evaluation harness cannot drift from the engine,
and a field added to EngineConfig is an option everywhere at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from pathlib import Path

from .budgets import Adaptive, budget_label
from .engine import EngineConfig, parse_budget

# Fields that change how a run goes but not what it writes: left out of an output's claim, and dropped
# from a held one before it is compared (outputs claimed while some of them were claimed resume
# whatever they are set to now). A name that is not, or not yet, an EngineConfig field is harmless.
RUNTIME_ONLY = frozenset({"device", "decode", "decode_slots", "compile_decode", "calibration_rows", "kv_cache_memory"})
# Fields claimed as the model's identity (model, model_revision, model_fingerprint), not as themselves.
IDENTITY = frozenset({"model", "revision"})
COMMIT = re.compile(r"[0-9a-f]{40}")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
FINGERPRINT_PREFIX = "sha256-content:"  # a fingerprint of the weights' contents; "sha256:" held their sizes
# weight file -> digest, so a checkpoint is read once per machine (content_digest)
DIGEST_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tokencarve" / "weight-digests.json"


def _parse(hint) -> tuple[typing.Callable | None, dict]:
    """(the type= of an option, extra add_argument keywords) for a field's type hint."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = set(typing.get_args(hint)) - {type(None)} if union else {hint}
    if kinds == {int, float, Adaptive}:
        return parse_budget, {}  # a budget: tokens per image ("128"), a fraction ("0.1") or adaptive ("auto:64")
    if kinds == {bool}:
        return None, {"action": argparse.BooleanOptionalAction}
    if len(kinds) == 1 and next(iter(kinds)) in (int, float, str):
        return next(iter(kinds)), {}
    raise TypeError(f"EngineConfig field of type {hint} has no command-line form; add one to tokencarve.settings")


def add_engine_arguments(
    parser: argparse.ArgumentParser, model_default: str | None = None, exclude: tuple[str, ...] = ()
) -> argparse._ArgumentGroup:
    """One option per EngineConfig field (but `exclude`), in one group; `model_default` is `--model`'s
    default (the field has none: a job and a harness each have their own bundled model)."""
    group = parser.add_argument_group("engine", "model and generation settings (tokencarve.engine.EngineConfig)")
    hints = typing.get_type_hints(EngineConfig)
    for field in dataclasses.fields(EngineConfig):
        if field.name in exclude:
            continue
        kind, extra = _parse(hints[field.name])
        default = model_default if field.default is dataclasses.MISSING else field.default
        help_text = field.metadata.get("help", "")
        if default is not None:
            help_text += " (default: %(default)s)"
        if kind is not None:
            extra["type"] = kind
        if "choices" in field.metadata:
            extra["choices"] = field.metadata["choices"]
        group.add_argument(
            "--" + field.name.replace("_", "-"), dest=field.name, default=default, help=help_text, **extra
        )
    return group


def engine_config_from_args(args: argparse.Namespace, **overrides) -> EngineConfig:
    """The EngineConfig the parsed options describe (fields a parser left out keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}
    return EngineConfig(**(values | overrides))


# -- what identifies a setting's output ------------------------------------------------------------------


def claim_settings(config: EngineConfig) -> dict:
    """Everything about an engine that decides the rows it writes: the model's identity (where it
    resolves to, its revision, a fingerprint of its config and weight files), the method, the budget
    (None for the stock model) and every other field but the runtime-only ones."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(EngineConfig)}
    others = {k: v for k, v in values.items() if k not in RUNTIME_ONLY | IDENTITY | {"method", "keep"}}
    identity = model_identity(config.model, getattr(config, "revision", None))
    keep = budget_label(config.budget)  # an adaptive budget in its written form, tau included
    return {"model": identity["model"], "method": config.method, "keep": keep, **others} | {
        "model_revision": identity["revision"],
        "model_fingerprint": identity["fingerprint"],
    }


def claim_defaults() -> dict:
    """Each claimed setting's default, as a claim records it. An output claimed before a setting
    existed lacks it and was written as that default writes, so a resumed run at the default matches
    it (`pipeline.output.Output.claim`); a run that sets it otherwise does not."""
    engine = {
        f.name: f.default
        for f in dataclasses.fields(EngineConfig)
        if f.default is not dataclasses.MISSING and f.name not in RUNTIME_ONLY | IDENTITY | {"method", "keep"}
    }
    return json.loads(json.dumps(engine, default=str))


def model_identity(model: str, revision: str | None = None) -> dict:
    """A local folder: its resolved path and fingerprint (a revision means nothing there). A hub id:
    the id, the revision (`revision`, the job's pinned commit, else the one the local Hugging Face
    cache has for main) and the fingerprint of that revision's snapshot when the cache holds all of it
    (else None: nothing is downloaded to tell; the commit names the contents all the same)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return {"model": str(folder.resolve()), "revision": None, "fingerprint": fingerprint(folder)}
    snapshot = _cached_snapshot(model, revision)
    if snapshot is None:
        return {"model": model, "revision": revision, "fingerprint": None}
    return {
        "model": model,
        "revision": snapshot.name,
        "fingerprint": fingerprint(snapshot) if _complete(snapshot) else None,
    }


def resolve_revision(model: str, revision: str | None = None) -> str | None:
    """The commit a hub id's `revision` (a branch, tag or commit; None: main) names now, which the job
    pins so that every load (driver and actors, this run and a resumed one) reads the same files: the
    hub's answer when it can be asked (as from_pretrained would load online), else the local cache's
    (as it would load offline). None for a local folder, and for a hub id neither reachable nor cached
    (loads then take what main is when each reads it)."""
    if Path(model).expanduser().is_dir():
        return None
    if revision is not None and COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        try:
            from huggingface_hub import HfApi

            sha = HfApi().model_info(model, revision=revision, timeout=30).sha
            if sha:
                return sha
        except Exception:  # unreachable, no such repo, no access: the cache decides
            pass
    snapshot = _cached_snapshot(model, revision)
    return snapshot.name if snapshot is not None else None


def pinned(config: EngineConfig, held: dict | None = None) -> EngineConfig:
    """`config` with the revision every load of its hub id takes: the one `held` (the output's claim)
    records for the same model, so a resumed run loads what the output was started with, else
    `resolve_revision`'s. A local folder, or a config already pinned to a commit, is returned as it is."""
    if Path(config.model).expanduser().is_dir() or (config.revision and COMMIT.fullmatch(config.revision)):
        return config
    if config.revision is None and held and held.get("model") == config.model and held.get("model_revision"):
        return dataclasses.replace(config, revision=held["model_revision"])
    resolved = resolve_revision(config.model, config.revision)
    return dataclasses.replace(config, revision=resolved) if resolved else config


def fingerprint(folder: Path) -> str:
    """A digest of a checkpoint folder's config.json, weight indexes and weight files' contents: a
    fine-tune or a retrained checkpoint saved over the same folder is another model. Each weight file
    is read once and its digest remembered by path, size, inode and mtime (`content_digest`); a Hugging
    Face cache snapshot is free, its files are links to blobs named by their content."""
    described = _described(folder) | {"weights": {p.name: content_digest(p) for p in _weight_files(folder)}}
    return FINGERPRINT_PREFIX + _digest_json(described)


def fingerprint_sizes_only(folder: Path) -> str:
    """The fingerprint outputs claimed before 2026-12-06 hold (weight file sizes, not contents): a
    claim holding one is compared in this form (`upgrade_claim`), so such an output still resumes."""
    described = _described(folder) | {"weights": {p.name: p.stat().st_size for p in _weight_files(folder)}}
    return "sha256:" + _digest_json(described)


def upgrade_claim(held: dict, settings: dict | None = None) -> dict:
    """An output's claim in today's form, where that can be told (`settings`: this run's claim):

    - runtime-only settings (RUNTIME_ONLY) an older claim recorded are dropped: they never decide a resume;
    - a sizes-only fingerprint that still describes the model folder is replaced by the folder's content
      fingerprint (the old claim cannot say more about the weights it was written with);
    - a hub id claimed with neither revision nor fingerprint (a driver that had not cached it, offline)
      takes this run's: what was unknown is completed, not refused;
    - a hub id claimed at the same revision as this run, with a fingerprint known on one side only (the
      snapshot cached on one driver and not the other), takes this run's: the commit names the files.

    Anything else is left as it is and compared."""
    held = {k: v for k, v in held.items() if k not in RUNTIME_ONLY}
    recorded = held.get("model_fingerprint")
    if isinstance(recorded, str) and not recorded.startswith(FINGERPRINT_PREFIX):
        folder = _model_folder(str(held.get("model")), held.get("model_revision"))
        if folder is not None and fingerprint_sizes_only(folder) == recorded:
            held = held | {"model_fingerprint": fingerprint(folder)}
    if settings is None or held.get("model") != settings.get("model") or Path(str(held.get("model"))).is_absolute():
        return held  # a local folder's claim (a resolved path), or another model: compared as it is
    identity = {k: settings.get(k) for k in ("model_revision", "model_fingerprint")}
    revision, fingerprints = held.get("model_revision"), (held.get("model_fingerprint"), identity["model_fingerprint"])
    if revision is None and fingerprints[0] is None:
        return held | identity
    if revision is not None and revision == identity["model_revision"] and None in fingerprints:
        return held | identity
    return held


def content_digest(path: Path) -> str:
    """The sha256 of a weight file's bytes, read in 16 MiB pieces and kept in DIGEST_CACHE (by resolved
    path, size, inode and mtime: a file written again gets a new inode or mtime) so a rerun or the next
    job on the same checkpoint does not read it again. A file in a Hugging Face cache is a link to a
    blob named by its content (sha256 for LFS files, the git blob id for others): that name is used."""
    target = path.resolve()
    if target.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", target.name):
        return "blob:" + target.name
    stat = target.stat()
    key = f"{target}|{stat.st_size}|{stat.st_ino}|{stat.st_mtime_ns}"
    cache = _read_digest_cache()
    if key not in cache:
        hasher = hashlib.sha256()
        with open(target, "rb") as stream:
            while piece := stream.read(16 << 20):
                hasher.update(piece)
        cache[key] = "sha256:" + hasher.hexdigest()
        _write_digest_cache(cache)
    return cache[key]


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def _described(folder: Path) -> dict:
    files = sorted(p for p in folder.iterdir() if p.is_file())

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    return {
        "config": [digest(p) for p in files if p.name == "config.json"],
        "indexes": {p.name: digest(p) for p in files if p.name.endswith(".index.json")},
    }


def _digest_json(described: dict) -> str:
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def _model_folder(model: str, revision: str | None) -> Path | None:
    """The folder a claim's model names on this machine: a local path, or the cached hub snapshot of
    the recorded revision (None when neither is here)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder
    return _cached_snapshot(model, revision)


def _complete(snapshot: Path) -> bool:
    """Whether a cached hub snapshot holds the whole checkpoint (a driver that only read its config, or
    a download cut short, holds part of it): its config, and every weight file its index names, or
    one weight file where it has no index."""
    if not (snapshot / "config.json").is_file():
        return False
    indexes = [p for p in snapshot.iterdir() if p.name.endswith(".index.json")]
    if not indexes:
        return bool(_weight_files(snapshot))
    try:
        names = {n for p in indexes for n in json.loads(p.read_text()).get("weight_map", {}).values()}
    except (OSError, ValueError, AttributeError):
        return False
    return bool(names) and all((snapshot / name).is_file() for name in names)


def _read_digest_cache() -> dict:
    try:
        cache = json.loads(DIGEST_CACHE.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: the digests are taken again
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_digest_cache(cache: dict) -> None:
    """Best effort and atomic (a rename): a process racing this one loses at most its own new entry;
    a read-only home only costs reading the weights again next time."""
    try:
        DIGEST_CACHE.parent.mkdir(parents=True, exist_ok=True)
        scratch = DIGEST_CACHE.with_name(f"{DIGEST_CACHE.name}.{os.getpid()}.tmp")
        scratch.write_text(json.dumps(cache, sort_keys=True))
        os.replace(scratch, DIGEST_CACHE)
    except OSError:
        pass


def _cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The snapshot folder the local Hugging Face cache holds for `revision` (a commit, or a branch or
    tag it has a ref for; None: main), or None when it has none with a config.json."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # not a valid repo id (a missing local path, say): nothing to resolve
        return None
    return Path(found).parent if isinstance(found, str) else None
