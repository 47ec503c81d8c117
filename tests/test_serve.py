"""The Ray Serve app over real HTTP on a local Ray cluster: good and bad requests, batching, overload,
every method on both routes, API keys (settings and key parsing without Ray: test_serve_settings.py)."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from ray import serve

from pipeline.auth import ENV_VAR
from pipeline.load import run_load
from pipeline.serve import ServeSettings, build_app, deployment
from tokencarve.engine import DEFAULT_METHOD, METHODS

from .bad_images import broken_images, encode, gradient, valid_images
from .conftest import free_port

pytestmark = pytest.mark.slow  # a real Ray cluster and Serve app


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_model_dir):
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(
            {
                "model": tiny_model_dir,
                "keep": 64,
                "max_new_tokens": 4,
                "max_batch_size": 8,
                "batch_wait_timeout_s": 0.5,
                "max_replicas": 1,
                "max_ongoing_requests": 16,
                "max_queued_requests": 64,
                "max_image_bytes": 2 * 1024 * 1024,
            }
        ),
        name="caption",
        route_prefix="/",
    )
    url = f"http://127.0.0.1:{port}"
    yield url
    serve.shutdown()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PNG = encode(gradient(64, 48), "PNG")


def test_health_and_caption(server):
    health = httpx.get(f"{server}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    reply = httpx.post(f"{server}/v1/caption", json={"image": b64(PNG), "prompt": "What is in the image ?"}, timeout=60)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["text"] and body["visual_tokens_in"] == 576 and body["visual_tokens_kept"] == 64
    assert body["kv_bytes_saved"] == body["kv_bytes_uncompressed"] - body["kv_bytes_held"] > 0
    assert body["generated_tokens"] == 4 and body["method"] == DEFAULT_METHOD == "volume-spatial"


def test_a_non_square_image_is_seen_as_the_batch_job_sees_it(server, tiny_model_dir):
    """Serve pads to a square like the batch job's CPU stage (not the processor's centre crop): over
    HTTP it answers what the engine answers on the image the job would have prepared."""
    from tokencarve.engine import CaptionEngine, EngineConfig
    from tokencarve.images import decode_image

    engine = CaptionEngine(EngineConfig(model=tiny_model_dir, keep=64, max_new_tokens=4))
    for width, height in [(276, 336), (336, 120)]:
        data = encode(gradient(width, height), "PNG")
        reply = httpx.post(
            f"{server}/v1/caption", json={"image": b64(data), "prompt": "Describe the image ."}, timeout=60
        )
        prepared = engine.inputs.image(decode_image(data))  # what the job's CPU stage ships to its actors
        assert prepared.size == (336, 336)
        assert reply.json()["text"] == engine.caption([prepared], ["Describe the image ."])[0].caption


def test_per_request_budget_method_and_multipart(server):
    reply = httpx.post(
        f"{server}/v1/caption", json={"image": "data:image/png;base64," + b64(PNG), "keep": 32}, timeout=60
    )
    assert reply.status_code == 200 and reply.json()["visual_tokens_kept"] == 32
    stock = httpx.post(f"{server}/v1/caption", json={"image": b64(PNG), "method": "none"}, timeout=60).json()
    assert stock["visual_tokens_kept"] == 576 and stock["kv_bytes_saved"] == 0 and stock["keep"] is None
    upload = httpx.post(
        f"{server}/v1/caption",
        files={"image": ("x.jpg", encode(gradient(30, 30), "JPEG"), "image/jpeg")},
        data={"prompt": "Describe the image .", "keep": "48"},
        timeout=60,
    )
    assert upload.status_code == 200, upload.text
    assert upload.json()["visual_tokens_kept"] == 48


@pytest.mark.parametrize("name", list(valid_images()))
def test_every_valid_image_kind_is_captioned(server, name):
    reply = httpx.post(f"{server}/v1/caption", json={"image": b64(valid_images()[name])}, timeout=60)
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize(
    "request_kwargs,status,code",
    [
        (dict(json={"image": "not base64 at all!"}), 400, "bad_base64"),
        (dict(json={"image": b64(b"definitely not an image")}), 400, "undecodable_image"),
        (dict(json={"image": b64(broken_images()["truncated-png"][0])}), 400, "truncated_image"),
        (dict(json={"image": b64(broken_images()["bomb"][0])}), 413, "decompression_bomb"),
        (dict(json={"image": b64(b"\x00" * (3 * 1024 * 1024))}), 413, "image_too_large"),
        (dict(json={"image": "data:text/plain;base64," + b64(b"hi")}), 415, "unsupported_media_type"),
        (dict(content=b"raw bytes", headers={"content-type": "image/png"}), 415, "unsupported_media_type"),
        (dict(json={"prompt": "no image"}), 422, "invalid_request"),
        (dict(json={"image": b64(PNG), "keep": 4}), 422, "invalid_request"),
        (dict(json={"image": b64(PNG), "max_new_tokens": 100000}), 422, "invalid_request"),
        (dict(json={"image": b64(PNG), "method": "magic"}), 422, "invalid_request"),
        (dict(json={"image": b64(PNG), "unexpected": 1}), 422, "invalid_request"),
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "bad_json"),
        (dict(json={"image": b64(PNG), "prompt": "Describe every detail. " * 50_000}), 413, "prompt_too_long"),
        (dict(json={"image": b64(PNG), "prompt": "Compare <image> with this."}), 422, "invalid_prompt"),
    ],
)
def test_bad_requests_get_clear_json_errors_and_the_replica_survives(server, request_kwargs, status, code):
    reply = httpx.post(f"{server}/v1/caption", timeout=60, **request_kwargs)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["code"] == code
    assert httpx.post(f"{server}/v1/caption", json={"image": b64(PNG)}, timeout=60).status_code == 200


def test_concurrent_requests_share_a_forward(server):
    def one(i):
        return httpx.post(f"{server}/v1/caption", json={"image": b64(encode(gradient(20 + i, 20), "PNG"))}, timeout=120)

    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(one, range(12)))
    assert all(r.status_code == 200 for r in replies)
    assert max(r.json()["batch_size"] for r in replies) > 1


def test_openai_chat_completions_shape(server):
    request = {
        "model": "carve-tiny",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in the image ?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(PNG)}},
                ],
            }
        ],
        "max_tokens": 3,
    }
    reply = httpx.post(f"{server}/v1/chat/completions", json=request, timeout=60)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 3
    assert body["tokencarve"]["visual_tokens_kept"] == 64
    two_images = dict(request, messages=[{"role": "user", "content": request["messages"][0]["content"] * 2}])
    assert httpx.post(f"{server}/v1/chat/completions", json=two_images, timeout=60).status_code == 422


def test_a_replica_holds_steady_load_and_answers_overload_with_503_and_retry_after(ray_cluster, tiny_model_dir, server):
    """One small replica (batches of 2, 2 requests in flight, 2 queued per caller): a load it can
    hold gets 200 for every request; 8x that many concurrent clients get 200 or 503 with Retry-After,
    no other status, and no request goes without an answer."""
    serve.run(
        build_app(
            {
                "model": tiny_model_dir,
                "max_new_tokens": 16,
                "max_batch_size": 2,
                "max_replicas": 1,
                "max_ongoing_requests": 2,
                "max_queued_requests": 2,
                "retry_after_s": 3,
                "num_cpus": 0.5,
            }
        ),
        name="tight",
        route_prefix="/tight",
    )
    url = f"{server}/tight/v1/caption"
    images = [{"image": b64(encode(gradient(20 + i, 20), "PNG"))} for i in range(48)]

    steady = run_load(url, images[:12], concurrency=2, deadline_s=240)
    assert steady.statuses == {200: 12} and not steady.lost and steady.not_sent == 0

    overload = run_load(url, images, concurrency=16, deadline_s=240)
    assert not overload.lost and overload.not_sent == 0, overload.lost
    assert set(overload.statuses) == {200, 503}, overload.statuses
    assert all(answer.retry_after == "3" for answer in overload.refused)
    assert overload.seconds < 240
    serve.delete("tight")


def test_the_official_openai_client_works_unchanged(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="not-needed", max_retries=0, timeout=60)
    completion = client.chat.completions.create(
        model="carve-tiny",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe the image ."},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/jpeg;base64," + b64(encode(gradient(40, 40), "JPEG"))},
                    },
                ],
            }
        ],
        max_tokens=2,
        extra_body={"tokencarve": {"keep": 32}},
    )
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage.completion_tokens == 2
    assert completion.model_extra["tokencarve"]["visual_tokens_kept"] == 32


def chat_request(method: str | None = None, keep: int = 32) -> dict:
    options = {"keep": keep} | ({"method": method} if method else {})
    return {
        "model": "carve-tiny",
        "max_tokens": 2,
        "tokencarve": options,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe the image ."},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(PNG)}},
                ],
            }
        ],
    }


@pytest.mark.parametrize("method", METHODS)
def test_both_routes_accept_the_same_methods(server, method):
    caption = httpx.post(
        f"{server}/v1/caption", json={"image": b64(PNG), "method": method, "max_new_tokens": 2}, timeout=60
    )
    assert caption.status_code == 200, caption.text
    chat = httpx.post(f"{server}/v1/chat/completions", json=chat_request(method), timeout=60)
    assert chat.status_code == 200, chat.text
    assert caption.json()["method"] == chat.json()["tokencarve"]["method"] == method
    kept = 576 if method == "none" else 32
    assert chat.json()["tokencarve"]["visual_tokens_kept"] == kept


# ---------------------------------------------------------------- API keys

ENV_KEYS = ("env-key-1", "env-key-2")
FILE_KEY = "file-key-1"


@pytest.fixture(scope="module")
def locked(server, tiny_model_dir, tmp_path_factory):
    """A second app that needs a key: two from TOKENCARVE_API_KEY in the replica's environment (given
    here through the runtime env, as a test can; docs/SERVING.md says how an operator sets it) and
    one from a key file."""
    key_file = tmp_path_factory.mktemp("keys") / "api_keys"
    key_file.write_text(f"# test keys\n{FILE_KEY}\n")
    settings = ServeSettings(
        model=tiny_model_dir, keep=64, max_new_tokens=4, max_replicas=1, num_cpus=0.25, api_key_file=str(key_file)
    )
    options = {"num_cpus": 0.25, "runtime_env": {"env_vars": {ENV_VAR: ",".join(ENV_KEYS)}}}
    serve.run(
        deployment(settings).options(ray_actor_options=options).bind(settings.model_dump()),
        name="locked",
        route_prefix="/locked",
    )
    yield f"{server}/locked"
    serve.delete("locked")


def openai_chat(base_url: str, api_key: str, **request_options):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=60)
    request = chat_request()
    return client.chat.completions.create(
        model=request["model"],
        messages=request["messages"],
        max_tokens=2,
        extra_body={"tokencarve": request["tokencarve"]},
        **request_options,
    )


@pytest.mark.parametrize("key", [*ENV_KEYS, FILE_KEY])
def test_a_right_key_works_with_the_openai_client(locked, key):
    completion = openai_chat(locked, key)
    assert completion.choices[0].message.role == "assistant" and completion.usage.completion_tokens == 2


@pytest.mark.parametrize(
    "api_key,request_options",
    [
        ("wrong-key", {}),
        (ENV_KEYS[0][:-1], {}),  # a prefix of a right key
        ("unused", {"extra_headers": {"Authorization": openai.Omit()}}),  # no Authorization header at all
    ],
    ids=["wrong", "prefix", "none"],
)
def test_a_wrong_or_missing_key_gets_401_with_the_openai_client(locked, api_key, request_options):
    with pytest.raises(openai.AuthenticationError) as refused:
        openai_chat(locked, api_key, **request_options)
    assert refused.value.status_code == 401
    assert refused.value.body["code"] == "invalid_api_key" and refused.value.body["type"] == "invalid_request_error"


def test_every_v1_route_is_closed_and_health_stays_open(locked):
    served = httpx.get(f"{locked}/openapi.json", timeout=30).json()["paths"]  # what the app really serves
    routes = [path for path in served if path.startswith("/v1/")]
    assert sorted(routes) == ["/v1/caption", "/v1/chat/completions"]
    for route in routes:  # also a route added later: the check is the route's first statement
        reply = httpx.post(f"{locked}{route}", json={"image": b64(PNG)}, timeout=60)
        assert reply.status_code == 401, (route, reply.text)
        assert reply.json()["error"]["code"] == "invalid_api_key"
        assert reply.headers["www-authenticate"] == 'Bearer realm="tokencarve"'
    wrong = httpx.post(
        f"{locked}/v1/caption", json={"image": b64(PNG)}, headers={"Authorization": "Bearer nope"}, timeout=60
    )
    assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["www-authenticate"]
    right = httpx.post(
        f"{locked}/v1/caption", json={"image": b64(PNG)}, timeout=60, headers={"Authorization": f"Bearer {FILE_KEY}"}
    )
    assert right.status_code == 200, right.text
    assert httpx.get(f"{locked}/healthz", timeout=30).status_code == 200
