"""The static decode path: a fixed-shape, compiled greedy decode over a pool of slots, refilled as rows finish.

Prefill stays what it always was (the model's own forward: vision tower, projector, the carve at
layer K, any family). After it, every layer of a carved cache holds the same number of entries (the
layers before the cut are gathered to the kept positions), so its keys and values can move into a
preallocated cache of fixed shape, one row per slot:

    SlotCache   keys / values [slots, kv_heads, capacity, head_dim] per layer, `valid` [slots, capacity]
                (which entries a slot's query may see: its prefill mask, then each generated token),
                `lengths` [slots] (where the next entry is written). HF's attention modules write into
                it through `update()`, as they write into their own caches, so every family's attention
                (biases, grouped-query heads, query/key norms) is the model's own code.
    DecodePool  the step: embed each slot's last token, run the decoder layers on one position at each
                slot's own RoPE position, write keys / values at each slot's own length, pick the next
                token by argmax, and keep the books (tokens out, counts, done) on the device. Every
                tensor has a fixed shape, so the step compiles once per pool (inductor on the CPU, CUDA
                graphs on a GPU) and runs without a host synchronisation; the host looks at `done`
                every `sync_every` steps, takes finished rows out and admits new ones (refill).

The carve hooks stay out of the step: it calls each layer's `forward` directly (hooks run only
through `module(...)`), and prefill, where the carve happens, is an ordinary eager forward.

Exactness: the step is greedy decoding as `generate(do_sample=False)` does it: positions continue
from each row's uncompressed prompt length (generate's cumsum of the 2-D mask; for mRoPE models from
max(position) + 1, the prompt length plus the row's rope_delta: a decoded token's three rows are
equal, so a 1-D table of the model's own rotary module serves them), the mask is the
prefill's mask plus every generated token, eos ends a row, `max_new_tokens` caps it.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .families import prefill_positions

# Generation settings under which generate()'s greedy pick is not a plain argmax of the logits.
_GREEDY_CHANGING = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_new_tokens": None,
    "min_length": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
}


def check_greedy(generation_config) -> None:
    """Refuse checkpoints whose generation config changes the greedy pick: the static step is argmax."""
    changed = [
        f"{name}={getattr(generation_config, name)!r}"
        for name, plain in _GREEDY_CHANGING.items()
        if getattr(generation_config, name, plain) not in (plain, None, 0, 1.0, [])
    ]
    if changed:
        raise ValueError(
            "the static decode path runs plain greedy decoding, but this checkpoint's generation config "
            f"sets {', '.join(changed)}; use decode='generate' (--decode generate)"
        )


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


def eos_ids(generation_config) -> list[int]:
    eos = generation_config.eos_token_id
    return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


@torch.library.custom_op("tokencarve::single_query_attention", mutates_args=())
def single_query_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """softmax(q k^T * scaling) v for one query position per slot, as two batched matrix products.

    query [slots, kv_heads, groups, head_dim] (grouped-query heads side by side over their shared kv
    head), keys / values [slots, kv_heads, capacity, head_dim], mask [slots, 1, 1, capacity] (True:
    visible). The same sum SDPA computes; an op of its own because on the CPU both of the alternatives
    cost more than the rest of the layer: SDPA's kernel has a large fixed cost per call at one query,
    and inductor turns one-row matrix products into reductions that recompute their inputs' softmax
    once per output column (docs/BENCHMARKS.md, "Decode")."""
    scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, values)


@single_query_attention.register_fake
def _(query, keys, values, mask, scaling):
    return torch.empty_like(query)


@dataclass
class Prefill:
    """What a prefill hands the decode loop for its B rows."""

    cache: object  # the model's DynamicCache after prefill (carved or not): [B, kv_heads, L, head_dim] per layer
    prefill_mask: torch.Tensor  # [B, L] which cache entries are real (left padding is not)
    positions: torch.Tensor  # [B] RoPE position of each row's next token: its uncompressed prompt length
    first_tokens: torch.Tensor  # [B] the token the prefill's last logits choose (argmax)


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
        out.logits[:, -1].argmax(-1),
    )


class SlotCache:
    """Fixed-shape keys and values for `slots` rows; HF attention calls `update` once per layer and step."""

    def __init__(self, num_layers, slots, kv_heads, capacity, head_dim, dtype, device):
        shape = (slots, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # next write index per slot
        self.valid = torch.zeros(slots, capacity, dtype=torch.bool, device=device)
        self.slot_index = torch.arange(slots, device=device)
        self.capacity = capacity

    def buffers(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values, self.lengths, self.valid, self.slot_index]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write one new position per slot ([slots, kv_heads, 1, head_dim]) at the slot's own length."""
        # index_put_ (not scatter_): compiled, it stays an in-place store of one entry per slot,
        # where a functionalised scatter copies the whole buffer every step
        where = (self.slot_index, slice(None), self.lengths)
        self.keys[layer_idx][where] = key[:, :, 0]
        self.values[layer_idx][where] = value[:, :, 0]
        return self.keys[layer_idx], self.values[layer_idx]

    def load(self, slots: torch.Tensor, cache, prefill_mask: torch.Tensor) -> None:
        """Copy a prefill's cache (a DynamicCache, [B, kv_heads, L, head_dim] per layer, laid out as
        `prefill_mask` [B, L] says) into `slots`; the rest of those slots' entries become invisible."""
        length = prefill_mask.shape[1]
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            keys[slots, :, :length] = cache.layers[layer].keys
            values[slots, :, :length] = cache.layers[layer].values
        self.valid[slots] = False
        self.valid[slots, :length] = prefill_mask.bool()
        self.lengths[slots] = length


class DecodePool:
    """Greedy decoding of up to `slots` rows at once, from fixed-shape buffers; see the module doc.

    Rows enter with `admit` (after their prefill) and leave through `finished`; `step` advances
    every slot by one token and is what gets compiled."""

    def __init__(self, model, language_model, slots: int, capacity: int, eos: list[int]):
        config = language_model.config
        self.layers = list(language_model.layers)
        self.norm = language_model.norm
        self.embed, self.lm_head = model.get_input_embeddings(), model.get_output_embeddings()
        param = next(language_model.parameters())
        device, dtype = param.device, param.dtype
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache = SlotCache(len(self.layers), slots, config.num_key_value_heads, capacity, head_dim, dtype, device)
        self.slots, self.capacity = slots, capacity
        # cos / sin for every position the context window allows, from the model's rotary module
        every_position = torch.arange(config.max_position_embeddings, device=device).unsqueeze(0)
        cos, sin = language_model.rotary_emb(torch.empty(1, dtype=dtype, device=device), every_position)
        self.cos, self.sin = cos[0], sin[0]  # [positions, head_dim]
        self.eos = torch.tensor(eos or [-1], dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)  # RoPE position of the next token
        self.last_token = torch.zeros(slots, dtype=torch.long, device=device)
        self.count = torch.zeros(slots, dtype=torch.long, device=device)  # tokens generated so far
        self.limit = torch.ones(slots, dtype=torch.long, device=device)  # each row's max_new_tokens
        self.done = torch.ones(slots, dtype=torch.bool, device=device)  # empty slots count as done
        # a row generates fewer tokens than the cache holds; the last column is a sink where rows
        # already done write their (ignored) tokens, so the step needs no branch
        self.tokens = torch.zeros(slots, capacity + 1, dtype=torch.long, device=device)
        self.slot_index = self.cache.slot_index
        check_layers(self.layers)
        self.rotate = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self._compiled = None

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor the step reads or writes in place (fixed addresses for CUDA graphs)."""
        state = [self.positions, self.last_token, self.count, self.limit, self.done, self.tokens]
        return [*self.cache.buffers(), *state, self.eos, self.cos, self.sin]

    def compile(self) -> None:
        """Compile the step: CUDA graphs on a GPU ("reduce-overhead"), inductor on the CPU."""
        for tensor in self.buffers():
            torch._dynamo.mark_static_address(tensor)
        mode = "reduce-overhead" if self.eos.device.type == "cuda" else None
        self._compiled = torch.compile(self._step, fullgraph=True, dynamic=False, mode=mode)

    def step(self) -> None:
        (self._compiled or self._step)()

    def _step(self) -> None:
        live = ~self.done
        hidden = self.embed(self.last_token).unsqueeze(1)  # [slots, 1, D]
        # rows of the model's own rotary tables: no cos / sin in the step (compiled, they would be
        # recomputed inside every kernel that reads the rotated query)
        position_embeddings = (self.cos[self.positions].unsqueeze(1), self.sin[self.positions].unsqueeze(1))
        # the new token sees its prefill's visible entries, every token generated since, and itself
        self.cache.valid[self.slot_index, self.cache.lengths] = True
        mask = self.cache.valid[:, None, None, :]  # [slots, 1, 1, capacity], over kv heads and query groups
        for index, layer in enumerate(self.layers):
            hidden = self._layer(layer, index, hidden, position_embeddings, mask)
        logits = self.lm_head(self.norm(hidden[:, -1]))
        chosen = logits.argmax(-1)
        column = torch.where(live, self.count, self.capacity)
        self.tokens[self.slot_index, column] = chosen
        grown = live.long()
        self.count.add_(grown)
        self.cache.lengths.add_(grown)
        self.positions.add_(grown)
        self.last_token.copy_(torch.where(live, chosen, self.last_token))
        self.done.logical_or_(live & (torch.isin(chosen, self.eos) | (self.count >= self.limit)))

    def _layer(self, layer, index: int, hidden, position_embeddings, mask):
        """One Llama-style decoder layer on one token per slot: the layer's own modules, in its order."""
        hidden = hidden + self._attend(layer.self_attn, index, layer.input_layernorm(hidden), position_embeddings, mask)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _attend(self, attention, index: int, hidden, position_embeddings, mask):
        """Self-attention of one new token per slot over its cache: q/k/v projections (and the family's
        query / key norms), the family's rotary embedding, then softmax(q k^T) v as two batched matrix
        products. That is the same sum SDPA computes, without its CPU kernel's per-call cost, which
        dominates at one query (docs/BENCHMARKS.md); grouped-query heads attend to their shared kv head."""
        slots, head_dim = hidden.shape[0], attention.head_dim
        query = attention.q_proj(hidden).view(slots, 1, -1, head_dim)
        key = attention.k_proj(hidden).view(slots, 1, -1, head_dim)
        value = attention.v_proj(hidden).view(slots, 1, -1, head_dim).transpose(1, 2)
        if hasattr(attention, "q_norm"):  # Qwen3: RMS norms over the head dimension, before RoPE
            query, key = attention.q_norm(query), attention.k_norm(key)
        cos, sin = position_embeddings
        query, key = self.rotate(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
        keys, values = self.cache.update(key, value, index)  # [slots, kv_heads, capacity, head_dim]
        query = query.reshape(slots, keys.shape[1], -1, head_dim)  # query head h reads kv head h // groups
        out = single_query_attention(query, keys, values, mask, attention.scaling)
        return attention.o_proj(out.reshape(slots, 1, -1))

    def admit(self, slots: list[int], prefill: Prefill, max_new_tokens: list[int]) -> None:
        """Put prefilled rows into `slots`: their cache, the RoPE position of their next token, the
        token the prefill chose (their first generated one) and how many tokens each may generate."""
        if prefill.prefill_mask.shape[1] + max(max_new_tokens) > self.capacity:
            raise ValueError("the pool is too short for these rows; grow it first")
        index = torch.tensor(slots, device=self.slot_index.device)
        self.cache.load(index, prefill.cache, prefill.prefill_mask)
        first = prefill.first_tokens.to(self.last_token.device)
        self.positions[index] = prefill.positions.to(self.positions.device)
        self.last_token[index] = first
        self.tokens[index] = 0
        self.tokens[index, 0] = first
        self.count[index] = 1
        limit = torch.tensor(max_new_tokens, device=self.limit.device)
        self.limit[index] = limit
        self.done[index] = torch.isin(first, self.eos) | (limit <= 1)

    def take_over(self, other: DecodePool) -> None:
        """Carry a smaller pool's rows over (same slots, shorter capacity): a longer prefill arrived."""
        for mine, theirs in zip(self.cache.keys + self.cache.values, other.cache.keys + other.cache.values):
            mine[:, :, : other.capacity] = theirs
        self.cache.valid[:, : other.capacity] = other.cache.valid
        self.tokens[:, : other.capacity] = other.tokens[:, : other.capacity]
        for mine, theirs in [
            (self.cache.lengths, other.cache.lengths),
            (self.positions, other.positions),
            (self.last_token, other.last_token),
            (self.count, other.count),
            (self.limit, other.limit),
            (self.done, other.done),
        ]:
            mine.copy_(theirs)

    def finished(self) -> list[bool]:
        """Which slots' rows are done (one host synchronisation)."""
        return self.done.tolist()

    def output(self, slot: int) -> list[int]:
        return self.tokens[slot, : int(self.count[slot])].tolist()


@dataclass
class Decoded:
    """One row's result: its generated tokens (eos included) and when it finished."""

    tokens: list[int]
    finished_at: float  # time.perf_counter() when the host saw it done


class StaticDecoder:
    """Decodes rows through one DecodePool, refilling its free slots from `prefill` as rows finish.

    The pool is kept between calls (its buffers keep their addresses, its compiled step is reused)
    while the slot count stays and the rows fit its capacity; capacities come in steps of
    `CAPACITY_STEP` entries so that a stream of batches of similar length compiles once."""

    CAPACITY_STEP = 64
    # Free slots are refilled in chunks of at least MIN_REFILL_ROWS rows (at most half the pool; slots/8
    # in large pools): a prefill call has a fixed cost (the vision tower's call, the carve's per-batch
    # work, Python), so one-row refills of a small pool cost more than the steps they save
    # (carve-tiny-hard on the CPU, 8 slots: 25.0 captions/s refilling one row at a time, 32.4 four at a
    # time, 30.7 without refill)
    MIN_REFILL_ROWS = 4
    # Steps between two looks at `done`, the only host synchronisations: on a GPU a look waits for the
    # queued steps, so it comes every few; on a CPU steps are synchronous anyway and a look is free,
    # so it comes after every step (no step is spent on rows already done)
    SYNC_EVERY = {"cuda": 8}

    def __init__(self, model, language_model, eos: list[int], compile: bool):
        self.model, self.language_model, self.eos, self.compile = model, language_model, eos, compile
        self.pool: DecodePool | None = None
        self.steps = 0  # decode steps run by the last `run` (a figure for benchmarks)
        self.seconds = 0.0  # time the last `run` spent decoding: steps and the looks at `done`

    def run(
        self,
        num_rows: int,
        slots: int,
        max_new_tokens: int | list[int],
        prefill: Callable[[list[int]], Prefill],
    ) -> list[Decoded]:
        """Decode rows 0..num_rows-1 in order of admission; `prefill(rows)` prefills a chunk of them.
        `max_new_tokens`: one cap for every row, or each row's own (a benchmark's caption lengths).

        A slot frees when its row is done; free slots are refilled once at least `refill_at` of them
        are free (a few rows per prefill, not one: `MIN_REFILL_ROWS`), or when no row is left decoding."""
        results: list[Decoded | None] = [None] * num_rows
        holder = [-1] * slots  # the row each slot decodes, -1: free
        pending = 0  # rows below this index have been admitted
        refill_at = max(1, min(self.MIN_REFILL_ROWS, slots // 2), slots // 8)
        caps = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * num_rows
        self.steps, self.seconds = 0, 0.0
        while True:
            looked = time.perf_counter()
            done = self.pool.finished() if self.pool is not None and self.pool.slots == slots else None
            self.seconds += time.perf_counter() - looked
            for slot, row in enumerate(holder):
                if row >= 0 and done[slot]:
                    results[row] = Decoded(self.pool.output(slot), time.perf_counter())
                    holder[slot] = -1
            free = [slot for slot, row in enumerate(holder) if row < 0]
            busy = len(free) < slots
            if pending < num_rows and (len(free) >= min(refill_at, num_rows - pending) or not busy):
                chunk = list(range(pending, min(num_rows, pending + len(free))))
                pending += len(chunk)
                filled = prefill(chunk)
                limits = [caps[row] for row in chunk]
                self._fit(slots, filled.prefill_mask.shape[1] + max(limits))
                self.pool.admit(free[: len(chunk)], filled, limits)
                for slot, row in zip(free, chunk):
                    holder[slot] = row
                continue  # rows whose first token ended them are collected before any step
            if not busy:
                return results
            stepping = time.perf_counter()
            steps = self.SYNC_EVERY.get(self.pool.eos.device.type, 1)
            for _ in range(steps):
                self.pool.step()
            self.steps += steps
            self.seconds += time.perf_counter() - stepping  # asynchronous on a GPU: the next look waits

    def _fit(self, slots: int, needed: int) -> None:
        """A pool of `slots` slots that holds `needed` entries per row, reusing (or growing) the current one."""
        pool = self.pool
        if pool is not None and pool.slots == slots and pool.capacity >= needed:
            return
        capacity = self.CAPACITY_STEP * math.ceil(needed / self.CAPACITY_STEP)
        grown = DecodePool(self.model, self.language_model, slots, capacity, self.eos)
        if pool is not None and pool.slots == slots:
            grown.take_over(pool)  # rows mid-decode carry on in the longer pool
        if self.compile:
            grown.compile()
        self.pool = grown
