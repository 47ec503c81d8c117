"""TokenCarve on a stock Hugging Face LLaVA (1.5, NeXT, OneVision) or Qwen-VL (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL), through forward hooks.

No modeling code is copied or edited: `apply` registers PyTorch hooks on modules the model
already has and `remove` takes them off again (the PEFT pattern: wrap, then unload).

    LlavaModel          pre-hook: learn which positions hold image tokens (from input_ids) and how
                                  many each image has (tokencarve.families: what differs per family)
    language_model      pre-hook: decide whether this forward carves; at decode time, translate
                                  generate()'s uncompressed 2-D mask to the compressed cache
    layer K-1           pre-hook: keep its input and rotary tables (for the attention row)
    layer K             pre-hook: THE CUT: score, prune, merge; shorten hidden states, positions,
                                  mask, rotary tables and the caches of layers < K
    layers > K          pre-hook: hand them the shortened mask / positions / rotary tables
    language_model      hook:     per-sample figures of the forward (tokens, KV-cache bytes)

Carving happens in prefill only (a multi-token forward on an empty cache). The carved cache
carries a small note (`cache._tokencarve`) so that later forwards on it, from `generate()` or a
hand-written loop, get their attention mask mapped onto the kept tokens. Kept tokens keep their
original rotary positions; generate() continues positions from the original length by itself.

mRoPE families (Qwen-VL) carry [3, B, L] positions (or [4, B, L]: a 1-D text row first, as generate()
passes them): the cut gathers every row at the kept tokens, rebuilds the shared (cos, sin) from the
gathered 3-D rows and hands the layers only the gathered text row. Qwen3-VL's deepstack additions
after layers >= K go to the kept visual tokens (each its own feature; merged-away tokens' are dropped).
"""

from __future__ import annotations

import inspect
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.masking_utils import create_causal_mask

from . import methods, selection
from .attention import last_token_attention
from .budgets import Adaptive
from .core import CarveResult
from .families import ImageSpans, family_of, image_spans, text_positions
from .repack import Repacked, repack

CARVE_POSITIONS = ("3d", "1d")  # CarveConfig.positions: the method's, and the 1-D ablation


@dataclass(frozen=True)
class CarveConfig:
    """keep: the budget per image, visual tokens left as a count (576 -> 128 with keep=128), as a
    fraction of that image's tokens (keep=0.1: ceil(0.1 N), see `budget`), adaptive
    (keep=Adaptive(mean=64): each image its own count, from the energy its picks span; the methods of
    methods.ADAPTIVE only, tokencarve.budgets) or None for the stock model (nothing carved, the figures
    still measured); layer: K, the cut sits before decoder layer K (after K layers); attention_weight:
    w in the rank fusion; method: a name of tokencarve.methods.REGISTRY, by default "tokencarve" (the
    paper's method); seed: the random method's; positions: what rotary positions the layers after the
    cut give the kept tokens of an mRoPE model (Qwen-VL): "3d", their own 3-D rows (the method), or
    "1d", an ablation: each kept token at its 1-D index in the uncompressed sequence on all three axes,
    as a carve written for LLaVA would place it (the slip a port makes silently; decoding unchanged).
    1-D families are unaffected."""

    keep: int | float | Adaptive | None = 64
    layer: int = 2
    attention_weight: float = 0.5
    method: str = "tokencarve"
    seed: int = 0
    positions: str = "3d"

    def __post_init__(self):
        fraction = isinstance(self.keep, float) and 0.0 < self.keep < 1.0
        if not (
            self.keep is None
            or fraction
            or isinstance(self.keep, Adaptive)
            or isinstance(self.keep, int)
            and not isinstance(self.keep, bool)
            and self.keep >= 1
        ):
            raise ValueError(
                "CarveConfig.keep must be an integer >= 1 (tokens per image), a float in (0, 1) "
                "(a fraction of each image's tokens), an Adaptive budget or None (the stock model), "
                f"got {self.keep!r}"
            )
        if not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"CarveConfig.layer must be an integer >= 1 (the cut needs layer K-1), got {self.layer!r}")
        if not 0.0 <= self.attention_weight <= 1.0:
            raise ValueError(f"CarveConfig.attention_weight must lie in [0, 1], got {self.attention_weight!r}")
        if self.method not in methods.REGISTRY:
            raise ValueError(f"CarveConfig.method must be one of {methods.METHODS}, got {self.method!r}")
        if isinstance(self.keep, Adaptive):
            methods.check_adaptive(self.method)
        if self.positions not in CARVE_POSITIONS:
            raise ValueError(f"CarveConfig.positions must be one of {CARVE_POSITIONS}, got {self.positions!r}")

    def budget(self, num_tokens: int) -> int:
        """Tokens to keep of an image with `num_tokens` visual tokens (>= num_tokens: left uncarved).

        A fraction is read as the decimal written (0.1 is exactly 1/10, not the binary float just
        above it) and rounded up: ceil(keep * N), so at least 1 token, and 0.1 of 2,880 is 288.
        An adaptive budget gives the most an image may keep (its `max`): the core decides each count.
        """
        if self.keep is None:
            return num_tokens
        if isinstance(self.keep, Adaptive):
            return min(num_tokens, self.keep.max)
        if isinstance(self.keep, int):
            return self.keep
        return math.ceil(Fraction(repr(self.keep)) * num_tokens)


@dataclass
class ImageCarve:
    """What happened to one image's visual tokens (CPU tensors, for inspection and plots)."""

    sample: int  # row of the batch
    first_position: int  # sequence position of the image's first visual token
    index: torch.Tensor = field(repr=False)  # [T] kept tokens, 0..N-1 within the image
    assignment: torch.Tensor = field(repr=False)  # [N] output slot carrying each token, -1 if pruned
    merged: torch.Tensor = field(repr=False)  # [N] True where the token was merged into another
    # [T, D] the image's rows of the hidden states entering layer K, after the carve; only when the
    # carver's `record_hidden` is set (the evaluation measures their singular-value spectrum)
    hidden: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class CarveStats:
    """Per-sample figures of the last forward on a patched model (lists are indexed by batch row).

    KV bytes are measured from the cache tensors: bytes_per_token is their total size divided by
    the slots they hold; per sample, held = its real (non-padding) tokens in the cache and
    uncompressed = what the same cache would hold without carving. kv_cache_bytes is the size of
    the cache tensors as allocated (padding slots included), next to its uncompressed counterpart.
    """

    visual_tokens_in: list[int]
    visual_tokens_kept: list[int]
    prompt_tokens_in: list[int]
    prompt_tokens_kept: list[int]
    images: list[ImageCarve] = field(default_factory=list)
    carve_seconds: float = 0.0
    kv_bytes_held: list[int] | None = None
    kv_bytes_uncompressed: list[int] | None = None
    kv_cache_bytes: int | None = None
    kv_cache_bytes_uncompressed: int | None = None


@dataclass
class _CacheNote:
    """Attached to a cache at prefill (`cache._tokencarve`): how its prefill rows map to the
    uncompressed sequence, and the figures later forwards on it keep up to date."""

    prefill_mask: torch.Tensor  # [B, L'] 2-D mask of the (compressed) prefill
    original_length: int  # L, the uncompressed prefill length
    stats: CarveStats

    @property
    def removed(self) -> int:
        return self.original_length - self.prefill_mask.shape[1]


@dataclass
class _Prefill:
    """Book-keeping for one prefill forward, alive from the language-model pre-hook to its hook."""

    image_mask: torch.Tensor  # [B, L] bool
    mask_2d: torch.Tensor  # [B, L] long, 1 = real token
    position_ids: torch.Tensor  # [B, L]; mRoPE: [3 or 4, B, L]
    stats: CarveStats
    carve: bool  # False: figures only, the forward runs exactly as stock
    spans: ImageSpans | None = None  # each image's token positions (None: no image in the batch)
    cut_input: torch.Tensor | None = None
    cut_position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    overrides: dict | None = None
    packed: Repacked | None = None  # the layout after the cut (set by the carve)


class TokenCarver:
    """The hooks and state that make one loaded LLaVA model carve its visual tokens."""

    def __init__(self, model, config: CarveConfig):
        self.family = family_of(model)
        self.language_model = self.family.language_model(model)
        layers = self.language_model.layers
        if not 1 <= config.layer < len(layers):
            raise ValueError(
                f"CarveConfig.layer={config.layer} is out of range: the language model has {len(layers)} "
                f"decoder layers, so the cut must sit before a layer in 1..{len(layers) - 1}"
            )
        _check_decoder(self.language_model, config.layer)
        self.model = model
        # LLaVA-1.5's fixed N (576); None for NeXT / OneVision, whose images vary in size
        self.tokens_per_image = self.family.fixed_tokens(model.config)
        self._check_method(config)
        self.config = config
        self.last_stats: CarveStats | None = None
        # Diagnostics: keep each image's visual rows entering layer K in last_stats.images, also
        # for forwards that do not carve (keep >= N). Off by default: it copies [T, D] per image.
        self.record_hidden = False
        self._calibration: list[torch.Tensor] | None = None  # share curves, while `calibrating`
        self._image_mask: torch.Tensor | None = None
        self._count_images = None  # image mask -> N_i per image of the current forward (called at prefill only)
        self._prefill: _Prefill | None = None
        cut = config.layer
        multimodal = self.family.multimodal_module(model)
        self._handles = [
            multimodal.register_forward_pre_hook(self._find_image_tokens, with_kwargs=True),
            self.language_model.register_forward_pre_hook(self._start_forward, with_kwargs=True),
            layers[cut - 1].register_forward_pre_hook(self._keep_cut_input, with_kwargs=True),
            layers[cut].register_forward_pre_hook(self._carve_at_cut, with_kwargs=True),
            *(layer.register_forward_pre_hook(self._reroute_layer, with_kwargs=True) for layer in layers[cut + 1 :]),
            self.language_model.register_forward_hook(self._finish_forward, with_kwargs=True),
        ]
        self._deepstack = _DeepstackOnKeptTokens(self) if hasattr(self.language_model, "_deepstack_process") else None

    def reconfigure(self, config: CarveConfig) -> None:
        """Change the budget, weight or method between forwards (the cut's layer stays where it is)."""
        if config.layer != self.config.layer:
            raise ValueError(
                f"reconfigure cannot move the cut from layer {self.config.layer} to {config.layer}; "
                "remove() and apply() instead"
            )
        self._check_method(config)
        self.config = config

    @contextmanager
    def using(self, config: CarveConfig):
        """`with model.tokencarve.using(CarveConfig(keep=32)):` a temporary config (checked as by
        `reconfigure`: the cut's layer cannot move); the previous one is back on exit, also on an error."""
        previous = self.config
        self.reconfigure(config)
        try:
            yield self
        finally:
            self.config = previous  # was valid before; no re-check that could raise over the original error

    @contextmanager
    def calibrating(self):
        """`with model.tokencarve.calibrating() as curves:` forwards under an adaptive budget without
        tau keep `max` tokens per image and append each image's share curve ([images, max]: the share
        of its energy its first 1..max picks span) to `curves`; `Adaptive.calibrated(torch.cat(curves))`
        is then the calibrated budget (CaptionEngine.calibrate does this on rows of a corpus). Outside
        it, an adaptive budget without tau is refused at the cut."""
        previous, self._calibration = self._calibration, []
        try:
            yield self._calibration
        finally:
            self._calibration = previous

    def _check_method(self, config: CarveConfig) -> None:
        # NeXT / OneVision images are a base grid, tiles and newline tokens in one span: no one grid
        # describes them (LLaVA-1.5's square grid and Qwen-VL's mRoPE rows do)
        if methods.REGISTRY[config.method].needs_grid and not (self.family.mrope or self.tokens_per_image):
            raise ValueError(
                f"method={config.method!r} needs each image's token grid; {self.family.name} images are a base "
                "grid, tiles and newline tokens in one span"
            )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._deepstack is not None:
            self._deepstack.remove()
            self._deepstack = None
        self._image_mask = self._prefill = self._count_images = None

    # -- hooks -----------------------------------------------------------------------------------

    def _find_image_tokens(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        image_token_id = self.model.config.image_token_id
        if input_ids is not None:
            self._image_mask = input_ids == image_token_id
        elif kwargs.get("inputs_embeds") is not None:  # same rule as LlavaModel.get_placeholder_mask
            embeds = kwargs["inputs_embeds"]
            image_embedding = module.get_input_embeddings()(torch.tensor(image_token_id, device=embeds.device))
            self._image_mask = (embeds == image_embedding).all(-1)
        else:
            self._image_mask = None
        # Counting each image's tokens reads image_sizes (a host sync): deferred to a prefill with images.
        self._count_images = lambda mask: self.family.token_counts(module, kwargs, mask)

    def _start_forward(self, module, args, kwargs):
        image_mask, self._image_mask = self._image_mask, None
        count_images, self._count_images = self._count_images, None
        self._prefill = None
        cache = _cache_in(kwargs)
        cached = cache.get_seq_length() if cache is not None else 0
        note = getattr(cache, "_tokencarve", None)
        if cached > 0:  # a decode step (or a continuation): never carves
            if note is not None and note.removed > 0:
                return args, self._decode_kwargs(kwargs, cache, note)
            return None

        hidden = kwargs.get("inputs_embeds")
        batch, length = hidden.shape[:2] if hidden is not None else kwargs["input_ids"].shape[:2]
        device = hidden.device if hidden is not None else kwargs["input_ids"].device
        mask_2d = kwargs.get("attention_mask")
        if mask_2d is not None and mask_2d.ndim != 2:
            if image_mask is not None and image_mask.any():
                raise ValueError("TokenCarve needs a 2-D attention mask (or none) to carve; got a prepared 4-D mask")
            return None
        if mask_2d is None:
            mask_2d = torch.ones(batch, length, dtype=torch.long, device=device)
        if image_mask is None or image_mask.shape != (batch, length):
            image_mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        positions = _prefill_positions(kwargs.get("position_ids"), batch, length, device, self.family.mrope)
        spans = None
        if bool(image_mask.any()):
            spans = image_spans(image_mask, count_images(image_mask) if count_images is not None else None)
        carve = length > 1 and spans is not None and any(self.config.budget(n) < n for n in spans.counts)
        stats = _uncarved_stats(image_mask, mask_2d)
        self._prefill = _Prefill(image_mask, mask_2d.long(), positions, stats, carve, spans)
        self.last_stats = stats
        return None

    def _keep_cut_input(self, module, args, kwargs):
        if self._prefill is not None and self._prefill.carve:
            self._prefill.cut_input = args[0] if args else kwargs["hidden_states"]
            self._prefill.cut_position_embeddings = kwargs["position_embeddings"]

    def _carve_at_cut(self, module, args, kwargs):
        if self._prefill is None:
            return None
        if not self._prefill.carve:
            if self.record_hidden and self._prefill.spans is not None:
                self._record_uncarved(args[0] if args else kwargs["hidden_states"])
            return None
        hidden = args[0] if args else kwargs.pop("hidden_states")
        hidden = self._carve(hidden, _cache_in(kwargs))
        kwargs.update(self._prefill.overrides)
        return (hidden, *args[1:]), kwargs

    def _reroute_layer(self, module, args, kwargs):
        if self._prefill is not None and self._prefill.overrides is not None:
            kwargs.update(self._prefill.overrides)
            return args, kwargs
        return None

    def _finish_forward(self, module, args, kwargs, output):
        prefill, self._prefill = self._prefill, None
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        if cache is None:
            return
        note = getattr(cache, "_tokencarve", None)
        if prefill is not None and note is None:  # an uncarved prefill: note its plain layout
            note = cache._tokencarve = _CacheNote(prefill.mask_2d, prefill.mask_2d.shape[1], prefill.stats)
        if note is not None and cache.get_seq_length() > 0:
            _measure_kv_bytes(note, cache)
            self.last_stats = note.stats

    # -- the cut ---------------------------------------------------------------------------------

    def _carve(self, hidden: torch.Tensor, cache) -> torch.Tensor:
        """Carve every image of the batch and return the shortened hidden states entering layer K."""
        started = time.perf_counter()
        prefill, cfg = self._prefill, self.config
        attention = last_token_attention(
            self.language_model.layers[cfg.layer - 1],
            prefill.cut_input,
            prefill.cut_position_embeddings,
            prefill.mask_2d,
        )
        groups = self._reduce_images(hidden, attention)
        hidden, keep_mask = _place_kept_tokens(hidden, groups, prefill)
        packed = repack(hidden, keep_mask, prefill.mask_2d, prefill.position_ids)
        if cache is not None:
            _shrink_cache(cache, packed.order, num_layers=cfg.layer)
        prefill.overrides = self._layer_overrides(packed)
        prefill.packed = packed
        stats = prefill.stats
        stats.prompt_tokens_kept = packed.mask_2d.sum(1).tolist()
        stats.images = self._describe_images(groups)
        stats.visual_tokens_kept = list(stats.visual_tokens_in)
        for image in stats.images:  # images differ in N and in what they keep: count each one
            stats.visual_tokens_kept[image.sample] -= len(image.assignment) - len(image.index)
        if cache is not None:
            cache._tokencarve = _CacheNote(packed.mask_2d, keep_mask.shape[1], stats)
        stats.carve_seconds = time.perf_counter() - started
        return packed.hidden

    def _layer_overrides(self, packed: Repacked) -> dict:
        """What layers >= K get instead of the uncompressed mask, positions and rotary tables.

        mRoPE: the rotary tables come from the kept tokens' original 3-D rows (the last three), and the
        layers' `position_ids` is the gathered 1-D text row where the model had one (else None, as stock)."""
        rotary_positions = text_row = packed.position_ids
        if self.family.mrope:
            rotary_positions = packed.position_ids[-3:]
            text_row = packed.position_ids[0] if packed.position_ids.shape[0] == 4 else None
            if self.config.positions == "1d":  # the ablation: each kept token's 1-D sequence index
                sequence = text_positions(self._prefill.mask_2d).gather(1, packed.order)
                rotary_positions = sequence.unsqueeze(0).expand(3, -1, -1)
        causal_mask = create_causal_mask(
            config=self.language_model.config,
            inputs_embeds=packed.hidden,
            attention_mask=packed.mask_2d,
            position_ids=text_row,
            **{_MASK_CACHE_ARGUMENT: None},  # layers >= K start empty: mask the kept tokens among themselves
        )
        return {
            "attention_mask": causal_mask,
            "position_ids": text_row,
            "position_embeddings": self.language_model.rotary_emb(packed.hidden, position_ids=rotary_positions),
        }

    def _reduce_images(self, hidden, attention, *, keep_all: bool = False):
        """Run the core on every image: one batched call per group of images with the same token
        count N (one call for LLaVA-1.5, whose images all have 576, so its results are those of a
        single batched call). Each image keeps `config.budget(N)` tokens (all N with keep_all)."""
        spans, cfg = self._prefill.spans, self.config
        adaptive = isinstance(cfg.keep, Adaptive) and not keep_all
        if adaptive and cfg.keep.tau is None and self._calibration is None:
            raise ValueError(
                f"the adaptive budget {cfg.keep} has no tau yet: calibrate it (CaptionEngine.calibrate, "
                "TokenCarver.calibrating; the job and the harness calibrate on their first rows) or give tau"
            )
        groups = []
        for images in spans.groups():
            rows = torch.tensor([spans.rows[i] for i in images], device=hidden.device).unsqueeze(1)
            positions = torch.stack([spans.positions[i] for i in images])
            n = positions.shape[1]
            grid = self._token_grid(rows, positions)
            result = methods.reduce_tokens(
                hidden[rows, positions],
                attention[rows, positions] if attention is not None else hidden.new_zeros(positions.shape),
                n if keep_all else cfg.keep if adaptive else cfg.budget(n),
                method=cfg.method,
                attention_weight=cfg.attention_weight,
                seed=cfg.seed,
                grid=grid,
            )
            if self._calibration is not None and result.shares is not None:
                self._calibration.append(result.shares.detach().cpu())
            # an adaptive result is padded to its group's largest count: padding (index -1) is masked out
            kept_positions = positions.gather(1, result.index.clamp_min(0))
            groups.append(_Group(rows.expand_as(kept_positions), kept_positions, result, images, positions))
        return groups

    def _token_grid(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """Each token's (row, column) on its image's token grid [B', N, 2], for the methods that read
        it: on mRoPE models the height and width rows of its own 3-D position (offset by where the
        image starts, which no distance sees); on LLaVA-1.5 its place in the square grid; None for
        NeXT / OneVision (a base grid, tiles and newline tokens in one span)."""
        if not methods.REGISTRY[self.config.method].uses_grid:
            return None
        if self.family.mrope:  # [3, B, L] (t, h, w) or [4, B, L] (text, t, h, w): h and w are the last two
            height_width = self._prefill.position_ids[-2:, rows[:, 0]]  # [2, B', L]
            return height_width.gather(2, positions.expand(2, -1, -1)).permute(1, 2, 0)
        side = math.isqrt(positions.shape[1])
        if self.tokens_per_image is None or side * side != positions.shape[1]:
            return None
        return selection.square_grid(side, positions.shape[0], positions.device)

    def _record_uncarved(self, hidden: torch.Tensor) -> None:
        """What `_carve` records, for a forward that keeps every visual token (the core's identity)."""
        self._prefill.stats.images = self._describe_images(self._reduce_images(hidden, None, keep_all=True))

    def _describe_images(self, groups) -> list[ImageCarve]:
        """One ImageCarve per image of the batch, in image order (on the CPU); hidden rows only if recorded."""
        described = {}
        for group in groups:
            result = group.result
            counts = (
                result.counts.tolist() if result.counts is not None else [result.index.shape[1]] * len(group.images)
            )
            for slot, image in enumerate(group.images):
                kept = counts[slot]  # an adaptive result's slots past the image's count are padding
                hidden = result.hidden[slot, :kept].detach().float().cpu() if self.record_hidden else None
                described[image] = ImageCarve(
                    int(group.rows[slot, 0]),
                    int(group.positions[slot, 0]),
                    result.index[slot, :kept].cpu(),
                    result.assignment[slot].cpu(),
                    result.merged[slot].cpu(),
                    hidden,
                )
        return [described[image] for image in sorted(described)]

    def _decode_kwargs(self, kwargs: dict, cache, carved: _CacheNote) -> dict:
        """Map a forward on a carved cache onto it: 2-D mask over kept tokens, original positions."""
        hidden = kwargs.get("inputs_embeds")
        new_tokens = hidden.shape[1] if hidden is not None else kwargs["input_ids"].shape[1]
        cached = cache.get_seq_length()
        after_prefill = cached + new_tokens - carved.prefill_mask.shape[1]
        mask = kwargs.get("attention_mask")
        prefill_mask = carved.prefill_mask
        if mask is None:
            tail = torch.ones(
                prefill_mask.shape[0], after_prefill, dtype=prefill_mask.dtype, device=prefill_mask.device
            )
        elif mask.ndim == 2 and mask.shape[1] == carved.original_length + after_prefill:
            tail = mask[:, carved.original_length :].to(prefill_mask.dtype)
        else:
            raise ValueError(
                f"attention_mask of shape {tuple(mask.shape)} does not describe this carved cache: expected a 2-D "
                f"mask over the uncompressed sequence ({carved.original_length} prompt + {after_prefill} new tokens)"
            )
        kwargs["attention_mask"] = torch.cat([prefill_mask, tail], dim=1)
        # what LlamaModel would use on the uncompressed cache (a Qwen-VL model always passes its own,
        # from rope_deltas, which the shorter cache does not change)
        if kwargs.get("position_ids") is None and not self.family.mrope:
            start = cached + carved.removed
            kwargs["position_ids"] = torch.arange(start, start + new_tokens, device=prefill_mask.device).unsqueeze(0)
        return kwargs


class _DeepstackOnKeptTokens:
    """Qwen3-VL adds vision-tower features to the visual positions after its first decoder layers
    (`_deepstack_process(hidden, visual_pos_masks, features)`, inside the text model's layer loop, with
    a full-length mask). After a cut before the last of those layers, the additions must land on the
    kept visual tokens: this stands in for the method on the instance (removed with the carver) and,
    in a carved forward, hands it the mask and features of the kept tokens."""

    def __init__(self, carver: TokenCarver):
        self.carver, self.language_model = carver, carver.language_model
        self.original = self.language_model._deepstack_process
        self.language_model._deepstack_process = self

    def __call__(self, hidden, visual_pos_masks, visual_embeds):
        prefill = self.carver._prefill
        if prefill is not None and prefill.packed is not None:
            visual_pos_masks, visual_embeds = kept_visual_features(prefill.packed, visual_pos_masks, visual_embeds)
        return self.original(hidden, visual_pos_masks, visual_embeds)

    def remove(self) -> None:
        del self.language_model._deepstack_process  # the class's method again


def kept_visual_features(packed: Repacked, visual_pos_masks: torch.Tensor, features: torch.Tensor):
    """A full-length visual mask [B, L] and its features [n_visual, D] (row-major) mapped onto the
    packed layout: the mask of the kept visual tokens [B, L'] and, in its row-major order, their features."""
    visual_pos_masks = visual_pos_masks.to(packed.order.device)
    index = (visual_pos_masks.flatten().cumsum(0) - 1).view_as(visual_pos_masks)  # row of each position's feature
    kept = visual_pos_masks.gather(1, packed.order) & packed.mask_2d.bool()
    return kept, features[index.gather(1, packed.order)[kept].to(features.device)]


def _prefill_positions(position_ids, batch: int, length: int, device, mrope: bool) -> torch.Tensor:
    """The positions a prefill's layers see, as the text model would derive them: [B, L] (0..L-1 when
    none are given), or for mRoPE [3 or 4, B, L] (2-D positions are broadcast to three rows, as stock)."""
    if position_ids is None:
        position_ids = torch.arange(length, device=device).unsqueeze(0)
    if not mrope:
        return position_ids.expand(batch, -1)
    if position_ids.ndim == 2:
        position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
    return position_ids.expand(-1, batch, -1)


@dataclass
class _Group:
    """One core call: images of the same token count N, carved together."""

    rows: torch.Tensor  # [G, T] batch row of each image (repeated along T, for index_put)
    kept_positions: torch.Tensor  # [G, T] sequence positions of the kept tokens
    result: CarveResult  # the core's result for the G images
    images: list[int]  # image numbers (row-major order of the batch)
    positions: torch.Tensor  # [G, N] sequence positions of all the images' tokens


def _place_kept_tokens(
    hidden: torch.Tensor, groups: list[_Group], prefill: _Prefill
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write each image's carved tokens (merged values) at their positions; the [B, L] mask of what
    stays: real text tokens and the kept visual tokens. Padding goes too: `repack` re-pads the rows."""
    keep_mask = prefill.mask_2d.bool() & ~prefill.image_mask
    for group in groups:
        where, values = (group.rows, group.kept_positions), group.result.hidden
        if group.result.counts is not None:  # an adaptive result: only each image's own slots are tokens
            real = group.result.index >= 0
            where, values = (group.rows[real], group.kept_positions[real]), values[real]
        hidden = hidden.index_put(where, values)
        keep_mask = keep_mask.index_put(where, torch.tensor(True, device=hidden.device))
    return hidden, keep_mask


def _check_decoder(language_model, cut: int) -> None:
    """Refuse decoder stacks the cut cannot handle, at apply() time rather than mid-generation."""
    layer = language_model.layers[cut - 1]
    for name in ("input_layernorm", "self_attn"):
        if not hasattr(layer, name):
            raise TypeError(f"decoder layer {type(layer).__name__} has no {name}: not a Llama-style layer")
    config = language_model.config
    layer_types = getattr(config, "layer_types", None)
    sliding = "sliding_attention" in layer_types if layer_types else getattr(config, "sliding_window", None) is not None
    if sliding:
        # the cut rebuilds a full causal mask and gathers full-length caches; a window would need both differently
        raise ValueError(
            f"{type(language_model).__name__} uses sliding-window attention "
            f"(sliding_window={getattr(config, 'sliding_window', None)}); TokenCarve needs full attention"
        )


# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache`
# (the old name still works, with a warning, until 5.40); hooks see the arguments as the caller
# spelled them, so both names are looked up.
_MASK_CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def _cache_in(kwargs: dict):
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _uncarved_stats(image_mask: torch.Tensor, mask_2d: torch.Tensor) -> CarveStats:
    visual = image_mask.sum(1).tolist()
    prompt = mask_2d.sum(1).tolist()
    return CarveStats(visual, list(visual), prompt, list(prompt))


def _shrink_cache(cache, order: torch.Tensor, num_layers: int) -> None:
    """Keep only the kept positions (`order`, [B, L']) in the caches of layers 0..K-1 (no merging)."""
    if not isinstance(cache, DynamicCache):
        raise TypeError(f"TokenCarve needs a DynamicCache to shrink the KV cache; got {type(cache).__name__}")
    for layer in cache.layers[:num_layers]:
        if type(layer) is not DynamicLayer:
            raise TypeError(f"TokenCarve cannot shrink a {type(layer).__name__} cache layer")
        index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys = layer.keys.gather(2, index)
        layer.values = layer.values.gather(2, index)


def _measure_kv_bytes(note: _CacheNote, cache) -> None:
    """Fill the KV-cache figures of the note's stats from the cache tensors themselves."""
    tensors = [
        t for layer in cache.layers if getattr(layer, "keys", None) is not None for t in (layer.keys, layer.values)
    ]
    allocated = sum(t.numel() * t.element_size() for t in tensors)
    batch, slots = tensors[0].shape[0], cache.get_seq_length()
    bytes_per_token = allocated // (batch * slots)
    generated = slots - note.prefill_mask.shape[1]
    stats = note.stats
    stats.kv_cache_bytes = allocated
    stats.kv_cache_bytes_uncompressed = bytes_per_token * batch * (slots + note.removed)
    stats.kv_bytes_held = [bytes_per_token * (kept + generated) for kept in stats.prompt_tokens_kept]
    stats.kv_bytes_uncompressed = [bytes_per_token * (n + generated) for n in stats.prompt_tokens_in]
