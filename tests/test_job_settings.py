"""One source of truth for engine settings (EngineConfig -> the job's and the harness' options), what an
output's claim records, its format version, and the failure-policy hook's parsing. No Ray (fast)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.faults import Fault, is_worker_fault, parse_faults
from pipeline.job import CaptionJob
from pipeline.output import FORMAT_VERSION, JOB_FILE, Output, SettingsMismatch
from tokencarve import settings as engine_settings
from tokencarve.engine import DECODE_PATHS, DEFAULT_METHOD, EngineConfig
from tokencarve.eval.__main__ import parse_args as eval_args
from tokencarve.settings import (
    RUNTIME_ONLY,
    claim_defaults,
    claim_settings,
    engine_config_from_args,
    fingerprint_sizes_only,
    upgrade_claim,
)

ROOT = Path(__file__).resolve().parent.parent


def load_job_module():
    spec = importlib.util.spec_from_file_location("caption_corpus", ROOT / "jobs" / "caption_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_job_and_the_harness_take_every_engine_setting_with_the_engines_defaults():
    job = load_job_module()
    engine = job.build_job(job.parse_args([])).engine
    assert engine == EngineConfig(model=str(job.DEFAULT_MODEL))  # every default is the engine's own
    assert engine.max_new_tokens == EngineConfig.max_new_tokens and engine.method == DEFAULT_METHOD

    harness = eval_args(["--data", "questions.parquet"])
    assert engine_config_from_args(harness, method="none") == EngineConfig(model="models/carve-tiny", method="none")
    assert not hasattr(harness, "keep") and not hasattr(harness, "method")  # the harness sweeps those itself

    # every field is an option, named after it, and reaches the EngineConfig
    options = {
        "keep": "0.25",
        "method": "tokencarve",
        "layer": "3",
        "positions": "1d",
        "max_new_tokens": "7",
        "device": "cpu",
        "dtype": "float32",
        "prompt_template": "<image> {prompt}",
        "max_prompt_tokens": "99",
        "image_policy": "processor",
        "seed": "5",
        "decode": "static",
        "decode_slots": "4",
    }
    fields = {f.name for f in dataclasses.fields(EngineConfig)} - {"model"}
    untested = fields - options.keys()
    argv = [arg for name, value in options.items() for arg in (f"--{name.replace('_', '-')}", value)]
    parsed = job.build_job(job.parse_args(argv)).engine
    for name in options.keys() & fields:
        assert str(getattr(parsed, name)) == options[name], name
    assert parsed.keep == 0.25 and parsed.layer == 3  # typed as the field is
    for name in untested:  # a field added since this test was written: an option all the same
        assert getattr(job.parse_args([]), name) == getattr(EngineConfig(model="m"), name), name

    assert job.build_job(job.parse_args(["--no-carve"])).engine.method == "none"
    with pytest.raises(SystemExit):
        job.parse_args(["--method", "no-such-method"])  # the field's choices


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    """Weight digests are remembered in the user's cache; each test here has its own."""
    cache = tmp_path / "cache" / "weight-digests.json"
    monkeypatch.setattr(engine_settings, "DIGEST_CACHE", cache)
    return cache


def test_the_claim_records_the_models_identity_and_the_whole_setting(tmp_path):
    def checkpoint(folder: Path, config: dict, weights: int) -> str:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "model.safetensors").write_bytes(b"\0" * weights)
        return str(folder)

    a = checkpoint(tmp_path / "a" / "llava-1.5-7b-hf", {"layers": 32}, 10)
    b = checkpoint(tmp_path / "b" / "llava-1.5-7b-hf", {"layers": 32}, 11)  # a fine-tune, same name
    claim = claim_settings(EngineConfig(model=a))
    assert claim["model"] == str(Path(a).resolve()) and claim["model_fingerprint"].startswith(
        engine_settings.FINGERPRINT_PREFIX
    )
    assert not RUNTIME_ONLY & claim.keys() and {"layer", "max_new_tokens", "prompt_template", "image_policy"} <= (
        claim.keys()
    )

    out = Output(str(tmp_path / "out"))
    out.claim(CaptionJob(inputs=[], output=out.location, engine=EngineConfig(model=a)).settings())
    out.claim(CaptionJob(inputs=[], output=out.location, engine=EngineConfig(model=a, device="cpu")).settings())
    for other in (
        EngineConfig(model=b),
        EngineConfig(model=a, layer=3),
        EngineConfig(model=a, max_new_tokens=8),
        EngineConfig(model=a, prompt_template="USER: <image>\n{prompt} ASSISTANT:"),
        EngineConfig(model=a, image_policy="processor"),
        EngineConfig(model=a, decode=next(d for d in DECODE_PATHS if d != EngineConfig.decode)),
    ):
        with pytest.raises(SettingsMismatch, match="differs in"):
            out.claim(CaptionJob(inputs=[], output=out.location, engine=other).settings())

    # the same folder rewritten with other weights is another model too, also at the same size (a
    # retrained checkpoint): written as savers and copies do, to a new file renamed over the old one
    retrained = Path(a) / "model.safetensors.partial"
    retrained.write_bytes(b"\1" * 10)
    retrained.replace(Path(a) / "model.safetensors")
    with pytest.raises(SettingsMismatch, match="model_fingerprint"):
        out.claim(CaptionJob(inputs=[], output=out.location, engine=EngineConfig(model=a)).settings())


def test_weight_digests_are_of_the_contents_remembered_and_free_for_hub_blobs(tmp_path, digest_cache):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(b"weights" * 1000)
    first = engine_settings.fingerprint(folder)
    assert engine_settings.content_digest(weights) == "sha256:" + hashlib.sha256(b"weights" * 1000).hexdigest()
    assert len(json.loads(digest_cache.read_text())) == 1  # remembered by path, size, inode and mtime

    # a remembered digest is used as long as the file is the one it was taken of
    key = next(iter(json.loads(digest_cache.read_text())))
    digest_cache.write_text(json.dumps({key: "sha256:remembered"}))
    assert engine_settings.content_digest(weights) == "sha256:remembered"
    for unreadable in ("not json", "[]"):  # a damaged cache costs a read of the file, never the run
        digest_cache.write_text(unreadable)
        assert engine_settings.fingerprint(folder) == first

    # a Hugging Face cache snapshot links each file to a blob named by its content: no read at all
    blob = tmp_path / "hub" / "blobs" / ("ab" * 32)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"anything")
    snapshot = tmp_path / "hub" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(blob)
    assert engine_settings.content_digest(snapshot / "model.safetensors") == "blob:" + "ab" * 32


def test_an_output_claimed_with_a_sizes_only_fingerprint_resumes_while_the_weights_match_it(tmp_path):
    """Claims written before weight contents were digested hold a fingerprint of file sizes: such an
    output still resumes on the folder that fingerprint describes, and is refused once it does not."""
    a = tmp_path / "model-a"
    a.mkdir()
    (a / "config.json").write_text('{"model_type": "llava"}')
    (a / "model.safetensors").write_bytes(b"\0" * 10)
    out = Output(str(tmp_path / "out"))
    settings = CaptionJob(inputs=[], output=out.location, engine=EngineConfig(model=str(a))).settings()
    older = settings | {"model_fingerprint": fingerprint_sizes_only(a)}
    assert older["model_fingerprint"].startswith("sha256:") and older != settings
    Path(out.location).mkdir()
    (Path(out.location) / JOB_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **older}))
    assert upgrade_claim(older) == settings
    with pytest.raises(SettingsMismatch, match="model_fingerprint"):
        out.claim(settings, claim_defaults())  # without the upgrade the two forms differ
    out.claim(settings, claim_defaults(), upgrade_claim)
    # the resumed output now records the contents, so weights retrained at the same sizes are refused
    assert out.settings()["model_fingerprint"] == settings["model_fingerprint"]
    retrained = a / "model.safetensors.partial"
    retrained.write_bytes(b"\1" * 10)
    retrained.replace(a / "model.safetensors")
    assert fingerprint_sizes_only(a) == older["model_fingerprint"]  # the old form cannot tell them apart
    changed = CaptionJob(inputs=[], output=out.location, engine=EngineConfig(model=str(a))).settings()
    with pytest.raises(SettingsMismatch, match="model_fingerprint"):
        out.claim(changed, claim_defaults(), upgrade_claim)

    # a sizes-only claim the folder no longer matches is left as it is, and refused
    (a / "model.safetensors").write_bytes(b"\0" * 12)
    assert upgrade_claim(older) == older


def test_an_output_claimed_before_a_setting_existed_resumes_at_its_default(tmp_path):
    """An upgrade that adds an engine setting (`positions`, say) must not strand a half-written corpus:
    the older claim lacks the setting and was written as its default writes, so a rerun at the
    default resumes it, and a rerun that sets it otherwise is still refused."""
    a = str(tmp_path / "model-a")
    Path(a).mkdir()
    (Path(a) / "config.json").write_text('{"model_type": "llava"}')
    out = Output(str(tmp_path / "out"))
    settings = CaptionJob(inputs=[], output=out.location, engine=EngineConfig(model=a)).settings()
    older = {k: v for k, v in settings.items() if k != "positions"}
    Path(out.location).mkdir()
    (Path(out.location) / JOB_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **older}))
    with pytest.raises(SettingsMismatch, match="positions"):
        out.claim(settings)  # without the defaults: the missing key is a difference
    out.claim(settings, claim_defaults())
    changed = CaptionJob(inputs=[], output=out.location, engine=EngineConfig(model=a, positions="1d"))
    with pytest.raises(SettingsMismatch, match="positions: '3d' then, '1d' now"):
        out.claim(changed.settings(), claim_defaults())


@pytest.mark.parametrize("version, advice", [(FORMAT_VERSION - 1, "older version"), (FORMAT_VERSION + 1, "upgrade")])
def test_an_output_of_another_format_is_refused_with_what_to_do(tmp_path, version, advice):
    settings = {"model": "m", "method": "volume", "keep": 64, "carry": []}
    (tmp_path / JOB_FILE).write_text(json.dumps({"format_version": version, **settings}))
    with pytest.raises(SettingsMismatch, match=advice):
        Output(str(tmp_path)).claim(settings)


def test_the_job_exits_2_on_an_output_of_an_older_format(tmp_path, capsys):
    (tmp_path / JOB_FILE).write_text(json.dumps({"format_version": 2, "model": "carve-tiny"}))
    assert load_job_module().main(["--output", str(tmp_path)]) == 2
    assert "older version of the job" in capsys.readouterr().err


def test_the_production_serve_config_follows_the_default_method():
    config = yaml.safe_load((ROOT / "jobs" / "serve_config.yaml").read_text())
    assert "method" not in config["applications"][0]["args"]


def test_the_fault_hook_parses_and_refuses_typos():
    assert parse_faults("") == ()
    assert parse_faults("raise@a-2, kill@b-1#1") == (Fault("raise", "a-2"), Fault("kill", "b-1", 1))
    for bad in ("explode@a", "raise", "raise@", "kill@a#x"):
        with pytest.raises(ValueError, match="TOKENCARVE_INJECT_FAULTS"):
            parse_faults(bad)
    with pytest.raises(ValueError):
        CaptionJob(inputs=[], output="out", engine=EngineConfig(model="m"), faults="oops@x")


def test_worker_faults_are_told_from_row_failures():
    assert is_worker_fault(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_worker_fault(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_worker_fault(RuntimeError("shape mismatch in the carve"))
    assert not is_worker_fault(ValueError("CUDA error in a prompt is just text"))
