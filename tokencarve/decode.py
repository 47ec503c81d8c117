"""The static decode path: a fixed-shape, compiled decode over a bounded pool of slots, refilled as rows finish.

Prefill stays what it always was (the model's own forward: vision tower, projector, the carve at
layer K, any family). After it, every layer of a carved cache holds the same number of entries (the
layers before the cut are gathered to the kept positions), so its keys and values can move into a
preallocated cache of fixed shape, one row per slot:

    SlotCache   keys / values [slots, kv_heads, capacity, head_dim] per layer, `valid` [slots, capacity]
                (which entries a slot's query may see: its prefill mask, then each generated token),
                `lengths` [slots] (where the next entry is written).
    DecodePool  the step: embed each slot's last token, run the decoder layers on one position at each
                slot's own RoPE position, write keys / values at each slot's own length, pick the next
                token (`choose_tokens`: greedy, repetition penalty, min_new_tokens, temperature / top-k /
                top-p sampling with a per-row seed), and keep the books (tokens out, counts, done) on the
                device, with no host synchronisation.
    StaticDecoder  the host loop: admits prefilled rows into free slots (refill), looks at `done` every
                `sync_every` steps, checks stop strings, and owns the pool's one allocation.

Bounded shapes. The pool is allocated once per engine, sized from a KV-cache budget in bytes
(`layout`): `slots` rows of `capacity` entries each, capacity a power of two. A step reads only the
first `read` entries of each slot, `read` the power-of-two bucket (>= MIN_BUCKET) of the longest live
row, so a long row costs memory, not every later step's time. Compiled, a step's shape is (slots, read):
one graph per read bucket, `shape_count` in all, compiled when the engine starts (`warm_up`) and the
recompile allowance raised to that count. A shape that fails to compile (or any recompile limit hit)
runs that step eagerly, with a warning, counted in `DecodeStats.eager_fallbacks`. Run eagerly (a CPU's
default), a step also runs on just the occupied prefix of slots (a power-of-two bucket of it), so a
quiet pool does not pay for its empty slots. A row that needs more entries than `capacity` waits for
the pool to drain; the pool is then released and laid out again with half the slots and twice the
capacity (the same bytes), and back at the next call.

The carve hooks stay out of the step: it calls each layer's `forward` directly (hooks run only
through `module(...)`), and prefill, where the carve happens, is an ordinary eager forward.

Exactness: greedy decoding is `generate(do_sample=False)`'s: positions continue from each row's
uncompressed prompt length (generate's cumsum of the 2-D mask; for mRoPE models from max(position) +
1, the prompt length plus the row's rope_delta: a decoded token's three rows are equal, so a 1-D
table of the model's own rotary module serves them), the mask is the prefill's mask plus every
generated token, eos ends a row, `max_new_tokens` caps it; a repetition penalty and min_new_tokens
change the logits as generate()'s processors do (the penalty over the row's prompt ids without its
padding, and every token generated). Sampling draws with the Gumbel-max trick from noise that is a
hash of (the row's seed, the token's index, the vocabulary id): the same seed gives the same caption
whatever the batch or slot, and no generator state is kept.
"""

from __future__ import annotations

import gc
import logging
import math
import sys
import time
import warnings
from dataclasses import astuple, dataclass, field, replace
from typing import Callable

import torch

from .families import prefill_positions

log = logging.getLogger(__name__)

MIN_BUCKET = 64  # the smallest capacity and read length: a power of two
SLOT_BOOK_BYTES = 128  # a slot's position, counts, flags and pick settings (DecodePool: 87 bytes)


def bucket(entries: int) -> int:
    """The read / capacity bucket that holds `entries`: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(0, entries - 1).bit_length())


def buckets_up_to(capacity: int) -> list[int]:
    """Every read bucket a pool of `capacity` entries steps with: MIN_BUCKET, 2 x MIN_BUCKET, ..., capacity."""
    return [MIN_BUCKET << i for i in range(int(math.log2(capacity // MIN_BUCKET)) + 1)]


# -- generation settings ------------------------------------------------------------------------------

# Generation-config fields the step cannot apply, with the value at which they do nothing.
_UNSUPPORTED = {
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0,
    "min_length": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "top_h": None,
    "num_beams": 1,
    "num_return_sequences": 1,
    "penalty_alpha": None,
    "guidance_scale": None,
    "exponential_decay_length_penalty": None,
}


@dataclass(frozen=True)
class GenerationSettings:
    """How a row's next token is picked, read from a checkpoint's generation config as generate()
    reads it (`resolve`). One of these per row: rows of one pool may differ."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    stop_strings: tuple[str, ...] = ()

    @classmethod
    def resolve(cls, generation_config, **overrides) -> GenerationSettings:
        """The settings generate() would use with this generation config, `overrides` (non-None) on top;
        refuses, naming them, what the static step cannot do (use decode='generate' for those)."""
        from transformers import GenerationConfig

        defaults = GenerationConfig._get_default_generation_params()

        def value(name):
            found = getattr(generation_config, name, None)
            return defaults.get(name) if found is None else found

        unsupported = [
            f"{name}={value(name)!r}"
            for name, inert in _UNSUPPORTED.items()
            if value(name) not in (inert, None, [], ())
            and not (name == "min_p" and value(name) == 0)
            and not (name == "typical_p" and value(name) >= 1)
        ]
        if unsupported:
            raise ValueError(
                "the static decode path cannot apply this checkpoint's generation settings "
                f"{', '.join(unsupported)}; use decode='generate' (--decode generate)"
            )
        settings = cls(
            do_sample=bool(value("do_sample")),
            temperature=float(value("temperature")),
            top_k=int(value("top_k") or 0),
            top_p=float(value("top_p")),
            repetition_penalty=float(value("repetition_penalty")),
            min_new_tokens=int(value("min_new_tokens") or 0),
            stop_strings=_strings(value("stop_strings")),
        )
        return settings.override(**overrides)

    def override(self, **overrides) -> GenerationSettings:
        """These settings with the non-None `overrides` (a job's or a request's options) put in."""
        given = {k: _strings(v) if k == "stop_strings" else v for k, v in overrides.items() if v is not None}
        settings = replace(self, **given)
        settings.check()
        return settings

    def check(self) -> None:
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.min_new_tokens < 0:
            raise ValueError("top_k and min_new_tokens must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def samples(self) -> bool:
        """Whether the pick is random: sampling whose top-k cut leaves more than one token (Qwen-VL's
        Instruct checkpoints ship do_sample with top_k 1: that is greedy, and runs as greedy)."""
        return self.do_sample and self.top_k != 1


GREEDY = GenerationSettings()


def _strings(value) -> tuple[str, ...]:
    """Stop strings as a generation config or an option gives them (one string, a list, None) as a tuple."""
    return (value,) if isinstance(value, str) else tuple(value or ())


@dataclass(frozen=True)
class Features:
    """Which parts of the pick a pool's step computes (a step without them is plain argmax)."""

    penalty: bool = False  # repetition penalty (a [slots, vocab] record of the tokens each row has seen)
    sampling: bool = False  # temperature / top-k / top-p sampling
    min_new: bool = False  # eos suppressed below min_new_tokens

    @classmethod
    def of(cls, settings: list[GenerationSettings]) -> Features:
        return cls(
            penalty=any(s.repetition_penalty != 1.0 for s in settings),
            sampling=any(s.samples for s in settings),
            min_new=any(s.min_new_tokens > 0 for s in settings),
        )

    @property
    def plain(self) -> bool:
        """Argmax of the logits as they are: no per-row pick settings to read."""
        return not (self.penalty or self.sampling or self.min_new)

    def __or__(self, other: Features) -> Features:
        return Features(*(a or b for a, b in zip(astuple(self), astuple(other))))


# -- the pick ---------------------------------------------------------------------------------------------

_MASK31 = 0x7FFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash (the xor-shift-multiply finaliser); products stay below 2^58 in int64."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK31
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK31
    return (x >> 16) ^ x


def gumbel_noise(seed: torch.Tensor, index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise for each row's `tokens` ([R, V] vocabulary ids) at its token `index` [R]:
    a pure function of (seed, index, token id), so a row's draw does not depend on its neighbours."""
    row = _mix((_mix(seed & _MASK31) + index) & _MASK31)
    bits = _mix((row[:, None] + tokens) & _MASK31)
    uniform = (bits.double() + 0.5) / 2**31  # in (0, 1)
    return -torch.log(-torch.log(uniform))


@dataclass
class RowChoice:
    """Each row's pick settings as tensors [R] (a slice or a gather of the pool's per-slot buffers)."""

    penalty: torch.Tensor  # float
    min_new: torch.Tensor  # long
    sample: torch.Tensor  # bool
    temperature: torch.Tensor  # float
    top_k: torch.Tensor  # long, 0: off
    top_p: torch.Tensor  # float
    seed: torch.Tensor  # long


def choose_tokens(
    logits: torch.Tensor,
    rows: RowChoice,
    count: torch.Tensor,
    eos_mask: torch.Tensor,
    seen: torch.Tensor | None,
    features: Features,
) -> torch.Tensor:
    """The next token of each row from its logits [R, V], as generate()'s processors and warpers
    would pick it: repetition penalty over `seen` [R, V], eos suppressed while `count` (tokens generated
    so far) < min_new, then argmax, or for sampling rows temperature, top-k, top-p and a Gumbel-max
    draw keyed by (seed, count). Branch-free: every row runs the same ops (compiled once)."""
    if features.plain:
        return logits.argmax(-1)
    logits = logits.float()
    if features.penalty:
        penalty = rows.penalty[:, None]
        logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    if features.min_new:
        logits = logits.masked_fill(eos_mask[None, :] & (count < rows.min_new)[:, None], float("-inf"))
    greedy = logits.argmax(-1)
    if not features.sampling:
        return greedy
    vocab = logits.shape[-1]
    ranked, order = (logits / rows.temperature[:, None]).sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    top_k = torch.where(rows.top_k > 0, rows.top_k.clamp(max=vocab), vocab)
    kept = rank < top_k[:, None]
    ranked = ranked.masked_fill(~kept, float("-inf"))
    # top-p as generate() cuts it: a token goes when the mass of the tokens above it reaches top_p
    # (the first always stays)
    probs = ranked.softmax(-1)
    above = probs.cumsum(-1) - probs
    kept &= (above < rows.top_p[:, None]) | (rank == 0)
    noisy = torch.where(kept, ranked + gumbel_noise(rows.seed, count, order), float("-inf"))
    sampled = order.gather(1, noisy.argmax(-1, keepdim=True))[:, 0]
    return torch.where(rows.sample, sampled, greedy)


# -- prefill ----------------------------------------------------------------------------------------------


def _single_query_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """softmax(q k^T * scaling) v for one query position per slot, as two batched matrix products.

    query [slots, kv_heads, groups, head_dim] (grouped-query heads side by side over their shared kv
    head), keys / values [slots, kv_heads, read, head_dim], mask [slots, 1, 1, read] (True: visible).
    The same sum SDPA computes; an op of its own because on the CPU both of the alternatives cost more
    than the rest of the layer: SDPA's kernel has a large fixed cost per call at one query, and
    inductor turns one-row matrix products into reductions that recompute their inputs' softmax once
    per output column (docs/BENCHMARKS.md, "Decode")."""
    scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, values)


single_query_attention = torch.library.custom_op("tokencarve::single_query_attention", mutates_args=())(
    _single_query_attention
)


@single_query_attention.register_fake
def _(query, keys, values, mask, scaling):
    return torch.empty_like(query)


@dataclass
class Prefill:
    """What a prefill hands the decode loop for its B rows."""

    cache: object  # the model's DynamicCache after prefill (carved or not): [B, kv_heads, L, head_dim] per layer
    prefill_mask: torch.Tensor  # [B, L] which cache entries are real (left padding is not)
    positions: torch.Tensor  # [B] RoPE position of each row's next token: its uncompressed prompt length
    last_logits: torch.Tensor  # [B, V] the logits of each row's first generated token
    prompt_ids: torch.Tensor  # [B, T] the rows' input ids, padding replaced by -1 (the repetition penalty's)

    @property
    def rows(self) -> int:
        return self.prefill_mask.shape[0]


def prefill(model, inputs: dict) -> Prefill:
    """The first forward of a left-padded batch, as generate() runs it: positions as generate() makes
    them (the 2-D mask's cumsum, pads at 0; mRoPE: the model's 3-D rows too), a fresh cache, logits of
    the last position only. TokenCarve, where applied, carves here; its note on the cache says which
    entries of the (shorter) cache are real."""
    mask = inputs["attention_mask"]
    # the next position continues from the uncompressed prompt (mRoPE: from max(position) + 1)
    positions, next_positions = prefill_positions(model, inputs)
    out = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or out.past_key_values
    note = getattr(cache, "_tokencarve", None)
    return Prefill(
        cache,
        note.prefill_mask if note is not None else mask,
        next_positions,
        out.logits[:, -1],
        inputs["input_ids"].masked_fill(mask == 0, -1),
    )


def eos_ids(generation_config) -> list[int]:
    eos = generation_config.eos_token_id
    return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


# What the step knows how to run: Llama / Mistral / Qwen2 layers (+ Qwen3's query / key norms).
_LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "rotary_fn"}


def check_layers(layers) -> None:
    """Refuse decoder layers with parts the static step would not run (extra norms, other attention)."""
    for layer in layers[:1]:
        extra = {name for name, _ in layer.named_children()} - _LAYER_PARTS
        extra |= {name for name, _ in layer.self_attn.named_children()} - _ATTENTION_PARTS
        config = layer.self_attn.config
        if extra or getattr(config, "attn_logit_softcapping", None) or not hasattr(layer.self_attn, "scaling"):
            raise ValueError(
                f"the static decode step runs Llama-style layers; {type(layer).__name__} has "
                f"{sorted(extra) or 'other attention settings'}; use decode='generate' (--decode generate)"
            )


# -- the pool ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What sizes a pool, read from the language model's config (no weights needed)."""

    num_layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int  # max_position_embeddings
    dtype_bytes: int

    @classmethod
    def of(cls, text_config, dtype: torch.dtype) -> ModelShape:
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        return cls(
            text_config.num_hidden_layers,
            text_config.num_key_value_heads,
            head_dim,
            text_config.vocab_size,
            text_config.max_position_embeddings,
            torch.empty(0, dtype=dtype).element_size(),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of every layer for one cache entry."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def slot_bytes(self, capacity: int, features: Features) -> int:
        """A slot's share of a pool: its KV entries, the visibility mask, the token book, the seen record
        and its books and pick settings (under SLOT_BOOK_BYTES)."""
        entries = capacity * (self.kv_bytes_per_token + 1) + (capacity + 1) * 8
        return entries + (self.vocab if features.penalty else 1) + SLOT_BOOK_BYTES

    def pool_bytes(self, where: Layout, features: Features) -> int:
        """What a pool laid out as `where` holds at most (its slots and the eos mask over the vocabulary)."""
        return where.slots * self.slot_bytes(where.capacity, features) + self.vocab


@dataclass(frozen=True)
class Layout:
    slots: int
    capacity: int


def layout(shape: ModelShape, slots: int, budget: int, features: Features, needed: int = 0) -> Layout:
    """The pool a budget of `budget` bytes holds: `slots` rows (halved while a row of `needed` entries,
    or of MIN_BUCKET, does not fit) of the largest power-of-two capacity that fits, no larger than the
    context window's bucket."""
    ceiling = bucket(shape.context)
    while True:
        capacity = MIN_BUCKET
        while capacity < ceiling and shape.pool_bytes(Layout(slots, capacity * 2), features) <= budget:
            capacity *= 2
        fits = shape.pool_bytes(Layout(slots, capacity), features) <= budget
        if fits and capacity >= needed:
            return Layout(slots, capacity)
        if slots == 1:
            raise ValueError(
                f"a row needs {max(needed, MIN_BUCKET)} cache entries "
                f"({shape.pool_bytes(Layout(1, bucket(needed)), features):,} bytes in a pool of one slot); "
                f"the KV-cache budget is {budget:,} bytes: raise kv_cache_memory (--kv-cache-memory)"
            )
        slots = max(1, slots // 2)


def layouts(shape: ModelShape, slots: int, budget: int, features: Features) -> list[Layout]:
    """Every layout a decoder may take: its first, then each halving of its slots for longer rows."""
    first = layout(shape, slots, budget, features)
    found = [first]
    while found[-1].slots > 1 and found[-1].capacity < bucket(shape.context):
        found.append(layout(shape, found[-1].slots // 2, budget, features))
    return found


def shape_count(shape: ModelShape, slots: int, budget: int, features: Features) -> int:
    """How many step shapes a compiled decoder may compile: each layout's read buckets."""
    return sum(len(buckets_up_to(each.capacity)) for each in layouts(shape, slots, budget, features))


class SlotCache:
    """Fixed-shape keys and values for `slots` rows; the step writes one entry per slot per layer."""

    def __init__(self, shape: ModelShape, slots: int, capacity: int, dtype, device):
        size = (slots, shape.kv_heads, capacity, shape.head_dim)
        self.keys = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        self.values = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # next write index per slot
        self.valid = torch.zeros(slots, capacity, dtype=torch.bool, device=device)
        self.slot_index = torch.arange(slots, device=device)
        self.capacity = capacity

    def buffers(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values, self.lengths, self.valid, self.slot_index]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer: int, rows: int, read: int):
        """Write one new position for each of the first `rows` slots ([rows, kv_heads, 1, head_dim]) at
        the slot's own length; return their first `read` entries."""
        # index_put_ (not scatter_): compiled, it stays an in-place store of one entry per slot,
        # where a functionalised scatter copies the whole buffer every step
        where = (self.slot_index[:rows], slice(None), self.lengths[:rows])
        self.keys[layer][where] = key[:, :, 0]
        self.values[layer][where] = value[:, :, 0]
        return self.keys[layer][:rows, :, :read], self.values[layer][:rows, :, :read]

    def load(self, slots: torch.Tensor, cache, prefill_mask: torch.Tensor, rows: torch.Tensor) -> None:
        """Copy `rows` of a prefill's cache (a DynamicCache, [B, kv_heads, L, head_dim] per layer, laid out
        as `prefill_mask` [B, L] says) into `slots`; the rest of those slots' entries become invisible."""
        length = prefill_mask.shape[1]
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            keys[slots, :, :length] = cache.layers[layer].keys[rows]
            values[slots, :, :length] = cache.layers[layer].values[rows]
        self.valid[slots] = False
        self.valid[slots, :length] = prefill_mask[rows].bool()
        self.lengths[slots] = length


_PICK_FIELDS = ("penalty", "min_new", "sample", "temperature", "top_k", "top_p", "seed")


class DecodePool:
    """Decoding of up to `slots` rows at once, from fixed-shape buffers; see the module doc.

    Rows enter with `admit` (after their prefill) and leave when `finished` says; `step(rows, read)`
    advances the first `rows` slots by one token, reading `read` cache entries, and is what gets compiled."""

    def __init__(self, model, language_model, shape: ModelShape, where: Layout, eos: list[int], features: Features):
        config = language_model.config
        self.layers = list(language_model.layers)
        check_layers(self.layers)
        self.norm = language_model.norm
        self.embed, self.lm_head = model.get_input_embeddings(), model.get_output_embeddings()
        param = next(language_model.parameters())
        device, dtype = param.device, param.dtype
        slots, capacity = where.slots, where.capacity
        self.shape, self.features = shape, features
        self.cache = SlotCache(shape, slots, capacity, dtype, device)
        self.slots, self.capacity = slots, capacity
        # cos / sin for every position the context window allows, from the model's rotary module
        every_position = torch.arange(config.max_position_embeddings, device=device).unsqueeze(0)
        cos, sin = language_model.rotary_emb(torch.empty(1, dtype=dtype, device=device), every_position)
        self.cos, self.sin = cos[0], sin[0]  # [positions, head_dim]
        self.eos_mask = torch.zeros(shape.vocab, dtype=torch.bool, device=device)
        self.eos_mask[[e for e in eos if e < shape.vocab]] = True
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)  # RoPE position of the next token
        self.last_token = torch.zeros(slots, dtype=torch.long, device=device)
        self.count = torch.zeros(slots, dtype=torch.long, device=device)  # tokens generated so far
        self.limit = torch.ones(slots, dtype=torch.long, device=device)  # each row's max_new_tokens
        self.done = torch.ones(slots, dtype=torch.bool, device=device)  # empty slots count as done
        # a row generates fewer tokens than the cache holds; the last column is a sink where rows
        # already done write their (ignored) tokens, so the step needs no branch
        self.tokens = torch.zeros(slots, capacity + 1, dtype=torch.long, device=device)
        # each slot's pick settings (GenerationSettings as tensors) and the tokens its row has seen
        self.pick = RowChoice(
            penalty=torch.ones(slots, device=device),
            min_new=torch.zeros(slots, dtype=torch.long, device=device),
            sample=torch.zeros(slots, dtype=torch.bool, device=device),
            temperature=torch.ones(slots, device=device),
            top_k=torch.zeros(slots, dtype=torch.long, device=device),
            top_p=torch.ones(slots, device=device),
            seed=torch.zeros(slots, dtype=torch.long, device=device),
        )
        self.seen = torch.zeros(slots, shape.vocab if features.penalty else 1, dtype=torch.bool, device=device)
        self.slot_index = self.cache.slot_index
        self.rotate = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb

    @property
    def bytes(self) -> int:
        """What the pool's buffers hold (the KV-cache budget counts these)."""
        return sum(t.numel() * t.element_size() for t in self.buffers() if t is not self.cos and t is not self.sin)

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor the step reads or writes in place (fixed addresses for CUDA graphs)."""
        state = [self.positions, self.last_token, self.count, self.limit, self.done, self.tokens, self.seen]
        picks = [getattr(self.pick, name) for name in _PICK_FIELDS]
        return [*self.cache.buffers(), *state, *picks, self.eos_mask, self.cos, self.sin]

    def step(self, rows: int, read: int) -> None:
        """One token for each live row among the first `rows` slots, attending to `read` entries."""
        span = slice(0, rows)
        live = ~self.done[span]
        lengths = self.cache.lengths[span]
        index = self.slot_index[span]
        hidden = self.embed(self.last_token[span]).unsqueeze(1)  # [rows, 1, D]
        # rows of the model's own rotary tables: no cos / sin in the step (compiled, they would be
        # recomputed inside every kernel that reads the rotated query)
        positions = self.positions[span]
        position_embeddings = (self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))
        # the new token sees its prefill's visible entries, every token generated since, and itself
        self.cache.valid[index, lengths] = True
        mask = self.cache.valid[span, :read][:, None, None, :]  # [rows, 1, 1, read], over kv heads and groups
        for layer_index, layer in enumerate(self.layers):
            hidden = self._layer(layer, layer_index, hidden, position_embeddings, mask, rows, read)
        logits = self.lm_head(self.norm(hidden[:, -1]))
        pick = (
            None
            if self.features.plain
            else RowChoice(**{name: getattr(self.pick, name)[span] for name in _PICK_FIELDS})
        )
        count = self.count[span]
        seen = self.seen[span] if self.features.penalty else None
        chosen = choose_tokens(logits, pick, count, self.eos_mask, seen, self.features)
        if self.features.penalty:
            self.seen[index, chosen] = True
        column = torch.where(live, count, self.capacity)
        self.tokens[index, column] = chosen
        grown = live.long()
        count.add_(grown)
        lengths.add_(grown)
        positions.add_(grown)
        self.last_token[span] = torch.where(live, chosen, self.last_token[span])
        self.done[span] |= live & (self.eos_mask[chosen] | (count >= self.limit[span]))

    def _layer(self, layer, index: int, hidden, position_embeddings, mask, rows: int, read: int):
        """One Llama-style decoder layer on one token per slot: the layer's own modules, in its order."""
        attended = self._attend(
            layer.self_attn, index, layer.input_layernorm(hidden), position_embeddings, mask, rows, read
        )
        hidden = hidden + attended
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _attend(self, attention, index: int, hidden, position_embeddings, mask, rows: int, read: int):
        """Self-attention of one new token per slot over its cache: q/k/v projections (and the family's
        query / key norms), the family's rotary embedding, then softmax(q k^T) v as two batched matrix
        products. That is the same sum SDPA computes, without its CPU kernel's per-call cost, which
        dominates at one query (docs/BENCHMARKS.md); grouped-query heads attend to their shared kv head."""
        head_dim = attention.head_dim
        query = attention.q_proj(hidden).view(rows, 1, -1, head_dim)
        key = attention.k_proj(hidden).view(rows, 1, -1, head_dim)
        value = attention.v_proj(hidden).view(rows, 1, -1, head_dim).transpose(1, 2)
        if hasattr(attention, "q_norm"):  # Qwen3: RMS norms over the head dimension, before RoPE
            query, key = attention.q_norm(query), attention.k_norm(key)
        cos, sin = position_embeddings
        query, key = self.rotate(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
        keys, values = self.cache.update(key, value, index, rows, read)  # [rows, kv_heads, read, head_dim]
        query = query.reshape(rows, keys.shape[1], -1, head_dim)  # query head h reads kv head h // groups
        # compiled: the registered op (inductor keeps it whole); eager: its body, without the op's dispatch
        attend = single_query_attention if torch.compiler.is_compiling() else _single_query_attention
        out = attend(query, keys, values, mask, attention.scaling)
        return attention.o_proj(out.reshape(rows, 1, -1))

    def admit(
        self,
        slots: list[int],
        filled: Prefill,
        rows: list[int],
        max_new_tokens: list[int],
        settings: list[GenerationSettings],
        seeds: list[int],
    ) -> None:
        """Put `rows` of a prefill into `slots`: their cache, the RoPE position of their next token,
        their pick settings, their first token (chosen here from the prefill's logits, as every later
        one is) and how many tokens each may generate."""
        if filled.prefill_mask.shape[1] + max(max_new_tokens) > self.capacity:
            raise ValueError("these rows do not fit the pool's capacity")
        device = self.slot_index.device
        index = torch.tensor(slots, device=device)
        taken = torch.tensor(rows, device=filled.prefill_mask.device)
        self.cache.load(index, filled.cache, filled.prefill_mask, taken)
        self.positions[index] = filled.positions[taken].to(device)
        values = {
            "penalty": [s.repetition_penalty for s in settings],
            "min_new": [s.min_new_tokens for s in settings],
            "sample": [s.samples for s in settings],
            "temperature": [s.temperature for s in settings],
            "top_k": [s.top_k for s in settings],
            "top_p": [s.top_p for s in settings],
            "seed": [seed & _MASK31 for seed in seeds],
        }
        for name, value in values.items():
            buffer = getattr(self.pick, name)
            buffer[index] = torch.tensor(value, dtype=buffer.dtype, device=device)
        seen = None
        if self.features.penalty:  # the prompt's ids, padding left out, as generate()'s processor takes them
            prompt = filled.prompt_ids[taken].to(device)
            marks = torch.zeros(len(rows), self.shape.vocab + 1, dtype=torch.bool, device=device)
            marks.scatter_(1, prompt.masked_fill(prompt < 0, self.shape.vocab), True)
            seen = marks[:, : self.shape.vocab]
        pick = RowChoice(**{name: getattr(self.pick, name)[index] for name in _PICK_FIELDS})
        zero = torch.zeros(len(rows), dtype=torch.long, device=device)
        first = choose_tokens(filled.last_logits[taken].to(device), pick, zero, self.eos_mask, seen, self.features)
        if seen is not None:
            seen[torch.arange(len(rows), device=device), first] = True
            self.seen[index] = seen
        self.last_token[index] = first
        self.tokens[index] = 0
        self.tokens[index, 0] = first
        self.count[index] = 1
        limit = torch.tensor(max_new_tokens, device=device)
        self.limit[index] = limit
        self.done[index] = self.eos_mask[first] | (limit <= 1)

    def finished(self) -> list[bool]:
        """Which slots' rows are done (one host synchronisation)."""
        return self.done.tolist()

    def outputs(self, slots: list[int]) -> list[list[int]]:
        """The tokens generated so far in each of `slots`, in one transfer (not one per slot)."""
        if not slots:
            return []
        index = torch.tensor(slots, device=self.slot_index.device)
        counts = self.count[index].tolist()
        rows = self.tokens[index, : max(counts)].tolist()
        return [row[:count] for row, count in zip(rows, counts)]

    def stop(self, slot: int, tokens: int) -> None:
        """End a slot's row (a stop string ended it after `tokens` tokens): it frees the slot."""
        self.count[slot] = tokens
        self.done[slot] = True


# -- the host loop ----------------------------------------------------------------------------------------


@dataclass
class Decoded:
    """One row's result: its generated tokens (eos included) and when it finished."""

    tokens: list[int]
    finished_at: float  # time.perf_counter() when the host saw it done


@dataclass
class DecodeStats:
    """What a decoder did since it was made (what the metrics export)."""

    warmup_seconds: float = 0.0  # compiling (and first-running) every shape at start
    shapes_compiled: int = 0  # (layout, read bucket) shapes compiled
    eager_fallbacks: int = 0  # shapes whose compile failed (or hit a limit) and so run eagerly
    relayouts: int = 0  # times the pool drained and was laid out again for a longer row
    pool_bytes: int = 0  # what the current pool holds
    budget_bytes: int = 0  # the KV-cache budget it is laid out within
    peak_pool_bytes: int = 0
    steps: int = 0  # decode steps run by the last `run` (a figure for benchmarks)
    seconds: float = 0.0  # time the last `run` spent decoding: steps and the looks at `done`


# Exceptions of the compiler, raised before a compiled step runs: the step then runs eagerly.
_COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit)


@dataclass
class _Waiting:
    """A prefilled chunk, some of whose rows are not in a slot yet."""

    filled: Prefill
    rows: list[int]  # the caller's row numbers, one per prefill row
    left: list[int] = field(default_factory=list)  # prefill rows still to admit


class _SlotBooks:
    """The host's view of the pool's slots, kept without a synchronisation: which row each decodes, and a
    bound on how long its cache is (its prefill length plus the steps it has been stepped)."""

    def __init__(self, slots: int):
        self.slots = slots
        self.holder = [-1] * slots  # the row each slot decodes, -1: free
        self.length = [0] * slots  # a bound on the slot's next write index
        self.end = [0] * slots  # the most entries its row can need: prefill length + max_new_tokens

    def free(self) -> list[int]:
        return [slot for slot, row in enumerate(self.holder) if row < 0]

    def admit(self, slot: int, row: int, length: int, limit: int) -> None:
        self.holder[slot], self.length[slot], self.end[slot] = row, length, length + limit

    def free_slot(self, slot: int) -> None:
        self.holder[slot] = -1

    def last_occupied(self) -> int:
        return max(slot for slot, row in enumerate(self.holder) if row >= 0)

    def reach(self, steps: int) -> int:
        """The most entries any live row's step reads within the next `steps` steps."""
        return max(min(self.length[s] + steps, self.end[s]) for s, row in enumerate(self.holder) if row >= 0)

    def stepped(self, steps: int) -> None:
        self.length = [length + steps for length in self.length]


class StaticDecoder:
    """Decodes rows through one DecodePool, refilling its free slots from `prefill` as rows finish.

    The pool is allocated once (`layout`: `slots` rows within `kv_cache_bytes`) and kept between calls;
    its buffers keep their addresses and its compiled shapes are reused."""

    # Free slots are refilled in chunks of at least MIN_REFILL_ROWS rows (at most half the pool; slots/8
    # in large pools): a prefill call has a fixed cost (the vision tower's call, the carve's per-batch
    # work, Python), so one-row refills of a small pool cost more than the steps they save
    # (docs/BENCHMARKS.md, "Decode")
    MIN_REFILL_ROWS = 4
    # Steps between two looks at `done`, the only host synchronisations: on a GPU a look waits for the
    # queued steps, so it comes every few; on a CPU steps are synchronous anyway and a look is free,
    # so it comes after every step (no step is spent on rows already done)
    SYNC_EVERY = {"cuda": 8}

    def __init__(
        self,
        model,
        language_model,
        eos: list[int],
        *,
        slots: int,
        kv_cache_bytes: int,
        compile: bool,
        features: Features = Features(),
    ):
        self.model, self.language_model, self.eos, self.compile = model, language_model, eos, compile
        self.features = features
        param = next(language_model.parameters())
        self.device = param.device
        self.shape = ModelShape.of(language_model.config, param.dtype)
        self.budget, self.first = kv_cache_bytes, layout(self.shape, slots, kv_cache_bytes, features)
        self.stats = DecodeStats(budget_bytes=kv_cache_bytes)
        self.pool: DecodePool | None = None
        self._compiled: dict[tuple, bool | None] = {}  # (slots, capacity, read) -> True: compiled; None: eager
        if compile:
            allowance = shape_count(self.shape, slots, kv_cache_bytes, features)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, allowance)
            self._step = torch.compile(self._run_step, fullgraph=True, dynamic=False, mode=self._mode)

    @property
    def _mode(self) -> str | None:
        """CUDA graphs on a GPU ("reduce-overhead"), inductor on the CPU."""
        return "reduce-overhead" if self.device.type == "cuda" else None

    @property
    def slots(self) -> int:
        """The slots of the first layout (the pool's, but while a long row's layout is in place)."""
        return self.first.slots

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Allocate the pool and, compiled, compile every read bucket of its first layout by running each
        on the empty pool (every slot done: nothing changes but the sink). Returns the seconds it took."""
        started = time.perf_counter()
        self._lay_out(self.first)
        if self.compile:
            for read in buckets_up_to(self.pool.capacity):
                self._advance(self.pool.slots, read)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        self.stats.warmup_seconds = time.perf_counter() - started
        log.info("static decode: %s in %.1f s", self.describe(), self.stats.warmup_seconds)
        return self.stats.warmup_seconds

    def describe(self) -> str:
        pool = self.pool or self.first
        return (
            f"{pool.slots} slots x {pool.capacity} entries ({self.stats.pool_bytes:,} of {self.budget:,} bytes), "
            f"{self.stats.shapes_compiled} shapes compiled, {self.stats.eager_fallbacks} eager"
        )

    def run(
        self,
        num_rows: int,
        max_new_tokens: int | list[int],
        prefill: Callable[[list[int]], Prefill],
        settings: GenerationSettings | list[GenerationSettings] = GREEDY,
        seeds: list[int] | None = None,
        stop: Callable[[int, list[int]], int | None] | None = None,
    ) -> list[Decoded]:
        """Decode rows 0..num_rows-1 in order of admission; `prefill(rows)` prefills a chunk of them.
        `max_new_tokens` and `settings`: one for every row, or each row's own; `seeds`: each row's
        sampling seed (default 0); `stop(row, tokens)`: where a stop string ends the row's tokens, or None.

        A slot frees when its row is done; free slots are refilled once at least `refill_at` of them
        are free (a few rows per prefill, not one: `MIN_REFILL_ROWS`), or when no row is left decoding."""
        caps = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * num_rows
        picks = settings if isinstance(settings, list) else [settings] * num_rows
        seeds = seeds if seeds is not None else [0] * num_rows
        needs = Features.of(picks)
        if (needs | self.features) != self.features:
            raise ValueError(f"this decoder was built for {self.features}; these rows need {needs}")
        self._lay_out(self.first)  # a no-op unless a long row's layout is still in place
        results: list[Decoded | None] = [None] * num_rows
        books = _SlotBooks(self.pool.slots)
        pending = 0  # rows below this index have been prefilled
        waiting: _Waiting | None = None
        self.stats.steps, self.stats.seconds = 0, 0.0
        while True:
            for row, tokens in self._collect(books, stop):
                results[row] = Decoded(tokens, time.perf_counter())
            free = books.free()
            busy = len(free) < books.slots
            refill_at = max(1, min(self.MIN_REFILL_ROWS, books.slots // 2), books.slots // 8)
            if waiting is None and pending < num_rows and (len(free) >= min(refill_at, num_rows - pending) or not busy):
                chunk = list(range(pending, min(num_rows, pending + len(free))))
                pending += len(chunk)
                waiting = _Waiting(prefill(chunk), chunk, list(range(len(chunk))))
            if waiting is not None:
                length = waiting.filled.prefill_mask.shape[1]
                needed = length + max(caps[waiting.rows[i]] for i in waiting.left)
                if needed > self.pool.capacity and not busy:  # drained: lay the pool out for the long rows
                    self._lay_out(layout(self.shape, self.pool.slots, self.budget, self.features, needed))
                    self.stats.relayouts += 1
                    books, free = _SlotBooks(self.pool.slots), list(range(self.pool.slots))
                if needed <= self.pool.capacity and free:
                    taken, waiting.left = waiting.left[: len(free)], waiting.left[len(free) :]
                    rows = [waiting.rows[i] for i in taken]
                    slots = free[: len(taken)]
                    limits = [caps[r] for r in rows]
                    self.pool.admit(
                        slots, waiting.filled, taken, limits, [picks[r] for r in rows], [seeds[r] for r in rows]
                    )
                    for slot, row, limit in zip(slots, rows, limits):
                        books.admit(slot, row, length, limit)
                    waiting = waiting if waiting.left else None
                    continue  # rows whose first token ended them are collected before any step
            if not busy:
                if waiting is None and pending >= num_rows:
                    return results
                continue
            self._steps(books)

    def _collect(self, books: _SlotBooks, stop) -> list[tuple[int, list[int]]]:
        """Look at `done` (the host synchronisation), end rows at a stop string, free finished slots;
        returns (row, tokens) of each row that finished."""
        looked = time.perf_counter()
        done = self.pool.finished()
        self.stats.seconds += time.perf_counter() - looked
        live = [slot for slot, row in enumerate(books.holder) if row >= 0]
        # the rows to read: those done, and with stop strings every live one (one transfer for all)
        read = [slot for slot in live if done[slot] or stop is not None]
        finished = []
        for slot, tokens in zip(read, self.pool.outputs(read)):
            row = books.holder[slot]
            # a stop string can end a row that eos or its limit ended later within the same look
            cut = stop(row, tokens) if stop is not None else None
            if cut is not None:
                tokens = tokens[:cut]
                if not done[slot]:
                    self.pool.stop(slot, cut)
            if done[slot] or cut is not None:
                finished.append((row, tokens))
                books.free_slot(slot)
        return finished

    def _steps(self, books: _SlotBooks) -> None:
        """The steps until the next look at `done`, each of one shape: every slot compiled, the occupied
        prefix's bucket eagerly; reading the bucket of the longest entry any live row can reach by then."""
        steps = self.SYNC_EVERY.get(self.device.type, 1)
        read = bucket(books.reach(steps))
        rows = self.pool.slots if self.compile else min(self.pool.slots, 1 << books.last_occupied().bit_length())
        stepping = time.perf_counter()
        for _ in range(steps):
            self._advance(rows, read)
        books.stepped(steps)
        self.stats.steps += steps
        self.stats.seconds += time.perf_counter() - stepping  # asynchronous on a GPU: the next look waits

    def _advance(self, rows: int, read: int) -> None:
        """One step: compiled where the shape compiled, eagerly where it did not (with a warning, once)."""
        key = (self.pool.slots, self.pool.capacity, read)
        if not self.compile or self._compiled.get(key, True) is None:
            self.pool.step(rows, read)
            return
        first = key not in self._compiled
        try:
            self._step(self.pool, rows, read)
        except _COMPILE_ERRORS as error:
            self._compiled[key] = None
            self.stats.eager_fallbacks += 1
            message = f"the static decode step for {key} did not compile ({type(error).__name__}); it runs eagerly"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            log.warning("%s: %s", message, error)
            self.pool.step(rows, read)
            return
        if first:
            self._compiled[key] = True
            self.stats.shapes_compiled += 1

    @staticmethod
    def _run_step(pool: DecodePool, rows: int, read: int) -> None:
        pool.step(rows, read)

    def _lay_out(self, where: Layout) -> None:
        """Release the current pool, then allocate one laid out as `where` (never two at once)."""
        if self.pool is not None and (self.pool.slots, self.pool.capacity) == (where.slots, where.capacity):
            return
        self.pool = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.pool = DecodePool(self.model, self.language_model, self.shape, where, self.eos, self.features)
        if self.compile:
            for tensor in self.pool.buffers():
                torch._dynamo.mark_static_address(tensor)
        self.stats.pool_bytes = self.pool.bytes
        self.stats.peak_pool_bytes = max(self.stats.peak_pool_bytes, self.stats.pool_bytes)
