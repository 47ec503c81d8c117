"""The Serve app's settings, API keys and method list, without Ray (fast); test_serve.py runs them for real."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

import tokencarve
from pipeline import auth, serve_settings
from pipeline.serve import ServeSettings, build_app
from tokencarve import engine

ROOT = Path(__file__).resolve().parent.parent


def test_the_checked_in_serve_config_is_valid():
    """jobs/serve_config.yaml parses under Serve's own schema and its args build a valid app."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema(**yaml.safe_load((ROOT / "jobs" / "serve_config.yaml").read_text()))
    app = config.applications[0]
    assert app.import_path == "pipeline.serve:build_app"
    settings = ServeSettings(**app.args)
    assert settings.max_ongoing_requests >= settings.max_batch_size and settings.num_gpus == 1


def test_every_engine_setting_is_a_serve_setting_with_the_engines_default_and_help():
    engine_fields = dataclasses.fields(engine.EngineConfig)
    schema = ServeSettings.model_json_schema()["properties"]
    for field in engine_fields:
        assert field.name in ServeSettings.model_fields, field.name
        assert schema[field.name].get("description") == field.metadata.get("help"), field.name
        if "choices" in field.metadata:
            assert schema[field.name]["choices"] == list(field.metadata["choices"])
    # the defaults are the engine's, field for field (the model's is Serve's bundled one)
    assert ServeSettings().engine_config() == engine.EngineConfig(model=serve_settings.DEFAULT_MODEL)
    assert ServeSettings(model="m", keep=0.1, decode="static").engine_config() == engine.EngineConfig(
        model="m", keep=0.1, decode="static"
    )
    serve_only = set(ServeSettings.model_fields) - {f.name for f in engine_fields}
    assert {"max_new_tokens_limit", "max_batch_size", "max_queued_requests", "api_key_file"} <= serve_only


def test_a_field_added_to_the_engine_is_a_serve_setting_at_once():
    @dataclasses.dataclass(frozen=True)
    class Grown(engine.EngineConfig):
        beams: int = dataclasses.field(default=1, metadata={"help": "beams per row"})

    settings = serve_settings.settings_model(Grown)(beams="3")  # `serve run ... beams=3` gives a string
    assert settings.engine_config() == Grown(model=serve_settings.DEFAULT_MODEL, beams=3)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"method": "magic"}, "method must be one of"),  # the engine's own checks, once
        ({"keep": 0}, "CarveConfig.keep"),
        ({"keep": 1.5}, "CarveConfig.keep"),
        ({"image_policy": "stretch"}, "image_policy must be one of"),
        ({"decode": "beam"}, "decode must be one of"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"max_new_tokens": 600}, "max_new_tokens_limit"),
        ({"max_batch_size": 32}, "batches never fill"),
        ({"modle": "typo"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_are_refused_with_the_engines_message(values, message):
    with pytest.raises(ValueError, match=message):
        ServeSettings(**values)


def test_one_method_list_for_library_job_and_serve():
    # both /v1 routes check tokencarve.engine.METHODS (test_serve.py sends every method to both)
    assert engine.METHODS == ("none", *tokencarve.METHODS)
    assert {"fastv", "random", "pool"} <= set(engine.METHODS)


# ---------------------------------------------------------------- API keys


def test_keys_from_the_environment_variable_and_a_key_file(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# operators\nfile-key-1\n\n  file-key-2  \n# old: revoked-key\n")
    keys = auth.load_api_keys(str(key_file), environ={auth.ENV_VAR: " env-key-1, env-key-2,"})
    assert keys.keys == (b"env-key-1", b"env-key-2", b"file-key-1", b"file-key-2")
    assert keys.sources == ("$TOKENCARVE_API_KEY", str(key_file))
    assert auth.load_api_keys(None, environ={auth.ENV_VAR: "only"}).keys == (b"only",)
    assert not auth.load_api_keys(None, environ={}).required
    assert not auth.load_api_keys(None, environ={auth.ENV_VAR: " "}).required


def test_a_named_key_file_that_is_missing_or_empty_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        auth.load_api_keys(str(tmp_path / "absent"), environ={})
    (tmp_path / "empty").write_text("# no key yet\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        auth.load_api_keys(str(tmp_path / "empty"), environ={})
    with pytest.raises(ValueError, match="whitespace"):
        auth.load_api_keys(None, environ={auth.ENV_VAR: "two words"})


@pytest.mark.parametrize(
    "header,accepted",
    [
        ("Bearer key-b", True),
        ("bearer key-a", True),  # the scheme is case-insensitive (RFC 7235), the key is not
        ("Bearer  key-a ", True),
        ("Bearer KEY-A", False),
        ("Bearer key-a-and-more", False),
        ("Bearer key", False),
        ("Basic key-a", False),
        ("key-a", False),
        ("Bearer ", False),
        ("", False),
        (None, False),
        ("Bearer ключ", False),  # non-ASCII is compared as bytes, not refused with a TypeError
    ],
)
def test_bearer_header_check(header, accepted):
    keys = auth.ApiKeys((b"key-a", b"key-b"), ("test",))
    assert keys.accepts(header) is accepted
    assert auth.ApiKeys((), ()).accepts(header)  # no key configured: open


def test_the_startup_log_says_whether_the_endpoint_is_open(caplog):
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        auth.log_api_keys(auth.ApiKeys((), ()))
        auth.log_api_keys(auth.ApiKeys((b"secret-key-value",), ("$TOKENCARVE_API_KEY",)))
    open_record, closed_record = caplog.records
    assert open_record.levelno == logging.WARNING and "open to every client" in open_record.getMessage()
    assert closed_record.levelno == logging.INFO and "1 key(s) from $TOKENCARVE_API_KEY" in closed_record.getMessage()
    assert "secret-key-value" not in caplog.text


@pytest.mark.parametrize("name", ["api_key", "api_keys"])
def test_keys_are_never_taken_as_settings(name):
    with pytest.raises(ValueError, match="TOKENCARVE_API_KEY"):
        build_app({name: "sk-on-the-command-line"})
