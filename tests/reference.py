"""A slow, obviously-correct TokenCarve written from ../shared/ALGORITHM.md, for the tests.

One sample at a time, no padding, eager attention, a full SVD, Python loops over tokens, and a
hand-written Llama decoder that keeps every layer's keys and values in explicit tensors. Nothing
here is shared with the library: agreement between the two is the point of the tests.

The same code covers every LLaVA family: each image's token count is read off the features the
model itself produced (`image_outputs`), the decoder is written once for Llama / Mistral / Qwen2
(q/k/v biases live in the projections, grouped-query heads are repeated, the output head is
whatever lm_head is, tied to the embeddings or not).

Qwen-VL (mRoPE): each token's three positions (t, row, column) are computed here from the image grids
by their definition (text: one running index; an image: its start plus each token's merged-grid
coordinates, the text after it continuing from start + the grid's longest side), each frequency pair
rotates by the row its mRoPE section assigns (contiguous sections, or Qwen3-VL's interleaved ones),
Qwen3-VL's query / key norms and deepstack additions are applied by hand, and decoding continues from
max(position) + 1. The kept tokens keep these original positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# -- selection (the spec's formulas, literally) ---------------------------------------------------


def borda(score: list[float]) -> list[int]:
    n = len(score)
    order = sorted(range(n), key=lambda i: (-score[i], i))
    points = [0] * n
    for rank, i in enumerate(order):
        points[i] = n - rank
    return points


def budget(keep, n: int) -> int:
    """A count, or a fraction of n rounded up (0.1 of 2880 is 288: float noise above it is ignored)."""
    return keep if isinstance(keep, int) else math.ceil(keep * n - 1e-9)


def select(H: torch.Tensor, attention: torch.Tensor, keep: int, weight: float = 0.5, method: str = "tokencarve"):
    """Returns (kept positions ascending, {position: value}) for one image's N x D matrix H."""
    n = H.shape[0]
    if keep >= n:
        return list(range(n)), {i: H[i] for i in range(n)}
    U, S, _ = torch.linalg.svd(H.double(), full_matrices=True)  # float64: see information_scores
    sv = (U[:, : S.shape[0]].abs() * S).sum(1).tolist()
    av = attention.tolist()
    points_av, points_sv = borda(av), borda(sv)
    fused = {
        "tokencarve": [weight * points_av[i] + (1 - weight) * points_sv[i] for i in range(n)],
        "information": [float(p) for p in points_sv],
        "attention": [float(p) for p in points_av],
    }[method]
    ranking = sorted(range(n), key=lambda i: (-fused[i], i))
    survivors = math.floor(1.5 * keep)
    merges = math.floor(0.5 * keep)
    if survivors > n:
        survivors, merges = n, n - keep
    kept = ranking[:survivors]
    group_a, group_b = kept[: survivors // 2], kept[survivors // 2 :]

    unit = H.double() / H.double().norm(dim=1, keepdim=True)
    best = []  # (similarity, b, its most similar a)
    for b in group_b:
        sims = [float(unit[b] @ unit[a]) for a in group_a]
        if sims:
            k = max(range(len(sims)), key=lambda j: (sims[j], -j))  # first maximum
            best.append((sims[k], b, group_a[k]))
    best.sort(key=lambda t: -t[0])  # stable: equal similarities keep fused order
    merged = best[: min(len(group_a), merges)]

    members = {a: [a] for a in group_a}
    for _, b, a in merged:
        members[a].append(b)
    merged_away = {b for _, b, _ in merged}
    values = {a: H[members[a]].double().mean(0).to(H.dtype) for a in group_a}
    values.update({b: H[b] for b in group_b if b not in merged_away})
    return sorted(values), values


# -- a hand-written Llama with explicit per-layer caches -------------------------------------------


@dataclass
class Rope:
    """The rotary settings of a decoder: theta, and for mRoPE the sections (pairs per t / h / w row)."""

    theta: float
    sections: list[int] | None = None
    interleaved: bool = False

    def row_of_pair(self, pairs: int) -> list[int]:
        """Which position row (0 t, 1 h, 2 w) rotates each frequency pair."""
        if self.sections is None:
            return [0] * pairs
        if not self.interleaved:  # Qwen2-VL / 2.5-VL: t t h h h w w w (sections in a row)
            return [row for row, n in enumerate(self.sections) for _ in range(n)]
        # Qwen3-VL: t h w t h w ..., each row for as many pairs as its section has, then t
        rows = [0] * pairs
        for row in (1, 2):
            for i in range(row, 3 * self.sections[row], 3):
                rows[i] = row
        return rows


def rope_of(lm) -> Rope:
    params = lm.config.rope_parameters
    return Rope(params["rope_theta"], params.get("mrope_section"), bool(params.get("mrope_interleaved")))


def rope(x: torch.Tensor, positions: torch.Tensor, spec: Rope) -> torch.Tensor:
    """Rotary embedding of x [heads, T, hd] at integer positions [T], or [3, T] for mRoPE (Llama's
    half-split form; each frequency pair turned by its own row's position)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (spec.theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    rows = positions.float().reshape(-1, positions.shape[-1])  # [1 or 3, T]
    per_pair = rows[spec.row_of_pair(hd // 2)] if len(rows) == 3 else rows.expand(hd // 2, -1)  # [pairs, T]
    angles = per_pair.T * inv_freq[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    rotated = torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
    return x * cos + rotated * sin


@dataclass
class LayerCache:
    keys: torch.Tensor  # [kv_heads, T, hd] (rotated)
    values: torch.Tensor


def layer_forward(layer, h: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None, spec: Rope):
    """One decoder layer on h [T, D]; new tokens attend causally to the cache and to each other.
    Returns (output [T, D], the cache extended by these tokens)."""
    attn = layer.self_attn
    hd, t = attn.head_dim, h.shape[0]
    x = layer.input_layernorm(h)
    q, k = attn.q_proj(x).view(t, -1, hd), attn.k_proj(x).view(t, -1, hd)
    if hasattr(attn, "q_norm"):  # Qwen3-VL: RMS norms over each head, before the rotation
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = rope(q.transpose(0, 1), positions, spec)
    k = rope(k.transpose(0, 1), positions, spec)
    v = attn.v_proj(x).view(t, -1, hd).transpose(0, 1)
    if cache is not None:
        k, v = torch.cat([cache.keys, k], 1), torch.cat([cache.values, v], 1)
    groups = q.shape[0] // k.shape[0]
    k_all, v_all = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    past = k.shape[1] - t
    scores = (q @ k_all.transpose(1, 2)) * hd**-0.5
    future = torch.arange(k.shape[1])[None, :] > (past + torch.arange(t))[:, None]
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    out = attn.o_proj((probs @ v_all).transpose(0, 1).reshape(t, -1))
    h = h + out
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, LayerCache(k, v)


@dataclass
class ReferenceRun:
    kept: list[list[int]]  # per image, kept positions within the image (0..N-1)
    carved_hidden: torch.Tensor  # [L', D] entering layer K
    caches: list[LayerCache]
    prefill_logits: torch.Tensor  # [V] next-token logits after the prompt
    next_position: int  # of the first generated token: the prompt's length, for mRoPE max(position) + 1


def mrope_positions(input_ids: list[int], image_token_id: int, grids: list[tuple[int, int, int]], merge: int):
    """[3, L] positions of a Qwen-VL prompt, by definition: text tokens one running index on all three
    rows; an image of grid (t, h, w) patches is (t, h / merge, w / merge) tokens in row-major order at
    (start + ti, start + hi, start + wi), and the text after it continues from start + its longest side."""
    rows, current, i, images = [], 0, 0, iter(grids)
    while i < len(input_ids):
        if input_ids[i] != image_token_id:
            rows.append((current, current, current))
            current, i = current + 1, i + 1
            continue
        t, h, w = next(images)
        h, w = h // merge, w // merge
        rows += [(current + ti, current + hi, current + wi) for ti in range(t) for hi in range(h) for wi in range(w)]
        i += t * h * w
        current += max(t, h, w)
    return torch.tensor(rows).T


def image_features(out) -> list[torch.Tensor]:
    """Each image's [N_i, D] features, as the model wrote them into the prompt."""
    encoded = getattr(out, "image_outputs", None)
    features = encoded.pooler_output if encoded is not None else out.image_hidden_states
    return list(features)  # a [images, N, D] tensor (LLaVA-1.5 on transformers 5.23) or a list per image


@torch.no_grad()
def reference_prefill(
    eager_model,
    input_ids: list[int],
    pixel_values,
    keep,
    cut: int = 2,
    weight: float = 0.5,
    method: str = "tokencarve",
    **image_inputs,
) -> ReferenceRun:
    """Carve one unpadded prompt and run the language model by hand on the kept tokens.
    `keep` is a count or a fraction per image; image_inputs: image_sizes (NeXT, OneVision), batch_num_images."""
    lm = eager_model.model.language_model
    spec = rope_of(lm)
    ids = torch.tensor([input_ids])
    image_token = eager_model.config.image_token_id
    if spec.sections is not None:  # Qwen-VL: the model needs each token's modality for its own positions
        image_inputs = dict(image_inputs, mm_token_type_ids=(ids == image_token).int())
    out = eager_model(
        input_ids=ids, pixel_values=pixel_values, output_hidden_states=True, output_attentions=True, **image_inputs
    )
    last_row = out.attentions[cut - 1][0, :, -1, :].float().mean(0)  # last token, heads averaged

    features = image_features(out)
    image_positions = [i for i, t in enumerate(input_ids) if t == image_token]
    images, start = [], 0
    for f in features:  # the model fills image tokens in order, image after image
        images.append(image_positions[start : start + len(f)])
        start += len(f)
    assert start == len(image_positions)
    all_positions = torch.arange(len(input_ids))
    if spec.sections is not None:
        grids = [tuple(g) for g in image_inputs["image_grid_thw"].tolist()]
        merge = eager_model.config.vision_config.spatial_merge_size
        all_positions = mrope_positions(input_ids, image_token, grids, merge)
    # Qwen3-VL's deepstack: per early layer, a feature per visual token, added after that layer
    deepstack = [torch.cat(f) for f in getattr(out.image_outputs, "deepstack_features", None) or []]
    visual = torch.tensor(image_positions, dtype=torch.long)

    # Layers < K on the whole prompt.
    h = lm.embed_tokens(ids)[0]
    h[visual] = torch.cat(features).reshape(-1, h.shape[-1])
    full_caches = []
    for index, layer in enumerate(lm.layers[:cut]):
        h, cache = layer_forward(layer, h, all_positions, None, spec)
        torch.testing.assert_close(h, out.hidden_states[index + 1][0], rtol=1e-4, atol=1e-4)  # hand-written is right
        if index < len(deepstack):
            h = h.clone()
            h[visual] += deepstack[index]
        full_caches.append(cache)
    entering_cut = h  # the residual stream entering layer K

    kept_sequence = [i for i, t in enumerate(input_ids) if t != image_token]
    values = {i: entering_cut[i] for i in kept_sequence}
    kept_per_image = []
    for positions in images:
        kept, image_values = select(
            entering_cut[positions], last_row[positions], budget(keep, len(positions)), weight, method
        )
        kept_per_image.append(kept)
        kept_sequence += [positions[k] for k in kept]
        values.update({positions[k]: v for k, v in image_values.items()})
    kept_sequence.sort()
    index = torch.tensor(kept_sequence)
    # Layers < K: full-context keys/values, restricted to the kept positions (no merging).
    caches = [LayerCache(cache.keys[:, index], cache.values[:, index]) for cache in full_caches]

    # Layers >= K: the carved sequence at its original positions (deepstack: on the kept visual tokens).
    carved = torch.stack([values[i] for i in kept_sequence])
    h, positions = carved, all_positions[..., index]
    kept_visual = [j for j, i in enumerate(kept_sequence) if i in set(image_positions)]
    feature_of = {p: f for f, p in enumerate(image_positions)}
    for layer_index, layer in enumerate(lm.layers[cut:], start=cut):
        h, cache = layer_forward(layer, h, positions, None, spec)
        if layer_index < len(deepstack):
            h = h.clone()
            h[kept_visual] += deepstack[layer_index][[feature_of[kept_sequence[j]] for j in kept_visual]]
        caches.append(cache)
    logits = eager_model.lm_head(lm.norm(h[-1:]))[0]
    return ReferenceRun(kept_per_image, carved, caches, logits, int(all_positions.max()) + 1)


@torch.no_grad()
def reference_decode(eager_model, run: ReferenceRun, steps: int, forced: list[int] | None = None):
    """Greedy decode (or teacher-forced on `forced`) from a reference prefill.
    Returns (tokens, logits per step [steps, V]); step 0's logits are the prefill's."""
    lm = eager_model.model.language_model
    spec = rope_of(lm)
    caches, logits, tokens, all_logits = list(run.caches), run.prefill_logits, [], []
    for step in range(steps):
        all_logits.append(logits)
        token = forced[step] if forced is not None else int(logits.argmax())
        tokens.append(token)
        if step == steps - 1:
            break
        h = lm.embed_tokens(torch.tensor([token]))
        position = torch.tensor([run.next_position + step])
        if spec.sections is not None:
            position = position.expand(3, 1)  # a text token: the same position on every row
        for i, layer in enumerate(lm.layers):
            h, caches[i] = layer_forward(layer, h, position, caches[i], spec)
        logits = eager_model.lm_head(lm.norm(h))[0]
    return tokens, torch.stack(all_logits)
