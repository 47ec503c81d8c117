"""Serve's protocol (pipeline.protocol) without Ray: what a request means, every refusal's status and
code, and the reply shapes. A small FastAPI app runs the same reading functions the deployment does,
in process (test_serve.py runs the real deployment over HTTP)."""

from __future__ import annotations

import base64
from dataclasses import asdict

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from pipeline import protocol
from pipeline.protocol import HTTPError, Work
from pipeline.serve_settings import ServeSettings
from tokencarve.engine import Caption, EngineConfig, ModelInputs

from .bad_images import encode, gradient

PNG = encode(gradient(40, 30), "PNG")
SETTINGS = ServeSettings(keep=64, max_new_tokens=8, max_new_tokens_limit=32, min_keep=16, max_keep=576)


@pytest.fixture(scope="module")
def inputs(tiny_model_dir) -> ModelInputs:
    return ModelInputs.load(EngineConfig(model=tiny_model_dir, max_new_tokens=8))


@pytest.fixture(scope="module")
def client(inputs):
    """An app whose routes read and check requests as the deployment's do, and echo what they mean."""
    app = FastAPI()
    app.exception_handler(HTTPError)(lambda request, err: protocol.error_response(err))

    def meaning(work: Work) -> dict:
        return asdict(work) | {"image": list(work.image.size)}

    @app.post("/v1/caption")
    async def caption(request: Request):
        return meaning(await protocol.caption_work(request, SETTINGS, inputs))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        work, model = await protocol.chat_work(request, SETTINGS, inputs)
        return meaning(work) | {"model": model}

    return TestClient(app)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def chat(content, **extra) -> dict:
    return {"model": "carve-tiny", "messages": [{"role": "user", "content": content}], **extra}


def image_part(data: bytes = PNG) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(data)}}


def test_a_request_without_options_gets_the_deployments(client):
    work = client.post("/v1/caption", json={"image": b64(PNG)}).json()
    assert work == {
        "image": [40, 30],
        "prompt": None,
        "max_new_tokens": 8,
        "keep": 64,
        "method": SETTINGS.method,
    }


def test_json_multipart_and_chat_mean_the_same(client):
    options = {"prompt": "What is it ?", "max_new_tokens": 5, "keep": 32, "method": "tokencarve"}
    by_json = client.post("/v1/caption", json={"image": b64(PNG), **options}).json()
    by_form = client.post(
        "/v1/caption",
        files={"image": ("x.png", PNG, "image/png")},
        data={k: str(v) for k, v in options.items()},
    ).json()
    by_chat = client.post(
        "/v1/chat/completions",
        json=chat(
            [{"type": "text", "text": "What is it ?"}, image_part()],
            max_completion_tokens=5,
            tokencarve={"keep": 32, "method": "tokencarve"},
        ),
    ).json()
    assert by_json == by_form == {k: v for k, v in by_chat.items() if k != "model"}
    assert by_json["keep"] == 32 and by_json["max_new_tokens"] == 5 and by_chat["model"] == "carve-tiny"
    fraction = client.post("/v1/caption", json={"image": b64(PNG), "keep": 0.25}).json()
    assert fraction["keep"] == 0.25
    older_name = client.post("/v1/chat/completions", json=chat([image_part()], max_tokens=3)).json()
    assert older_name["max_new_tokens"] == 3 and older_name["prompt"] is None


def test_an_adaptive_budget_is_read_as_written_on_every_route(client):
    """The job's and the harness's written form (tau included) means the same in JSON, a form and a chat."""
    written = "auto:48,min=16,max=128,tau=0.93"
    by_json = client.post("/v1/caption", json={"image": b64(PNG), "keep": written}).json()
    by_form = client.post("/v1/caption", files={"image": ("x.png", PNG, "image/png")}, data={"keep": written}).json()
    by_chat = client.post("/v1/chat/completions", json=chat([image_part()], tokencarve={"keep": written})).json()
    expected = {"mean": 48, "min": 16, "max": 128, "multiple": 8, "tau": 0.93}
    assert by_json["keep"] == by_form["keep"] == by_chat["keep"] == expected
    assert client.post("/v1/caption", json={"image": b64(PNG), "keep": "48"}).json()["keep"] == 48


@pytest.mark.parametrize(
    "route,body,status,code",
    [
        # the budget, the same rule on both routes: a count in min_keep..max_keep or a fraction in (0, 1)
        ("caption", {"keep": 4}, 422, "invalid_request"),
        ("caption", {"keep": 0}, 422, "invalid_request"),
        ("caption", {"keep": 577}, 422, "invalid_request"),
        ("caption", {"keep": 1.5}, 422, "invalid_request"),
        ("chat", {"keep": 4}, 422, "invalid_request"),
        ("chat", {"keep": 0}, 422, "invalid_request"),
        ("chat", {"keep": True}, 422, "invalid_request"),
        ("chat", {"keep": "sixty-four"}, 422, "invalid_request"),
        # an adaptive budget as written: with its tau, within the bounds, for a method that has one
        ("chat", {"keep": "auto:64"}, 422, "invalid_request"),
        ("caption", {"keep": "auto:64,min=8,tau=0.9"}, 422, "invalid_request"),
        ("caption", {"keep": "auto:64,tau=0.9", "method": "tokencarve"}, 422, "invalid_request"),
        ("caption", {"keep": "auto:64,tau=-1.0"}, 422, "invalid_request"),
        ("caption", {"max_new_tokens": 33}, 422, "invalid_request"),
        ("caption", {"max_new_tokens": 0}, 422, "invalid_request"),
        ("chat", {"max_new_tokens": 0}, 422, "invalid_request"),
        ("chat", {"max_new_tokens": 33}, 422, "invalid_request"),
        ("caption", {"method": "magic"}, 422, "invalid_request"),
        ("chat", {"method": "magic"}, 422, "invalid_request"),
        ("caption", {"prompt": "Compare <image> with this."}, 422, "invalid_prompt"),
        ("caption", {"prompt": "Describe every detail. " * 5_000}, 413, "prompt_too_long"),
        ("caption", {"unexpected": 1}, 422, "invalid_request"),
    ],
)
def test_options_out_of_bounds_are_refused_on_either_route(client, route, body, status, code):
    if route == "caption":
        reply = client.post("/v1/caption", json={"image": b64(PNG), **body})
    else:
        options = {k: v for k, v in body.items() if k in ("keep", "method")}
        tokens = {"max_tokens": body["max_new_tokens"]} if "max_new_tokens" in body else {}
        reply = client.post("/v1/chat/completions", json=chat([image_part()], tokencarve=options, **tokens))
    assert reply.status_code == status, reply.text
    assert reply.json()["error"] == {
        "code": code,
        "message": reply.json()["error"]["message"],
        "type": "invalid_request_error",
    }


@pytest.mark.parametrize(
    "content,status,code",
    [
        ([image_part(), image_part()], 422, "invalid_request"),
        ([{"type": "text", "text": "no image"}], 422, "invalid_request"),
        ([{"type": "text", "text": 7}, image_part()], 422, "invalid_request"),
        ([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}], 422, "invalid_request"),
        ([{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}], 415, "unsupported_media_type"),
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,not base64!"}}], 400, "bad_base64"),
        ([image_part(b"not an image")], 400, "undecodable_image"),
        ("just text", 422, "invalid_request"),
    ],
)
def test_chat_messages_that_cannot_be_served(client, content, status, code):
    reply = client.post("/v1/chat/completions", json=chat(content))
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["code"] == code


def test_bodies_that_are_not_requests(client):
    cases = [
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "bad_json"),
        (dict(content=b"raw bytes", headers={"content-type": "image/png"}), 415, "unsupported_media_type"),
        (dict(json=[1, 2]), 422, "invalid_request"),
        (dict(files={"image": ("x.txt", b"hi", "text/plain")}), 415, "unsupported_media_type"),
        (dict(files={"picture": ("x.png", PNG, "image/png")}), 422, "invalid_request"),
    ]
    for kwargs, status, code in cases:
        reply = client.post("/v1/caption", **kwargs)
        assert (reply.status_code, reply.json()["error"]["code"]) == (status, code), kwargs
    streaming = client.post("/v1/chat/completions", json=chat([image_part()], stream=True))
    assert streaming.status_code == 422 and streaming.json()["error"]["code"] == "unsupported"


def test_an_image_over_the_byte_limit_is_refused_before_decoding():
    limit = 1000
    with pytest.raises(HTTPError) as refused:
        protocol.base64_image(b64(b"\x00" * 2000), limit)
    assert (refused.value.status, refused.value.code) == (413, "image_too_large")
    assert protocol.base64_image("data:image/png;base64," + b64(b"\x00" * 900), limit) == b"\x00" * 900


def _caption(generated_tokens: int) -> Caption:
    return Caption("a red circle", 576, 64, 1000, 9000, generated_tokens, 590, 0.5)


def test_reply_shapes():
    work = Work(gradient(4, 4), None, 4, 64, "volume")
    reply = protocol.caption_reply(_caption(4), 3, "carve-tiny", work)
    assert reply["text"] == "a red circle" and reply["kv_bytes_saved"] == 8000 and reply["batch_size"] == 3
    assert (reply["model"], reply["method"], reply["keep"]) == ("carve-tiny", "volume", 64)
    completion = protocol.chat_completion(_caption(4), 3, "carve-tiny", work)
    assert completion["object"] == "chat.completion" and completion["id"].startswith("chatcmpl-")
    assert completion["choices"][0]["message"] == {"role": "assistant", "content": "a red circle"}
    assert completion["choices"][0]["finish_reason"] == "length"  # it used every token it could
    assert completion["usage"] == {"prompt_tokens": 590, "completion_tokens": 4, "total_tokens": 594}
    assert protocol.chat_completion(_caption(2), 1, "m", work)["choices"][0]["finish_reason"] == "stop"
    stock = Work(gradient(4, 4), None, 4, 64, "none")
    assert protocol.caption_reply(_caption(4), 1, "m", stock)["keep"] is None
    assert {w.batch_key for w in (work, Work(None, "other prompt", 4, 64, "volume"))} == {(64, "volume", 4)}
