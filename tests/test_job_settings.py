"""One source of truth for engine settings (EngineConfig -> the job's and the harness' options), what an
output's claim records, its format version, and the failure-policy hook's parsing. No Ray (fast)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.faults import Fault, is_worker_fault, parse_faults
from pipeline.job import CaptionJob
from pipeline.output import FORMAT_VERSION, JOB_FILE, Output, SettingsMismatch
from tokencarve.engine import DECODE_PATHS, DEFAULT_METHOD, EngineConfig
from tokencarve.eval.__main__ import parse_args as eval_args
from tokencarve.settings import RUNTIME_ONLY, claim_defaults, claim_settings, engine_config_from_args

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


def test_the_claim_records_the_models_identity_and_the_whole_setting(tmp_path):
    def checkpoint(folder: Path, config: dict, weights: int) -> str:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "model.safetensors").write_bytes(b"\0" * weights)
        return str(folder)

    a = checkpoint(tmp_path / "a" / "llava-1.5-7b-hf", {"layers": 32}, 10)
    b = checkpoint(tmp_path / "b" / "llava-1.5-7b-hf", {"layers": 32}, 11)  # a fine-tune, same name
    claim = claim_settings(EngineConfig(model=a))
    assert claim["model"] == str(Path(a).resolve()) and claim["model_fingerprint"].startswith("sha256:")
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

    # the same folder rewritten with other weights is another model too
    (Path(a) / "model.safetensors").write_bytes(b"\0" * 12)
    with pytest.raises(SettingsMismatch, match="model_fingerprint"):
        out.claim(CaptionJob(inputs=[], output=out.location, engine=EngineConfig(model=a)).settings())


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
