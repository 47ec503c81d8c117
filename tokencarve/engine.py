"""One engine for batch, serving and evaluation: load a LLaVA once, apply TokenCarve, caption in batches.

The Ray Data actors (`pipeline.batch`), the Ray Serve replicas (`pipeline.serve`) and the evaluation
harness (`tokencarve.eval`) all hold a `CaptionEngine`: one way to turn an image and a prompt into
what the model sees (`ModelInputs`), one batched generate(), one set of figures. None of them knows
how the model is loaded or patched. No Ray here: the engine runs anywhere the model does.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import zlib
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

import tokencarve
from tokencarve import CarveConfig, load_llava
from tokencarve.adapter import CARVE_POSITIONS, CarveStats
from tokencarve.budgets import Adaptive
from tokencarve.budgets import parse_budget as parse_budget  # the one parser of a written budget, re-exported
from tokencarve.decode import Features, GenerationSettings, Prefill, StaticDecoder, check_layers, eos_ids
from tokencarve.decode import prefill as prefill_rows
from tokencarve.families import family_for_config, image_placeholder, max_image_tokens
from tokencarve.loading import chat_prompt, load_processor

from .images import RowError, square

DEFAULT_PROMPT = "Describe the image."
IMAGE_POLICIES = ("auto", "processor")
METHODS = ("none", *tokencarve.METHODS)  # "none": the stock model; the baselines are there for A/B runs


# The method the batch job and Serve use unless told otherwise; the library's CarveConfig keeps the
# paper's "tokencarve", one flag away (--method tokencarve). "volume-spatial" (volume whose picks also
# spread over the image) keeps >= 96.8 % of the uncompressed accuracy at 32 tokens on both LLaVA test
# models and 97.3 % at a quarter of each image's tokens on carve-tiny-qwen, where plain "volume"
# leaves empty regions without a token and the Qwen model's captions invent objects there
# (docs/EVALUATION.md).
DEFAULT_METHOD = "volume-spatial"


DECODE_PATHS = ("static", "generate")
COMPILE_CHOICES = ("auto", "yes", "no")
# The static path's defaults per device: rows decoded at once, and the KV-cache pool's share of the
# memory free after the weights (a GPU's is the engine's to fill, as vLLM's gpu_memory_utilization; a
# CPU's is shared with the host's other work). The job hands an engine more rows per call than slots
# (pipeline.job.CaptionJob.batch_size), so finished rows' slots refill.
DEFAULT_SLOTS = {"cuda": 64, "cpu": 16}
DEFAULT_KV_SHARE = {"cuda": 0.9, "cpu": 0.25}
# Generation settings a run may set over the checkpoint's generation config (None: the checkpoint's)
GENERATION_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "min_new_tokens", "stop")

log = logging.getLogger(__name__)


def _setting(default, help: str, **extra):
    """An EngineConfig field with the help text that the job's options and Serve's schema show."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class EngineConfig:
    """Every engine setting, with its default and its meaning: the one place the job's command line,
    Serve's settings and the evaluation harness take them from (each field's metadata has its help)."""

    model: str = field(metadata={"help": "a local folder or a hub id"})
    revision: str | None = _setting(None, "hub revision (commit) to load; the job pins the one it resolved")
    keep: int | float | Adaptive = _setting(
        64,
        "visual tokens per image (64), a fraction of each image's tokens (0.1), or adaptive (auto:64: 64 on "
        "average, each image what it carries; auto:64,min=16,max=192,multiple=8,tau=0.93); ignored for method none",
    )
    method: str = _setting(DEFAULT_METHOD, "token selection (none: the stock model)", choices=METHODS)
    layer: int = _setting(2, "the cut sits before this decoder layer (after that many layers)")
    # an ablation for mRoPE models (CarveConfig.positions): "1d" places kept tokens as a LLaVA carve would
    positions: str = _setting(
        "3d",
        "mRoPE models: the kept tokens' positions after the cut: 3d (their own), 1d (ablation: 1-D sequence index)",
        choices=CARVE_POSITIONS,
    )
    max_new_tokens: int = _setting(64, "the most tokens generated per row")
    device: str = _setting("auto", "auto: cuda if available")
    dtype: str = _setting("auto", "auto: bfloat16 on cuda, float32 on cpu")
    # "...<image>...{prompt}...": a fixed template; None: the checkpoint's own chat template (LLaVA-1.5's
    # USER/ASSISTANT form when it has none), as the evaluation harness uses
    prompt_template: str | None = _setting(
        None, "a fixed template with <image> and {prompt}; default: the checkpoint's chat template"
    )
    # prompt tokens a row may use (the template's included); None: what the context window leaves
    # after the image's tokens and max_new_tokens. Longer prompts are refused before any model work.
    max_prompt_tokens: int | None = _setting(
        None, "prompt tokens a row may use; default: what the context window leaves"
    )
    # "auto": LLaVA-1.5's pad-to-square (any-resolution families: shrunk to their largest grid);
    # "processor": the image as it is, for the processor's own resize and centre crop
    image_policy: str = _setting(
        "auto",
        "auto: pad to square (any-resolution: shrink to the largest grid); processor: as is",
        choices=IMAGE_POLICIES,
    )
    seed: int = _setting(0, "the random method's seed, and sampling's (each row's: this and the row's id)")
    # native-resolution families (Qwen-VL): bounds on an image's area after the processor's resize, so on
    # its token count (area / (patch x merge)^2: 28 px squares for Qwen2/2.5-VL); None: the checkpoint's
    min_pixels: int | None = _setting(None, "native-resolution models: an image's least area in pixels")
    max_pixels: int | None = _setting(
        None, "native-resolution models: an image's largest area in pixels (bounds its tokens)"
    )
    # an adaptive budget without tau is calibrated on this many rows (images) before any is captioned:
    # the job's first rows, the harness's first questions (tau is then recorded with the output)
    calibration_rows: int = _setting(256, "rows an adaptive budget without tau (auto:64) is calibrated on")
    # "static": prefill as generate() does, then a fixed-shape compiled greedy decode over a slot pool
    # with continuous refill (tokencarve.decode); "generate": Hugging Face generate() per batch
    decode: str = _setting(
        "static", "decode path: static (fixed-shape step, refilled slots) or generate", choices=DECODE_PATHS
    )
    # rows decoded at once on the static path (the pool's slots); None: DEFAULT_SLOTS for the device
    decode_slots: int | None = _setting(
        None, "rows decoded at once on the static path (default: 64 on a GPU, 16 on a CPU)"
    )
    # the static path's pool is allocated once, within this; a fraction is of the memory free once the
    # weights are loaded (tokencarve.decode.layout splits it into slots x capacity)
    kv_cache_memory: float | None = _setting(
        None,
        "the static path's KV-cache pool: bytes (> 1) or a share of the memory free after the weights "
        "(<= 1; default 0.9 on a GPU, 0.25 on a CPU)",
    )
    # generation settings over the checkpoint's generation config (None: the checkpoint's, as generate()
    # reads it); both decode paths honour them
    do_sample: bool | None = _setting(None, "sample instead of greedy (default: the checkpoint's)")
    temperature: float | None = _setting(None, "sampling temperature (default: the checkpoint's)")
    top_k: int | None = _setting(None, "sampling: keep the k most likely tokens, 0: all (default: the checkpoint's)")
    top_p: float | None = _setting(None, "sampling: nucleus mass (default: the checkpoint's)")
    repetition_penalty: float | None = _setting(None, "repetition penalty, 1: none (default: the checkpoint's)")
    min_new_tokens: int | None = _setting(None, "no eos before this many tokens (default: the checkpoint's)")
    stop: str | None = _setting(None, 'a stop string, or a JSON list of them (\'["\\n", "."]\'); default: none')
    # "auto": compiled on a GPU (CUDA graphs: where decode is launch-bound) and run eagerly on a CPU, where
    # one inductor compile per pool shape costs ~40 s cold for a gain of ~1.3x per step (docs/BENCHMARKS.md)
    compile_decode: str = _setting(
        "auto", "compile the static decode step: auto (on a GPU), yes, no", choices=COMPILE_CHOICES
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.prompt_template is not None and (
            "{prompt}" not in self.prompt_template or "<image>" not in self.prompt_template
        ):
            raise ValueError("prompt_template needs an <image> placeholder and a {prompt} field")
        if self.image_policy not in IMAGE_POLICIES:
            raise ValueError(f"image_policy must be one of {IMAGE_POLICIES}, got {self.image_policy!r}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError("max_prompt_tokens must be >= 1")
        if self.decode not in DECODE_PATHS:
            raise ValueError(f"decode must be one of {DECODE_PATHS}, got {self.decode!r}")
        if self.compile_decode not in COMPILE_CHOICES:
            raise ValueError(f"compile_decode must be one of {COMPILE_CHOICES}, got {self.compile_decode!r}")
        if self.decode_slots is not None and self.decode_slots < 1:
            raise ValueError("decode_slots must be >= 1")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError("kv_cache_memory must be > 0: bytes, or a share (<= 1) of the free memory")
        GenerationSettings().override(**self.generation_overrides())  # checks the values
        for bound in (self.min_pixels, self.max_pixels):
            if bound is not None and bound < 1:
                raise ValueError("min_pixels / max_pixels must be >= 1")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels must not exceed max_pixels")
        if self.calibration_rows < 1:
            raise ValueError("calibration_rows must be >= 1")
        if self.method != "none":
            # validates keep / layer / positions early
            CarveConfig(keep=self.keep, layer=self.layer, method=self.method, positions=self.positions)

    def generation_overrides(self) -> dict:
        """The generation settings this config sets (the rest are the checkpoint's)."""
        overrides = {name: getattr(self, name) for name in GENERATION_FIELDS if name != "stop"}
        if self.stop is not None:
            stop = json.loads(self.stop) if self.stop.startswith("[") else [self.stop]
            overrides["stop_strings"] = tuple(stop)
        return overrides

    @property
    def model_name(self) -> str:
        """What output rows record as the model: the last part of its path or hub id."""
        return self.model.rstrip("/").split("/")[-1]

    @property
    def budget(self) -> int | float | Adaptive | None:
        """What output rows record as `keep`: the budget per image, None for the stock model."""
        return None if self.method == "none" else self.keep

    @property
    def carve_config(self) -> CarveConfig:
        """keep=None for the stock model: bit-identical to it, the figures still measured."""
        return CarveConfig(
            keep=self.budget,
            layer=self.layer,
            method="tokencarve" if self.method == "none" else self.method,
            seed=self.seed,
            positions=self.positions,
        )


class ModelInputs:
    """How an input becomes what the model sees, read from its config and processor (no weights).

    Images: LLaVA-1.5 pads every image to a square with the processor's mean colour and resizes it
    to the vision tower's side (its `pad`); LLaVA-NeXT / OneVision take any resolution (their
    processor tiles it), so an image is only shrunk to fit the largest tiling grid, aspect kept;
    Qwen-VL images are resized to the native grid their processor would give them (a multiple of
    patch x merge px a side, the area within min / max pixels, which bound its tokens).
    Prompts: the checkpoint's chat template, and a prompt must fit the context window next to the
    largest image's tokens and the answer. The batch job's CPU stage, Serve and the engine itself
    all go through one of these, so they see the same pixels and refuse the same prompts."""

    def __init__(self, config: EngineConfig, processor, model_config):
        self.processor = processor
        self.template = config.prompt_template  # None: the checkpoint's chat template (tokencarve.loading.chat_prompt)
        self.tokenizer = processor.tokenizer
        family = family_for_config(model_config)
        self.native = family.native_resolution  # each image at its own grid (`_native_size`)
        self.placeholder = image_placeholder(family, processor)
        self.image_size = getattr(model_config.vision_config, "image_size", None)
        pinpoints = getattr(model_config, "image_grid_pinpoints", None)
        self.policy = config.image_policy
        self.square = not pinpoints  # LLaVA-1.5's pad; else the largest grid bounds an any-resolution image
        self.max_side = max(max(p) for p in pinpoints) if pinpoints else self.image_size
        mean = getattr(processor.image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
        self.pad_color = tuple(int(round(255 * m)) for m in mean[:3])
        self.image_tokens = max_image_tokens(model_config, processor.image_processor)
        self.context_window = model_config.text_config.max_position_embeddings
        self.max_prompt_tokens = config.max_prompt_tokens
        self.max_new_tokens = config.max_new_tokens
        self.prompt_tokens = functools.lru_cache(maxsize=1024)(self._prompt_tokens)  # corpora repeat prompts

    @classmethod
    def load(cls, config: EngineConfig) -> ModelInputs:
        from transformers import AutoConfig

        processor = load_processor(
            config.model, min_pixels=config.min_pixels, max_pixels=config.max_pixels, revision=config.revision
        )
        return cls(config, processor, AutoConfig.from_pretrained(config.model, revision=config.revision))

    def image(self, image: Image.Image) -> Image.Image | RowError:
        if self.policy == "processor":
            return image
        if self.native:
            return self._native_size(image)
        if self.square:
            return square(image, self.image_size, self.pad_color)
        if max(image.size) <= self.max_side:
            return image
        scale = self.max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return image.resize(size, Image.Resampling.BICUBIC)

    def image_error(self, image: Image.Image) -> RowError | None:
        """Why the model's processor cannot take this image, or None (Serve refuses such a request
        up front; the batch job's CPU stage writes the same error row through `image`)."""
        target = self._native_target(image) if self.native and self.policy != "processor" else None
        return target if isinstance(target, RowError) else None

    def _native_size(self, image: Image.Image) -> Image.Image | RowError:
        """Qwen-VL: the image at the size its processor resizes it to, done here so that the job's CPU
        stage does it and ships no more pixels than the model takes; the processor's resize is then
        the identity (the same pixels either way: tested)."""
        target = self._native_target(image)
        if isinstance(target, RowError):
            return target
        return image if target == image.size else image.resize(target, Image.Resampling.BICUBIC)

    def _native_target(self, image: Image.Image) -> tuple[int, int] | RowError:
        """(width, height) by the processor's own smart_resize: a multiple of patch x merge px a side,
        the area within min / max pixels, the aspect ratio kept."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        processor = self.processor.image_processor
        try:
            height, width = smart_resize(
                image.height,
                image.width,
                factor=processor.patch_size * processor.merge_size,
                min_pixels=processor.size["shortest_edge"],
                max_pixels=processor.size["longest_edge"],
            )
        except ValueError as err:  # e.g. an aspect ratio over 200:1
            return RowError("unsupported_image_shape", f"{image.width}x{image.height}: {err}")
        return width, height

    def prompt_text(self, prompt: str | None) -> str:
        """The model's input text for one image and one question."""
        if self.template is None:
            return chat_prompt(self.processor, prompt or DEFAULT_PROMPT)
        return self.template.replace("<image>", self.placeholder).format(prompt=prompt or DEFAULT_PROMPT)

    def prompt_limit(self, max_new_tokens: int | None = None) -> int:
        """The most prompt tokens (template included, image tokens not) a row may have."""
        room = self.context_window - self.image_tokens - (max_new_tokens or self.max_new_tokens)
        return min(room, self.max_prompt_tokens) if self.max_prompt_tokens else room

    def prompt_error(self, prompt: str | None, max_new_tokens: int | None = None) -> RowError | None:
        """Why a prompt cannot be run, or None. Costs one tokenizer call, no forward."""
        for placeholder in dict.fromkeys(("<image>", self.image_token)):
            if prompt is not None and placeholder in prompt:
                return RowError("invalid_prompt", f"the prompt contains the image placeholder {placeholder}")
        limit = self.prompt_limit(max_new_tokens)
        tokens = self.prompt_tokens(prompt)
        if tokens > limit:
            return RowError(
                "prompt_too_long",
                f"the prompt is {tokens} tokens (template included); the limit is {limit} "
                f"(context {self.context_window} - {self.image_tokens} image tokens - "
                f"{max_new_tokens or self.max_new_tokens} new tokens, or --max-prompt-tokens)",
            )
        return None

    @property
    def image_token(self) -> str:
        return getattr(self.processor, "image_token", None) or "<image>"

    def _prompt_tokens(self, prompt: str | None) -> int:
        text = self.prompt_text(prompt)
        return len(self.tokenizer(text).input_ids) - 1  # the image placeholder counts as the image's tokens


@dataclass
class Caption:
    caption: str
    visual_tokens_in: int
    visual_tokens_kept: int
    kv_bytes_held: int
    kv_bytes_uncompressed: int
    generated_tokens: int
    prompt_tokens: int  # prompt tokens entering the model (visual tokens before carving)
    latency_s: float  # wall time of the generate() call that produced this row (shared by its batch)


@dataclass
class BatchTiming:
    """Where one generate() call's time went (what the metrics report)."""

    prefill_seconds: float  # the first forward: vision tower, projector, prompt (and the carve)
    decode_seconds: float  # every later forward
    carve_seconds: float  # the carve step alone (inside prefill)


class _ForwardTimer:
    """Times each forward of the model during generate() (synchronising the GPU, so times are real)."""

    def __init__(self, model):
        self.model, self.durations, self._started = model, [], 0.0
        self._hooks = [model.register_forward_pre_hook(self._start), model.register_forward_hook(self._stop)]

    def remove(self) -> None:
        """Off the model: a model outlives the engines made over it (an evaluation makes one per call)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _sync(self):
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def _start(self, module, args):
        self._sync()
        self._started = time.perf_counter()

    def _stop(self, module, args, output):
        self._sync()
        self.durations.append(time.perf_counter() - self._started)


class CaptionEngine:
    def __init__(self, config: EngineConfig, model=None, processor=None):
        """Loads `config.model`, or takes an already loaded `model` and `processor` (a model just
        trained, a test's); TokenCarve is applied unless the model already carries it."""
        self.config = config
        if model is None:
            model, processor = load_llava(
                config.model,
                config.device,
                config.dtype,
                revision=config.revision,
                min_pixels=config.min_pixels,
                max_pixels=config.max_pixels,
            )
        processor.tokenizer.padding_side = "left"  # batched generate() continues every row from its last token
        self.model, self.processor = model, processor
        self._applied_carve = not tokencarve.is_applied(model)  # close() takes off only a carve of its own
        if self._applied_carve:
            tokencarve.apply(model, config.carve_config)
        self.inputs = ModelInputs(config, self.processor, self.model.config)
        self.model_name = config.model_name
        self._timer = _ForwardTimer(self.model)
        overrides = config.generation_overrides()
        # generate() reads the checkpoint's generation config itself; these go on top of it
        self._generate_kwargs = {
            k: list(v) if k == "stop_strings" else v for k, v in overrides.items() if v is not None
        }
        self.generation = None  # the static path's: the checkpoint's generation settings, overrides on top
        self.decoder = None  # the static path's decode loop (tokencarve.decode); None: generate()
        if config.decode == "static":
            self.generation = GenerationSettings.resolve(self.model.generation_config, **overrides)
            device = self.model.device.type
            self.decoder = StaticDecoder(
                self.model,
                self.model.tokencarve.language_model,
                eos_ids(self.model.generation_config),
                slots=config.decode_slots or DEFAULT_SLOTS.get(device, DEFAULT_SLOTS["cpu"]),
                kv_cache_bytes=kv_cache_bytes(config.kv_cache_memory, self.model.device),
                compile=config.compile_decode == "yes" or config.compile_decode == "auto" and device == "cuda",
                features=Features.of([self.generation]),
            )
            # before any row: the pool's one allocation and every compiled shape (actors and replicas
            # are built before they take work, so this is their warm-up)
            self.decoder.warm_up()
            log.info(
                "CaptionEngine %s: static decode warm in %.1f s", self.model_name, self.decoder.stats.warmup_seconds
            )
        self.last_timing: BatchTiming | None = None

    @torch.inference_mode()
    def caption(
        self,
        images: list[Image.Image],
        prompts: list[str | None],
        max_new_tokens: int | list[int] | None = None,
        keep: int | float | None = None,
        method: str | None = None,
        seeds: list[int] | None = None,
    ) -> list[Caption]:
        """Caption (or answer) one batch; images are RGB (any size: `inputs.image` makes them what the
        model sees), prompts may be None and must fit (`inputs.prompt_error`). `keep` / `method`
        override the budget for this batch only; `max_new_tokens`, one for all rows or each row's own.
        `seeds`: each row's sampling seed (`row_seed`; default the config's seed): on the static path a
        row's caption depends on its seed, not on its batch."""
        setting = replace(self.config, keep=keep or self.config.keep, method=method or self.config.method)
        max_new_tokens = max_new_tokens or self.config.max_new_tokens
        seeds = seeds if seeds is not None else [self.config.seed] * len(images)
        with self.model.tokencarve.using(setting.carve_config):
            if self.decoder is not None:
                return self._decode_static(images, prompts, max_new_tokens, seeds)
            if isinstance(max_new_tokens, list):  # generate() runs a batch to one length: a call per length
                return self._generate_by_length(images, prompts, max_new_tokens)
            return self._generate(images, prompts, max_new_tokens)

    @torch.inference_mode()
    def calibrate(
        self,
        images: list[Image.Image],
        prompts: list[str | None],
        keep: Adaptive | None = None,
        method: str | None = None,
        batch_size: int = 16,
    ) -> Adaptive:
        """The adaptive budget (`keep`, default the config's) with the tau whose mean count over these
        rows' images is its `mean`: one prefill per `batch_size` rows, nothing decoded. The sample is
        what the caller hands in (the job's first rows, the harness's first questions), so it is
        bounded by construction."""
        setting = replace(self.config, keep=keep or self.config.keep, method=method or self.config.method)
        if not isinstance(setting.keep, Adaptive):
            raise ValueError(f"only an adaptive budget (auto:64) is calibrated, got keep={setting.keep!r}")
        budget = setting.keep.uncalibrated
        carver = self.model.tokencarve
        with carver.using(replace(setting, keep=budget).carve_config), carver.calibrating() as curves:
            for start in range(0, len(images), batch_size):
                rows = slice(start, start + batch_size)
                prefill_rows(self.model, self._model_inputs(images[rows], prompts[rows]))
        if not curves:
            raise ValueError(f"nothing to calibrate {budget} on: no image had more than max={budget.max} tokens")
        return budget.calibrated(torch.cat(curves))

    def close(self) -> None:
        """Leave the caller's model as it was given: the timing hooks off, and the carve off if this
        engine put it on. An engine that loaded its own model need not be closed."""
        self._timer.remove()
        if self._applied_carve and tokencarve.is_applied(self.model):
            tokencarve.remove(self.model)

    def _model_inputs(self, images, prompts) -> dict:
        """The processor's tensors for rows of (image, prompt), on the model's device and dtype."""
        texts = [self.inputs.prompt_text(p) for p in prompts]
        images = [self.inputs.image(image) for image in images]  # a no-op on rows the job already prepared
        refused = next((image for image in images if isinstance(image, RowError)), None)
        if refused is not None:
            raise ValueError(f"{refused.code}: {refused.message}")
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True).to(self.model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _generate_by_length(self, images, prompts, caps: list[int]) -> list[Caption]:
        captions: list[Caption | None] = [None] * len(images)
        for cap in dict.fromkeys(caps):
            rows = [i for i, c in enumerate(caps) if c == cap]
            for row, caption in zip(rows, self._generate([images[i] for i in rows], [prompts[i] for i in rows], cap)):
                captions[row] = caption
        return captions

    def _generate(self, images, prompts, max_new_tokens) -> list[Caption]:
        inputs = self._model_inputs(images, prompts)
        self._timer.durations = []
        started = time.perf_counter()
        kwargs = self._generate_kwargs
        if kwargs.get("do_sample", self.model.generation_config.do_sample):
            torch.manual_seed(self.config.seed)  # generate() draws from torch's generator: reproducible per batch
        sequences = self.model.generate(
            **inputs, max_new_tokens=max_new_tokens, tokenizer=self.processor.tokenizer, **kwargs
        )
        latency = time.perf_counter() - started
        stats = self.model.tokencarve.last_stats  # the prefill's figures, KV bytes as of the last step
        forwards = self._timer.durations
        self.last_timing = BatchTiming(forwards[0], sum(forwards[1:]), stats.carve_seconds)
        new_tokens = sequences[:, inputs["input_ids"].shape[1] :]
        lengths = generated_lengths(new_tokens, self.model.generation_config.eos_token_id)
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [
            Caption(
                caption=text.strip(),
                visual_tokens_in=stats.visual_tokens_in[i],
                visual_tokens_kept=stats.visual_tokens_kept[i],
                kv_bytes_held=stats.kv_bytes_held[i],
                kv_bytes_uncompressed=stats.kv_bytes_uncompressed[i],
                generated_tokens=lengths[i],
                prompt_tokens=stats.prompt_tokens_in[i],
                latency_s=latency,
            )
            for i, text in enumerate(texts)
        ]

    def _decode_static(self, images, prompts, max_new_tokens, seeds) -> list[Caption]:
        """Prefill in chunks as slots free up, decode in the compiled fixed-shape pool (tokencarve.decode)."""
        rows = len(images)
        chunks: list[_Chunk] = []

        def prefill(chunk_rows: list[int]) -> Prefill:
            self._timer.durations = []
            chunk_started = time.perf_counter()
            inputs = self._model_inputs([images[i] for i in chunk_rows], [prompts[i] for i in chunk_rows])
            filled = prefill_rows(self.model, inputs)
            stats = self.model.tokencarve.last_stats
            seconds = self._timer.durations[0]
            chunks.append(_Chunk(chunk_rows, stats, cache_bytes_per_token(filled.cache), chunk_started, seconds))
            return filled

        stop = (
            StopStrings(self.processor.tokenizer, self.generation.stop_strings)
            if self.generation.stop_strings
            else None
        )
        decoded = self.decoder.run(rows, max_new_tokens, prefill, self.generation, seeds, stop)
        self.last_timing = BatchTiming(
            sum(chunk.seconds for chunk in chunks),
            self.decoder.stats.seconds,
            sum(chunk.stats.carve_seconds for chunk in chunks),
        )
        eos = eos_ids(self.model.generation_config)
        captions: list[Caption | None] = [None] * rows
        for chunk in chunks:
            stats = chunk.stats
            for i, row in enumerate(chunk.rows):
                tokens = decoded[row].tokens
                generated = len(tokens)
                text = self.processor.decode([t for t in tokens if t not in eos], skip_special_tokens=True)
                captions[row] = Caption(
                    caption=text.strip(),
                    visual_tokens_in=stats.visual_tokens_in[i],
                    visual_tokens_kept=stats.visual_tokens_kept[i],
                    # what the row's cache holds at its end: the last token it generated never enters it
                    kv_bytes_held=chunk.bytes_per_token * (stats.prompt_tokens_kept[i] + generated - 1),
                    kv_bytes_uncompressed=chunk.bytes_per_token * (stats.prompt_tokens_in[i] + generated - 1),
                    generated_tokens=generated,
                    prompt_tokens=stats.prompt_tokens_in[i],
                    latency_s=decoded[row].finished_at - chunk.started,
                )
        return captions


class StopStrings:
    """Where a row's tokens first spell a stop string (generate()'s StopStringCriteria: the row ends
    with the token that completes it, which stays in the output)."""

    def __init__(self, tokenizer, strings: tuple[str, ...]):
        self.tokenizer, self.strings = tokenizer, strings

    def __call__(self, row: int, tokens: list[int]) -> int | None:
        if not self._found(tokens):
            return None
        return next(end for end in range(1, len(tokens) + 1) if self._found(tokens[:end]))

    def _found(self, tokens: list[int]) -> bool:
        text = self.tokenizer.decode(tokens)
        return any(stop in text for stop in self.strings)


def row_seed(seed: int, row_id: str) -> int:
    """A row's sampling seed: the run's seed and the row's id (crc32), so a rerun draws the same caption."""
    return zlib.crc32(f"{seed}:{row_id}".encode())


def kv_cache_bytes(setting: float | None, device: torch.device) -> int:
    """The static path's pool budget in bytes: `setting` bytes (> 1), or that share (default
    DEFAULT_KV_SHARE) of the memory free now, after the weights."""
    share = DEFAULT_KV_SHARE.get(device.type, DEFAULT_KV_SHARE["cpu"]) if setting is None else setting
    if share > 1:
        return int(share)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = available_memory()
    return int(share * free)


def available_memory() -> int:
    """Host memory available to a new allocation: Linux's MemAvailable (free plus reclaimable cache),
    else the free pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def preflight(config: EngineConfig) -> None:
    """Every refusal the engine would make, made from the checkpoint's files alone (its config, its
    generation config; the model built on the meta device, no weights): the family, the cut and the
    method (`tokencarve.apply`), the decoder layers and generation settings of the static path. A job
    calls this on its driver before it claims an output; the messages are the engine's own."""
    from transformers import AutoConfig, GenerationConfig

    model_config = AutoConfig.from_pretrained(config.model, revision=config.revision)
    family = family_for_config(model_config)
    with torch.device("meta"):
        model = family.model_class._from_config(model_config)
    tokencarve.apply(model, config.carve_config)
    try:
        generation = GenerationConfig.from_pretrained(config.model, revision=config.revision)
    except OSError:  # none shipped: generate() uses the model config's
        generation = GenerationConfig.from_model_config(model_config)
    if config.decode == "static":
        GenerationSettings.resolve(generation, **config.generation_overrides())
        check_layers(list(model.tokencarve.language_model.layers))


@dataclass
class _Chunk:
    """Rows prefilled together on the static path, and their figures."""

    rows: list[int]
    stats: CarveStats
    bytes_per_token: int  # KV-cache bytes one token holds (all layers, keys and values)
    started: float
    seconds: float  # the prefill forward


def cache_bytes_per_token(cache) -> int:
    """KV-cache bytes per token of one row: keys and values of every layer."""
    return sum(
        layer.keys[0, :, 0].numel() * layer.keys.element_size() * 2
        for layer in cache.layers
        if getattr(layer, "keys", None) is not None
    )


def generated_lengths(new_tokens: torch.Tensor, eos_token_id) -> list[int]:
    """Tokens generated per row, up to and including the first eos (the rest is padding)."""
    eos = (
        torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])
        if eos_token_id is not None
        else None
    )
    lengths = []
    for row in new_tokens.cpu():
        hits = torch.isin(row, eos).nonzero() if eos is not None else torch.empty(0)
        lengths.append(int(hits[0]) + 1 if len(hits) else len(row))
    return lengths
