"""One source of truth for engine settings (EngineConfig -> the job's and the harness' options), what an
output's claim records (runtime-only settings never, a hub id's pinned revision, completed when it was
unknown: tested on a hub-style cache folder, offline), its format version, the engine's refusals made
before the claim, the failure policy's parts (worker faults, the hook, the systemic-failure window, a
resumed unit's failed rows). No Ray (fast)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
from pathlib import Path

import huggingface_hub
import pyarrow as pa
import pytest
import torch
import yaml

from pipeline.faults import (
    FailureWindow,
    Fault,
    SystemicFailure,
    inject,
    is_worker_fault,
    parse_faults,
    systemic_failure,
)
from pipeline.job import CaptionJob
from pipeline.output import FORMAT_VERSION, JOB_FILE, Output, SettingsMismatch, output_schema
from pipeline.write import merge_unit
from tokencarve import settings as engine_settings
from tokencarve.engine import DECODE_PATHS, DEFAULT_METHOD, CaptionEngine, EngineConfig
from tokencarve.eval.__main__ import parse_args as eval_args
from tokencarve.loading import load_llava, load_processor
from tokencarve.settings import (
    RUNTIME_ONLY,
    claim_defaults,
    claim_settings,
    engine_config_from_args,
    fingerprint_sizes_only,
    pinned,
    resolve_revision,
    upgrade_claim,
)

ROOT = Path(__file__).resolve().parent.parent
CARVE_TINY = ROOT / "models" / "carve-tiny"


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


# -- runtime-only settings ----------------------------------------------------------------------------------


def test_runtime_only_settings_never_block_a_resume(tmp_path):
    """How a run decodes (the path, a compiled step, slots, the KV budget), where, and on how many rows an
    adaptive budget is calibrated change how it goes, not what it writes (the recorded tau is the budget's):
    an output resumes whatever they are set to, also one claimed while they were claimed."""
    assert {"device", "decode", "decode_slots", "compile_decode", "calibration_rows", "kv_cache_memory"} <= RUNTIME_ONLY
    a = tmp_path / "model-a"
    a.mkdir()
    (a / "config.json").write_text('{"model_type": "llava"}')
    out = Output(str(tmp_path / "out"))

    def claim(**engine):
        settings = CaptionJob(inputs=[], output=out.location, engine=EngineConfig(model=str(a), **engine)).settings()
        out.claim(settings, claim_defaults(), upgrade_claim)

    changes = {
        "decode": next(d for d in DECODE_PATHS if d != EngineConfig.decode),
        "compile_decode": "yes",
        "decode_slots": 4,
        "calibration_rows": 8,
        "kv_cache_memory": 0.25,
        "device": "cpu",
    }
    claim()
    for name, value in changes.items():
        claim(**{name: value})
    claim(**changes)
    with pytest.raises(SettingsMismatch, match="max_new_tokens"):  # what decides the rows still refuses
        claim(max_new_tokens=8, **changes)

    # an output claimed when some of them were claimed: they are dropped from its claim, not compared
    settings = CaptionJob(inputs=[], output=out.location, engine=EngineConfig(model=str(a))).settings()
    older = settings | {"decode": "static", "compile_decode": "auto", "calibration_rows": 256, "decode_slots": 8}
    (Path(out.location) / JOB_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **older}))
    claim(decode="generate", decode_slots=2, compile_decode="no", calibration_rows=64)
    assert out.settings() == {"format_version": FORMAT_VERSION, **settings}  # rewritten in today's form


# -- a hub id's revision: pinned, claimed, completed; tested on a hub-style cache folder, offline ------------

REPO = "carve/tiny"
SHA1, SHA2 = hashlib.sha1(b"first").hexdigest(), hashlib.sha1(b"second").hexdigest()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline, in place of the user's: the environment for processes
    started from here, huggingface_hub's constants for this one (it reads the environment at import)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.setenv(name, str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_download(cache: Path, sha: str, files: set[str] | None = None, edits: dict | None = None) -> Path:
    """carve-tiny (`files` of it; `edits`: name -> other bytes) as a hub download of REPO at commit `sha`
    lies in the cache: each file a link to a blob named by the sha256 of its content, refs/main naming
    the commit (the latest download is main)."""
    root = cache / ("models--" + REPO.replace("/", "--"))
    snapshot = root / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for source in sorted(CARVE_TINY.iterdir()):
        if files is not None and source.name not in files:
            continue
        data = (edits or {}).get(source.name, source.read_bytes())
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / source.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(sha)
    return snapshot


def test_a_hub_id_claimed_before_it_was_cached_is_completed_on_the_next_run(tmp_path, hub_cache, monkeypatch):
    """The documented "submit the same command again" after a first run on a driver that had not cached
    the model (its revision and fingerprint unknown) resumes, and the claim is completed; later runs load
    the output's revision even once the hub has moved on, and a driver with part of the checkpoint
    cached (the configs it read) resumes too: the commit names the files."""
    out = Output(str(tmp_path / "out"))
    engine = EngineConfig(model=REPO)

    def claim(config: EngineConfig) -> dict:
        out.claim(CaptionJob(inputs=[], output=out.location, engine=config).settings(), claim_defaults(), upgrade_claim)
        return out.settings()

    # a driver, offline, without the model cached: nothing to pin, nothing to fingerprint
    assert resolve_revision(REPO) is None and pinned(engine, out.settings()) == engine
    held = claim(engine)
    assert (held["model"], held["model_revision"], held["model_fingerprint"]) == (REPO, None, None)
    assert "revision" not in held  # the field is claimed as the model's identity, not on its own

    # the next run, the model cached: pinned to the cached commit, and the claim completed, not refused
    snapshot = cache_download(hub_cache, SHA1)
    second = pinned(engine, out.settings())
    assert second.revision == SHA1 == resolve_revision(REPO) == resolve_revision(REPO, "main")
    held = claim(second)
    assert held["model_revision"] == SHA1 and held["model_fingerprint"] == engine_settings.fingerprint(snapshot)
    assert held["model_fingerprint"].startswith(engine_settings.FINGERPRINT_PREFIX)

    # the hub moves on (main is another commit): a rerun still loads the output's revision, and resumes
    cache_download(hub_cache, SHA2, edits={"config.json": b'{"model_type": "llava"}'})
    assert resolve_revision(REPO) == SHA2 and pinned(engine, out.settings()).revision == SHA1
    claim(pinned(engine, out.settings()))
    for newer in (SHA2, "main"):  # asked for the new weights: refused, not mixed into the output
        with pytest.raises(SettingsMismatch, match="model_revision"):
            claim(pinned(dataclasses.replace(engine, revision=newer), out.settings()))

    # another driver, which has read the model's configs but not its weights: the same revision resumes
    # (no fingerprint to take there), and the first driver's next run records its fingerprint again
    elsewhere = tmp_path / "other-cache"
    cache_download(elsewhere, SHA1, files={"config.json", "generation_config.json"})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(elsewhere))
    assert claim(pinned(engine, out.settings()))["model_fingerprint"] is None
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    assert claim(pinned(engine, out.settings())) == held


def test_every_load_reads_the_pinned_revision_from_a_hub_cache_offline(hub_cache):
    """load_llava / load_processor pass `revision=` to every file they read: with main at a newer
    commit, the pinned one is what loads."""
    template = (CARVE_TINY / "chat_template.jinja").read_text()
    config = json.loads((CARVE_TINY / "config.json").read_text()) | {"tokencarve_test_commit": "second"}
    cache_download(hub_cache, SHA1)
    cache_download(
        hub_cache,
        SHA2,
        edits={
            "config.json": json.dumps(config).encode(),
            "chat_template.jinja": b"{{ 'second' }}" + template.encode(),
        },
    )
    model, processor = load_llava(REPO, "cpu", "float32", revision=SHA1)
    assert not hasattr(model.config, "tokencarve_test_commit")
    assert processor.chat_template == template
    assert load_processor(REPO, revision=SHA1).chat_template == template
    latest, latest_processor = load_llava(REPO, "cpu", "float32")  # unpinned: main
    assert latest.config.tokencarve_test_commit == "second"
    assert latest_processor.chat_template.startswith("{{ 'second' }}")
    assert resolve_revision(str(CARVE_TINY)) is None and pinned(EngineConfig(model=str(CARVE_TINY))).revision is None


def job_without_ray(monkeypatch):
    """The job's module with Ray and the run stubbed out: main() up to the claim, and the job it hands on."""
    job = load_job_module()
    started = []
    monkeypatch.setattr(job.ray, "init", lambda *args, **kwargs: None)
    summary = {"ray_data_stats": None, "failed_shards": [], "rows_worker_failed": 0, "units_failed": 0}
    monkeypatch.setattr(job, "run", lambda caption_job: started.append(caption_job) or dict(summary))
    return job, started


def test_the_job_pins_a_hub_id_on_the_driver_before_it_claims(tmp_path, hub_cache, monkeypatch):
    cache_download(hub_cache, SHA1)
    job, started = job_without_ray(monkeypatch)
    out = tmp_path / "out"
    assert job.main(["--model", REPO, "--output", str(out)]) == 0
    assert started[0].engine.revision == SHA1  # what every actor and task loads
    held = json.loads((out / JOB_FILE).read_text())
    assert held["model_revision"] == SHA1 and held["model_fingerprint"] is not None


# -- refusals made before the claim -------------------------------------------------------------------------


def test_a_setting_the_engine_refuses_is_refused_before_the_output_is_claimed(tmp_path, monkeypatch, capsys):
    """A checkpoint whose generation config the static path cannot apply: the job exits 2 with the
    engine's own message, before anything is claimed (so the advised rerun with --decode generate runs),
    instead of Ray's stack trace from the actors after the claim."""
    model = tmp_path / "carve-tiny-ngram"
    shutil.copytree(CARVE_TINY, model)
    generation = json.loads((model / "generation_config.json").read_text()) | {"no_repeat_ngram_size": 3}
    (model / "generation_config.json").write_text(json.dumps(generation))
    with pytest.raises(ValueError) as refused:
        CaptionEngine(EngineConfig(model=str(model)))  # what each actor would say
    assert "no_repeat_ngram_size" in str(refused.value)

    job, started = job_without_ray(monkeypatch)
    out = tmp_path / "out"
    assert job.main(["--model", str(model), "--output", str(out)]) == 2
    assert f"error: {refused.value}" in capsys.readouterr().err
    assert not out.exists() and not started
    assert job.main(["--model", str(model), "--output", str(out), "--decode", "generate"]) == 0
    assert (out / JOB_FILE).exists() and started[0].engine.decode == "generate"


# -- the failure policy's parts -----------------------------------------------------------------------------


def test_compile_errors_are_worker_faults():
    import torch._dynamo.exc as dynamo
    from torch._inductor.exc import InductorError

    inner = RuntimeError("a kernel failed to build")
    for error in (
        dynamo.BackendCompilerFailed(lambda *a: None, inner, None),
        dynamo.TorchRuntimeError("an op failed while tracing"),
        InductorError(inner, None),
        dynamo.FailOnRecompileLimitHit("Hard failure due to fullgraph=True"),
    ):
        assert is_worker_fault(error), type(error)


def test_the_fault_hook_can_fail_every_row():
    (fault,) = parse_faults("raise@*")
    assert fault == Fault("raise", "*") and fault.fires(["a", "b"], 1) and not fault.fires([], 1)
    with pytest.raises(RuntimeError, match="injected for row b-3"):
        inject((fault,), ["b-3", "b-4"], attempt=1)


def test_the_systemic_failure_window_stops_on_a_share_of_recent_rows_not_on_isolated_failures():
    window = FailureWindow(size=10, share=0.5)
    for i in range(1000):  # a row in five fails, for long: under the share, never a stop
        window.add(f"unit-{i // 100}", "ValueError: a bad row" if i % 5 == 0 else None)
        window.check()
    assert len(window.rows) == 10  # bounded, whatever the corpus

    window = FailureWindow(size=10, share=0.5)
    for unit, error in [("a", None)] * 4 + [("a", "E1: broke"), ("a", "E2"), ("b", "E3"), ("b", None)]:
        window.add(unit, error)
    window.add("b", "E4")
    window.add("c", "E5")
    window.check()  # 5 of 10: at the share, not over it
    window.add("c", "E6")  # 6 of the last 10 (the oldest, captioned, has left the window)
    with pytest.raises(SystemicFailure) as stop:
        window.check()
    assert (stop.value.failed, stop.value.seen, stop.value.first_error, stop.value.units) == (
        6,
        10,
        "E1: broke",
        ("a", "b", "c"),
    )
    assert "6 of the last 10 rows" in str(stop.value) and "E1: broke" in str(stop.value)

    few = FailureWindow(size=200, share=0.5)
    for _ in range(100):  # an actor that captions fewer than the share of the window: never stopped
        few.add("a", "E")
    few.check()
    never, strict = FailureWindow(size=4, share=1.0), FailureWindow(size=4, share=0.0)
    for window in (never, strict):
        window.add("a", "E")
    never.check()
    with pytest.raises(SystemicFailure):
        strict.check()


def test_a_systemic_failure_crosses_from_the_actor_to_the_driver_intact():
    from ray.exceptions import RayTaskError

    stop = SystemicFailure(6, 10, 10, 0.5, "RuntimeError: broke", ("a", "b"))
    copy = pickle.loads(pickle.dumps(stop))
    assert (copy.failed, copy.units, str(copy)) == (6, ("a", "b"), str(stop))
    wrapped = RayTaskError("CaptionActor.__call__", "traceback", stop).as_instanceof_cause()
    try:
        try:
            raise wrapped
        except Exception as error:
            raise RuntimeError("the dataset failed") from error
    except RuntimeError as error:
        assert systemic_failure(error) is stop
    assert systemic_failure(ValueError("no")) is None


def test_a_resumed_unit_captions_its_failed_rows_again_and_keeps_the_retry(tmp_path):
    """Rows whose generation failed in an unfinished unit (a run stopped by a systemic failure) are not
    'written' for the rerun: it captions them again, and the unit's merge keeps the new row, one per
    source row. Other rows, error rows included, are skipped as before."""
    import pyarrow.parquet as pq

    from pipeline.prepare import prepare_unit
    from pipeline.records import UnitEnd
    from pipeline.sources import plan_units
    from pipeline.synthetic import small_png

    corpus = tmp_path / "in"
    corpus.mkdir()
    pq.write_table(
        pa.table({"id": [f"r-{i}" for i in range(5)], "image": [small_png(i) for i in range(5)]}), corpus / "s.parquet"
    )
    engine = EngineConfig(model=str(CARVE_TINY), max_new_tokens=2)
    job = CaptionJob(inputs=[str(corpus)], output=str(tmp_path / "out"), engine=engine, run_id="r2")
    unit, out = plan_units(job.inputs)[0], Output(job.output)

    def rows(results: dict[int, str | None]) -> pa.Table:
        return pa.Table.from_pylist(
            [
                {"id": f"r-{i}", "source_file": unit.path, "source_row": i, "caption": None if code else f"caption {i}"}
                | ({"error_code": code, "error_message": f"{code} here"} if code else {})
                for i, code in results.items()
            ],
            schema=output_schema(),
        )

    # the stopped run wrote rows 0-3: 1 and 3 failed generation, 2 gave up on its worker
    out.write_part(unit.key, rows({0: None, 1: "generation_failed", 2: "worker_failed", 3: "generation_failed"}), "r1")
    blocks = list(prepare_unit(unit, job))
    to_caption = [r["source_row"] for b in blocks for r in b.to_pylist() if r["unit_end"] is None]
    end = UnitEnd.from_json(blocks[-1].column("unit_end")[-1].as_py())
    assert to_caption == [1, 3, 4] and end.to_caption == 3 and end.rows == 5

    out.write_part(unit.key, rows({1: None, 3: None, 4: None}), "r2")  # the rerun's rows
    merged = merge_unit(out, unit.key, "r2").to_pylist()
    assert [(r["source_row"], r["error_code"], r["caption"]) for r in merged] == [
        (0, None, "caption 0"),
        (1, None, "caption 1"),
        (2, "worker_failed", None),
        (3, None, "caption 3"),
        (4, None, "caption 4"),
    ]
    assert len(out.unit_parts(unit.key)) == 1


def test_a_systemic_stop_takes_back_the_records_of_the_last_units_with_failed_rows(tmp_path):
    """The driver's side of the stop: once the run stops, no record is written, and the units it last
    finished with failed rows (bounded: failure_window x actors of them; an actor's window is emptied
    by a restart, these are not) and those the actor names lose their done record, so a rerun re-checks
    them; an older unit's isolated failure and a unit without failures stay done."""
    from pipeline.batch import _stop
    from pipeline.books import UnitTracker
    from pipeline.records import PartReport, UnitEnd

    job = CaptionJob(inputs=[], output=str(tmp_path / "out"), engine=EngineConfig(model="m"), failure_window=2)
    out, tracker = Output(job.output), UnitTracker(job, Output(job.output))
    for unit, failed in [("old-failure", 1), ("fine", 0), ("failed-1", 2), ("failed-2", 1)]:
        errors = [{"error_code": "generation_failed", "error_message": "E"}] * failed + [{}] * (2 - failed)
        rows = [{"id": f"{unit}-{i}", "source_row": i, "caption": None if e else "c"} | e for i, e in enumerate(errors)]
        part = out.write_part(unit, pa.Table.from_pylist(rows, schema=output_schema()), "r1")
        end = UnitEnd(unit, "source", 2, 2, {}, None, 0, [])
        tracker.report(PartReport(unit, part, 2, failed, end))
    stop = SystemicFailure(6, 10, 10, 0.5, "E", ("failed-2", "in-flight"))
    _stop(tracker, out, stop)
    assert dict(out.unit_statuses()) == {"old-failure": "done", "fine": "done"}
