"""Ray Serve: an autoscaled captioning / VQA endpoint on the batch pipeline's engine.

    serve run pipeline.serve:build_app model=models/carve-tiny keep=64
    serve deploy jobs/serve_config.yaml

Endpoints
    POST /v1/caption            JSON {image: base64 or data URI, prompt?, max_new_tokens?, keep?, method?}
                                or multipart/form-data (file field `image`, same fields as form values)
    POST /v1/chat/completions   OpenAI chat format with one `image_url` data URI (non-streaming)
    GET  /healthz               200 once the model is loaded (Serve routes to a replica only then)

API keys (pipeline.auth): with TOKENCARVE_API_KEY set in the replica's environment, or `api_key_file`
in the settings, every /v1/* route needs `Authorization: Bearer <key>` (401 otherwise); /healthz
stays open. With neither, the endpoint is open, and the replica's log says so.

Concurrent requests are grouped by `@serve.batch` and share one generate() call; the blocking model
call runs on a worker thread so the replica's event loop keeps accepting requests. Overload is
refused by Serve itself (max_queued_requests) with 503 and a Retry-After header.
"""

import asyncio
import base64
import binascii
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve.config import AutoscalingConfig, BackpressureConfig

from monitoring.metrics import MetricsRecorder
from tokencarve.engine import DEFAULT_METHOD, METHODS, CaptionEngine, EngineConfig
from tokencarve.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, RowError, decode_image

from .auth import ENV_VAR, load_api_keys, log_api_keys

# Error code -> HTTP status (anything else about the image is a 400).
TOO_LARGE = {"image_too_large", "too_many_pixels", "decompression_bomb"}


class ServeSettings(BaseModel):
    """Everything `build_app` accepts (strings from `serve run key=value` are converted)."""

    model_config = ConfigDict(extra="forbid")
    model: str = "models/carve-tiny"
    keep: int | float = Field(64, gt=0)  # tokens per image, or a fraction of each image's tokens (0.1)
    method: str = DEFAULT_METHOD  # one of tokencarve.engine.METHODS (checked by EngineConfig)
    layer: int = Field(2, ge=1)
    max_new_tokens: int = Field(64, ge=1)  # the default per request
    max_new_tokens_limit: int = Field(512, ge=1)  # the most a request may ask for
    max_prompt_tokens: int | None = Field(None, ge=1)  # None: what the context window leaves (413 beyond)
    image_policy: str = "auto"  # as the batch job's --image-policy (tokencarve.engine.IMAGE_POLICIES)
    min_keep: int = Field(16, ge=1)  # bounds for a per-request budget
    max_keep: int = Field(8192, ge=1)  # (LLaVA-1.5 has 576 tokens an image, NeXT up to 2,928, OneVision 7,371)
    dtype: str = "auto"
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    # Batching and scaling (one GPU per replica by default on GPU clusters).
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)  # ~ one full batch in flight per replica
    max_ongoing_requests: int = Field(16, ge=1)  # >= max_batch_size, or batches never fill
    max_queued_requests: int = 64  # per caller; beyond it: 503 + Retry-After
    retry_after_s: float = 2.0
    # A file on every node that runs a replica (e.g. a mounted secret): one key per line. The keys
    # themselves are never a setting (pipeline.auth says why); TOKENCARVE_API_KEY is the other source.
    api_key_file: str | None = None


class CaptionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str | bytes
    prompt: str | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    keep: int | float | None = Field(None, gt=0)
    method: str | None = None  # checked against tokencarve.engine.METHODS in _work


class HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


@dataclass
class _Work:
    image: object
    prompt: str | None
    max_new_tokens: int
    keep: int | float
    method: str


def _figures(caption) -> dict:
    figures = asdict(caption)
    figures.pop("caption")
    figures["kv_bytes_saved"] = caption.kv_bytes_uncompressed - caption.kv_bytes_held
    return figures


def _keep_label(work: _Work):
    return None if work.method == "none" else work.keep


async def _json(request: Request) -> dict:
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise HTTPError(415, "unsupported_media_type", "send application/json")
    try:
        body = await request.json()
    except ValueError as err:
        raise HTTPError(400, "bad_json", f"the body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise HTTPError(422, "invalid_request", "the body must be a JSON object")
    return body


def _last_user_turn(messages) -> tuple[str, str]:
    """(text, image data URI) of the last user message; exactly one image is supported."""
    if not isinstance(messages, list) or not messages:
        raise HTTPError(422, "invalid_request", "messages must be a non-empty list")
    user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not user:
        raise HTTPError(422, "invalid_request", "no user message")
    content = user[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise HTTPError(422, "invalid_request", "content must be a string or a list of parts")
    texts = [p.get("text", "") for p in parts if isinstance(p, dict) and p.get("type") == "text"]
    images = [p.get("image_url") for p in parts if isinstance(p, dict) and p.get("type") == "image_url"]
    if len(images) != 1:
        raise HTTPError(422, "invalid_request", f"exactly one image_url part is supported, got {len(images)}")
    url = images[0].get("url") if isinstance(images[0], dict) else images[0]
    if not isinstance(url, str):
        raise HTTPError(422, "invalid_request", "image_url.url must be a string")
    return " ".join(t for t in texts if t) or None, url


def _validation_message(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())


api = FastAPI(title="TokenCarve captioning", version="1")


@api.exception_handler(HTTPError)
async def _http_error(request: Request, err: HTTPError) -> JSONResponse:
    # "type" as OpenAI spells it, so that OpenAI clients map the status to their own error classes
    body = {"error": {"code": err.code, "message": err.message, "type": "invalid_request_error"}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


@serve.deployment
@serve.ingress(api)
class CaptionServer:
    def __init__(self, settings: dict):
        self.settings = ServeSettings(**settings)
        s = self.settings
        # read here, in the replica's own environment and file system (pipeline.auth says why)
        self.api_keys = load_api_keys(s.api_key_file)
        log_api_keys(self.api_keys)
        self.engine = CaptionEngine(
            EngineConfig(
                model=s.model,
                keep=s.keep,
                method=s.method,
                layer=s.layer,
                max_new_tokens=s.max_new_tokens,
                dtype=s.dtype,
                max_prompt_tokens=s.max_prompt_tokens,
                image_policy=s.image_policy,
            )
        )
        self.metrics = MetricsRecorder(self.engine.model_name, s.method, s.keep)
        self.model_thread = ThreadPoolExecutor(max_workers=1)  # one generate() at a time per replica
        self.caption_batch.set_max_batch_size(s.max_batch_size)
        self.caption_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        s = self.settings
        return {"status": "ok", "model": self.engine.model_name, "method": s.method, "keep": s.keep}

    # Every /v1/* route starts with `self._guard(request)` (a test walks the routes to check it).

    @api.post("/v1/caption")
    async def caption(self, request: Request) -> dict:
        with self._guard(request):
            return await self._caption(request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> dict:
        with self._guard(request):
            return await self._chat_completions(request)

    @contextmanager
    def _guard(self, request: Request):
        """The API key check, then the request, counting its failures by reason. A refused key is
        not counted as a failed image: nothing was read, and anyone could inflate the figure."""
        authorization = request.headers.get("authorization")
        if not self.api_keys.accepts(authorization):
            # RFC 6750: a request without credentials gets the bare challenge, a wrong key the error too
            challenge = 'Bearer realm="tokencarve"' + (', error="invalid_token"' if authorization else "")
            raise HTTPError(
                401,
                "invalid_api_key",
                "a valid API key is required: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": challenge},
            )
        try:
            yield
        except HTTPError as err:
            self.metrics.failed(err.code)
            raise

    async def _caption(self, request: Request) -> dict:
        body = await self._caption_request(request)
        image = self._decode(body.image if isinstance(body.image, bytes) else self._base64_image(body.image))
        work = self._work(image, body.prompt, body.max_new_tokens, body.keep, body.method)
        caption, batch_size = await self.caption_batch(work)
        return {
            "text": caption.caption,
            **_figures(caption),
            "batch_size": batch_size,
            "model": self.engine.model_name,
            "method": work.method,
            "keep": _keep_label(work),
        }

    async def _chat_completions(self, request: Request) -> dict:
        body = await _json(request)
        if body.get("stream"):
            raise HTTPError(422, "unsupported", "streaming is not supported; send stream=false")
        prompt, image_url = _last_user_turn(body.get("messages"))
        options = body.get("tokencarve") or {}
        work = self._work(
            self._decode(self._base64_image(image_url)),
            prompt,
            body.get("max_completion_tokens") or body.get("max_tokens"),
            options.get("keep"),
            options.get("method"),
        )
        caption, batch_size = await self.caption_batch(work)
        finish = "length" if caption.generated_tokens >= work.max_new_tokens else "stop"
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.engine.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": caption.caption},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": caption.prompt_tokens,
                "completion_tokens": caption.generated_tokens,
                "total_tokens": caption.prompt_tokens + caption.generated_tokens,
            },
            "tokencarve": {
                **_figures(caption),
                "batch_size": batch_size,
                "method": work.method,
                "keep": _keep_label(work),
            },
        }

    # -- batching -----------------------------------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def caption_batch(self, works: list[_Work]) -> list[tuple]:
        """Requests that arrived together; those with the same settings share one generate()."""
        groups: dict[tuple, list[int]] = {}
        for i, w in enumerate(works):
            groups.setdefault((w.keep, w.method, w.max_new_tokens), []).append(i)
        results: list = [None] * len(works)
        loop = asyncio.get_running_loop()
        for (keep, method, max_new_tokens), members in groups.items():
            captions, timing = await loop.run_in_executor(
                self.model_thread, self._generate, [works[i] for i in members], keep, method, max_new_tokens
            )
            self.metrics.batch(captions, timing, method=method, keep=keep)
            for i, caption in zip(members, captions):
                results[i] = (caption, len(members))
        return results

    def _generate(self, works: list[_Work], keep: int, method: str, max_new_tokens: int):
        """On the model thread: one generate() and its timing, read before the next call can start."""
        captions = self.engine.caption(
            [w.image for w in works], [w.prompt for w in works], max_new_tokens=max_new_tokens, keep=keep, method=method
        )
        return captions, self.engine.last_timing

    # -- request parsing ------------------------------------------------------------------------------

    async def _caption_request(self, request: Request) -> CaptionRequest:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/json":
            fields = await _json(request)
        elif content_type == "multipart/form-data":
            form = await request.form()
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise HTTPError(422, "invalid_request", "multipart requests need a file field named 'image'")
            if upload.content_type and not upload.content_type.startswith(("image/", "application/octet-stream")):
                raise HTTPError(415, "unsupported_media_type", f"uploaded file has type {upload.content_type}")
            fields = {k: v for k, v in form.items() if k != "image"} | {"image": await upload.read()}
        else:
            raise HTTPError(415, "unsupported_media_type", "send application/json or multipart/form-data")
        try:
            return CaptionRequest(**fields)
        except ValidationError as err:
            raise HTTPError(422, "invalid_request", _validation_message(err)) from None

    def _base64_image(self, value: str) -> bytes:
        if value.startswith("data:"):
            header, _, value = value.partition(",")
            if not header.startswith("data:image/") or not header.endswith(";base64"):
                raise HTTPError(415, "unsupported_media_type", f"expected a base64 image data URI, got {header[:40]!r}")
        elif value.startswith(("http://", "https://")):
            raise HTTPError(422, "invalid_request", "image URLs are not fetched; send the image as a base64 data URI")
        if len(value) > (self.settings.max_image_bytes * 4) // 3 + 4:
            raise HTTPError(413, "image_too_large", f"over the limit of {self.settings.max_image_bytes} bytes")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise HTTPError(400, "bad_base64", f"the image is not valid base64: {err}") from None

    def _decode(self, data: bytes):
        image = decode_image(data, max_bytes=self.settings.max_image_bytes, max_pixels=self.settings.max_image_pixels)
        if isinstance(image, RowError):
            raise HTTPError(413 if image.code in TOO_LARGE else 400, image.code, image.message)
        return image

    def _work(self, image, prompt, max_new_tokens, keep, method) -> _Work:
        s = self.settings
        max_new_tokens = max_new_tokens or s.max_new_tokens
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= s.max_new_tokens_limit:
            raise HTTPError(422, "invalid_request", f"max_new_tokens must be an integer in 1..{s.max_new_tokens_limit}")
        keep = keep or s.keep
        fraction = isinstance(keep, float) and 0 < keep < 1
        if not fraction and (
            isinstance(keep, bool) or not isinstance(keep, int) or not s.min_keep <= keep <= s.max_keep
        ):
            raise HTTPError(
                422, "invalid_request", f"keep must be an integer in {s.min_keep}..{s.max_keep} or a fraction in (0, 1)"
            )
        method = method or s.method
        if method not in METHODS:
            raise HTTPError(422, "invalid_request", f"method must be one of {METHODS}")
        # the batch job's check: a tokenizer call, before the request joins a batch
        refused = self.engine.inputs.prompt_error(prompt, max_new_tokens)
        if refused is not None:
            raise HTTPError(413 if refused.code == "prompt_too_long" else 422, refused.code, refused.message)
        return _Work(image, prompt, max_new_tokens, keep, method)


def build_app(args: dict) -> serve.Application:
    """The app builder for `serve run pipeline.serve:build_app key=value ...` and config files."""
    if {"api_key", "api_keys"} & set(args):
        raise ValueError(
            f"API keys are not taken as settings (they would show in ps, shell history and Serve's "
            f"stored config): set {ENV_VAR} where the replicas run, or name a file with api_key_file"
        )
    settings = ServeSettings(**args)
    return deployment(settings).bind(settings.model_dump())


def deployment(settings: ServeSettings) -> serve.Deployment:
    """The CaptionServer deployment with the settings' scaling, batching and backpressure options."""
    if settings.max_ongoing_requests < settings.max_batch_size:
        raise ValueError("max_ongoing_requests must be >= max_batch_size, or batches never fill")
    return CaptionServer.options(
        autoscaling_config=AutoscalingConfig(
            min_replicas=settings.min_replicas,
            max_replicas=settings.max_replicas,
            target_ongoing_requests=settings.target_ongoing_requests,
        ),
        max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=settings.retry_after_s),
        ray_actor_options={"num_gpus": settings.num_gpus, "num_cpus": settings.num_cpus},
    )
