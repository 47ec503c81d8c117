"""The Serve API's protocol: reading and checking requests, the reply shapes (ours and OpenAI's chat
completion), and errors as OpenAI-style JSON. No Ray and no model: `pipeline.serve` runs the
deployment, this module says what a request means and what it gets back.

    POST /v1/caption            JSON {image: base64 or data URI, prompt?, max_new_tokens?, keep?, method?}
                                or multipart/form-data (file field `image`, same fields as form values)
    POST /v1/chat/completions   OpenAI chat format with one `image_url` data URI (non-streaming);
                                TokenCarve's options under "tokencarve": {keep?, method?}

Both routes end in `checked_work`: one place checks a request's budget, method and token limits
against the settings, and its prompt against the model's context window.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from dataclasses import asdict, dataclass

from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError

from tokencarve.budgets import Adaptive, budget_label, parse_budget
from tokencarve.engine import METHODS, Caption, ModelInputs
from tokencarve.images import RowError, decode_image
from tokencarve.methods import ADAPTIVE

from .serve_settings import ServeOnlySettings, check_calibrated

TOO_LARGE = {"image_too_large", "too_many_pixels", "decompression_bomb"}  # 413; anything else about the image: 400


class HTTPError(Exception):
    """A refused request: its status, a stable code and a message (and headers, e.g. a challenge)."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(err: HTTPError) -> JSONResponse:
    # "type" as OpenAI spells it, so that OpenAI clients map the status to their own error classes
    body = {"error": {"code": err.code, "message": err.message, "type": "invalid_request_error"}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def invalid(message: str) -> HTTPError:
    return HTTPError(422, "invalid_request", message)


class CaptionRequest(BaseModel):
    """/v1/caption's fields, typed (a form's strings are converted); their bounds: `checked_work`."""

    model_config = ConfigDict(extra="forbid")
    image: str | bytes
    prompt: str | None = None
    max_new_tokens: int | None = None
    keep: int | float | str | None = None  # a string: the budget as written ("48", "auto:64,tau=0.93")
    method: str | None = None


@dataclass(frozen=True)
class Work:
    """One checked request, ready for a batch: requests with equal (keep, method, max_new_tokens) share
    a generate() call."""

    image: Image.Image
    prompt: str | None
    max_new_tokens: int
    keep: int | float | Adaptive
    method: str

    @property
    def batch_key(self) -> tuple:
        return self.keep, self.method, self.max_new_tokens

    @property
    def keep_label(self) -> int | float | str | None:
        """What the reply says the budget per image was (adaptive: as written): None for the stock model."""
        return None if self.method == "none" else budget_label(self.keep)


# -- reading a request ------------------------------------------------------------------------------------


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_json(request: Request) -> dict:
    if _content_type(request) != "application/json":
        raise HTTPError(415, "unsupported_media_type", "send application/json")
    try:
        body = await request.json()
    except ValueError as err:
        raise HTTPError(400, "bad_json", f"the body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object")
    return body


async def read_caption_request(request: Request) -> CaptionRequest:
    """/v1/caption's body, JSON or multipart, as a CaptionRequest."""
    content_type = _content_type(request)
    if content_type == "application/json":
        fields = await read_json(request)
    elif content_type == "multipart/form-data":
        form = await request.form()
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise invalid("multipart requests need a file field named 'image'")
        if upload.content_type and not upload.content_type.startswith(("image/", "application/octet-stream")):
            raise HTTPError(415, "unsupported_media_type", f"uploaded file has type {upload.content_type}")
        fields = {k: v for k, v in form.items() if k != "image"} | {"image": await upload.read()}
    else:
        raise HTTPError(415, "unsupported_media_type", "send application/json or multipart/form-data")
    try:
        return CaptionRequest(**fields)
    except ValidationError as err:
        raise invalid("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())) from None


def last_user_turn(messages) -> tuple[str | None, str]:
    """(text, image data URI) of the last user message; exactly one image is supported."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list")
    user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not user:
        raise invalid("no user message")
    content = user[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise invalid("content must be a string or a list of parts")
    texts = [p.get("text") or "" for p in parts if isinstance(p, dict) and p.get("type") == "text"]
    if not all(isinstance(t, str) for t in texts):
        raise invalid("a text part's text must be a string")
    images = [p.get("image_url") for p in parts if isinstance(p, dict) and p.get("type") == "image_url"]
    if len(images) != 1:
        raise invalid(f"exactly one image_url part is supported, got {len(images)}")
    url = images[0].get("url") if isinstance(images[0], dict) else images[0]
    if not isinstance(url, str):
        raise invalid("image_url.url must be a string")
    return " ".join(t for t in texts if t) or None, url


def base64_image(value: str, max_bytes: int) -> bytes:
    """The bytes of a base64 string or a base64 image data URI (URLs are not fetched)."""
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if not header.startswith("data:image/") or not header.endswith(";base64"):
            raise HTTPError(415, "unsupported_media_type", f"expected a base64 image data URI, got {header[:40]!r}")
    elif value.startswith(("http://", "https://")):
        raise invalid("image URLs are not fetched; send the image as a base64 data URI")
    if len(value) > (max_bytes * 4) // 3 + 4:  # refused before decoding anything
        raise HTTPError(413, "image_too_large", f"over the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise HTTPError(400, "bad_base64", f"the image is not valid base64: {err}") from None


def decoded_image(data: bytes, settings: ServeOnlySettings) -> Image.Image:
    image = decode_image(data, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
    if isinstance(image, RowError):
        raise HTTPError(413 if image.code in TOO_LARGE else 400, image.code, image.message)
    return image


# -- checking it ------------------------------------------------------------------------------------------


def checked_budget(keep, settings: ServeOnlySettings, method: str) -> int | float | Adaptive:
    """A request's budget (None: the deployment's): a count in min_keep..max_keep, a fraction in (0, 1),
    or an adaptive budget with its tau whose min and max lie in min_keep..max_keep (text, as the job
    writes it: "auto:64,tau=0.93"), for a method that has one."""
    if keep is None:
        return settings.keep
    bounds = f"{settings.min_keep}..{settings.max_keep}"
    if isinstance(keep, str):
        try:
            keep = parse_budget(keep)
        except ValueError as err:
            raise invalid(f"keep: {err}") from None
    if isinstance(keep, Adaptive):
        try:
            check_calibrated(keep)
        except ValueError as err:
            raise invalid(str(err)) from None
        if not settings.min_keep <= keep.min <= keep.max <= settings.max_keep:
            raise invalid(f"an adaptive keep's min and max must lie in {bounds}")
        if method not in ADAPTIVE:
            raise invalid(f"an adaptive keep needs one of the methods {', '.join(ADAPTIVE)}, not {method}")
        return keep
    fraction = isinstance(keep, float) and 0 < keep < 1
    count = isinstance(keep, int) and not isinstance(keep, bool) and settings.min_keep <= keep <= settings.max_keep
    if not (fraction or count):
        raise invalid(f"keep must be an integer in {bounds}, a fraction in (0, 1) or adaptive (auto:64,tau=0.93)")
    return keep


def checked_work(settings: ServeOnlySettings, inputs: ModelInputs, image, prompt, max_new_tokens, keep, method) -> Work:
    """A request's options checked against the settings (None: the deployment's default), and its
    prompt against the model (one tokenizer call, before the request joins a batch; the batch job
    writes the same refusal as an error row)."""
    if max_new_tokens is None:
        max_new_tokens = settings.max_new_tokens
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise invalid(f"max_new_tokens must be an integer in 1..{settings.max_new_tokens_limit}")
    if not 1 <= max_new_tokens <= settings.max_new_tokens_limit:
        raise invalid(f"max_new_tokens must be an integer in 1..{settings.max_new_tokens_limit}")
    method = settings.method if method is None else method
    if method not in METHODS:
        raise invalid(f"method must be one of {METHODS}")
    keep = checked_budget(keep, settings, method)
    refused = inputs.prompt_error(prompt, max_new_tokens)
    if refused is not None:
        raise HTTPError(413 if refused.code == "prompt_too_long" else 422, refused.code, refused.message)
    refused = inputs.image_error(image)
    if refused is not None:
        raise HTTPError(422, refused.code, refused.message)
    return Work(image, prompt, max_new_tokens, keep, method)


async def caption_work(request: Request, settings: ServeOnlySettings, inputs: ModelInputs) -> Work:
    """A /v1/caption request, read and checked."""
    body = await read_caption_request(request)
    data = body.image if isinstance(body.image, bytes) else base64_image(body.image, settings.max_image_bytes)
    image = decoded_image(data, settings)
    return checked_work(settings, inputs, image, body.prompt, body.max_new_tokens, body.keep, body.method)


async def chat_work(request: Request, settings: ServeOnlySettings, inputs: ModelInputs) -> tuple[Work, str | None]:
    """A /v1/chat/completions request, read and checked; and the model name it asked for."""
    body = await read_json(request)
    if body.get("stream"):
        raise HTTPError(422, "unsupported", "streaming is not supported; send stream=false")
    prompt, image_url = last_user_turn(body.get("messages"))
    options = body.get("tokencarve") or {}
    if not isinstance(options, dict):
        raise invalid("tokencarve must be an object: {keep?, method?}")
    image = decoded_image(base64_image(image_url, settings.max_image_bytes), settings)
    max_new_tokens = body.get("max_completion_tokens")  # OpenAI's current name; max_tokens the older one
    if max_new_tokens is None:
        max_new_tokens = body.get("max_tokens")
    work = checked_work(settings, inputs, image, prompt, max_new_tokens, options.get("keep"), options.get("method"))
    return work, body.get("model")


# -- the replies ------------------------------------------------------------------------------------------


def figures(caption: Caption) -> dict:
    """A caption's figures (tokens, KV bytes, latency), without its text."""
    values = asdict(caption)
    values.pop("caption")
    values["kv_bytes_saved"] = caption.kv_bytes_uncompressed - caption.kv_bytes_held
    return values


def caption_reply(caption: Caption, batch_size: int, model_name: str, work: Work) -> dict:
    return {
        "text": caption.caption,
        **figures(caption),
        "batch_size": batch_size,
        "model": model_name,
        "method": work.method,
        "keep": work.keep_label,
    }


def chat_completion(caption: Caption, batch_size: int, model_name: str, work: Work) -> dict:
    """OpenAI's chat.completion object, TokenCarve's figures under "tokencarve"."""
    finish = "length" if caption.generated_tokens >= work.max_new_tokens else "stop"
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
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
        "tokencarve": {**figures(caption), "batch_size": batch_size, "method": work.method, "keep": work.keep_label},
    }
