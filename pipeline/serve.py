"""Ray Serve: an autoscaled captioning / VQA endpoint on the batch pipeline's engine (the deployment).

    serve run pipeline.serve:build_app model=models/carve-tiny keep=64
    serve deploy jobs/serve_config.yaml

What a request means and what it gets back (routes, checks, reply shapes, errors): pipeline.protocol.
The settings (every EngineConfig field, plus Serve's own): pipeline.serve_settings.

API keys (pipeline.auth): with TOKENCARVE_API_KEY set in the replica's environment, or `api_key_file`
in the settings, every /v1/* route needs `Authorization: Bearer <key>` (401 otherwise); /healthz
stays open. With neither, the endpoint is open, and the replica's log says so.

Concurrent requests are grouped by `@serve.batch` and share one generate() call; the blocking model
call runs on a worker thread so the replica's event loop keeps accepting requests. Overload is
refused by Serve itself (max_queued_requests) with 503 and a Retry-After header (Serve's
BackpressureConfig).
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.config import AutoscalingConfig, BackpressureConfig

from monitoring.metrics import MetricsRecorder
from tokencarve.budgets import budget_label
from tokencarve.engine import CaptionEngine

from . import protocol
from .auth import ENV_VAR, load_api_keys, log_api_keys
from .protocol import HTTPError, Work
from .serve_settings import ServeSettings

__all__ = ["CaptionServer", "ServeSettings", "build_app", "deployment"]

api = FastAPI(title="TokenCarve captioning", version="1")


@api.exception_handler(HTTPError)
async def _http_error(request: Request, err: HTTPError) -> JSONResponse:
    return protocol.error_response(err)


@serve.deployment
@serve.ingress(api)
class CaptionServer:
    def __init__(self, settings: dict):
        self.settings = ServeSettings(**settings)
        s = self.settings
        # read here, in the replica's own environment and file system (pipeline.auth says why)
        self.api_keys = load_api_keys(s.api_key_file)
        log_api_keys(self.api_keys)
        self.engine = CaptionEngine(s.engine_config())
        self.metrics = MetricsRecorder(self.engine.model_name, s.method, s.keep)
        self.metrics.decoder(self.engine.decoder)  # warmed up in the engine's constructor, before the replica is ready
        self.model_thread = ThreadPoolExecutor(max_workers=1)  # one generate() at a time per replica
        self.caption_batch.set_max_batch_size(s.max_batch_size)
        self.caption_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        s = self.settings
        health = {"status": "ok", "model": self.engine.model_name, "method": s.method, "keep": budget_label(s.keep)}
        decoder = self.engine.decoder
        if decoder is not None:  # the static path's pool: its layout, compiled shapes, eager fallbacks, bytes
            pool = decoder.pool
            health["decode"] = {"slots": pool.slots, "capacity": pool.capacity, **asdict(decoder.stats)}
        return health

    # Every /v1/* route starts with `self._guard(request)` (a test walks the routes to check it).

    @api.post("/v1/caption")
    async def caption(self, request: Request) -> dict:
        with self._guard(request):
            work = await protocol.caption_work(request, self.settings, self.engine.inputs)
            caption, batch_size = await self.caption_batch(work)
            return protocol.caption_reply(caption, batch_size, self.engine.model_name, work)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> dict:
        with self._guard(request):
            work, requested_model = await protocol.chat_work(request, self.settings, self.engine.inputs)
            caption, batch_size = await self.caption_batch(work)
            return protocol.chat_completion(caption, batch_size, requested_model or self.engine.model_name, work)

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

    # -- batching -----------------------------------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def caption_batch(self, works: list[Work]) -> list[tuple]:
        """Requests that arrived together; those with the same budget and method share one engine call
        (on the static path each row ends at its own max_new_tokens and frees its slot)."""
        groups: dict[tuple, list[int]] = {}
        for i, w in enumerate(works):
            groups.setdefault(w.batch_key[:2] if self.engine.decoder else w.batch_key, []).append(i)
        results: list = [None] * len(works)
        loop = asyncio.get_running_loop()
        for (keep, method, *_), members in groups.items():
            captions, timing = await loop.run_in_executor(
                self.model_thread, self._generate, [works[i] for i in members], keep, method
            )
            self.metrics.batch(captions, timing, method=method, keep=keep)
            self.metrics.decoder(self.engine.decoder)
            for i, caption in zip(members, captions):
                results[i] = (caption, len(members))
        return results

    def _generate(self, works: list[Work], keep: int, method: str):
        """On the model thread: one engine call and its timing, read before the next call can start."""
        captions = self.engine.caption(
            [w.image for w in works],
            [w.prompt for w in works],
            max_new_tokens=[w.max_new_tokens for w in works],
            keep=keep,
            method=method,
        )
        return captions, self.engine.last_timing


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
    """The CaptionServer deployment with the settings' scaling, batching and backpressure options
    (ServeSettings has checked them: max_ongoing_requests >= max_batch_size, say)."""
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
