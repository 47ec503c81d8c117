"""The one attention row TokenCarve needs, computed without eager attention.

TokenCarve scores visual tokens by the attention the LAST prompt token pays them in layer K-1.
The reference forces eager attention in every layer to read that row out of the full attention
matrix. We recompute just that row from the layer's own projections: one query (the last
non-padding token) against all keys. That is O(L) instead of O(L^2), and the model keeps
running SDPA / flash attention everywhere.
"""

from __future__ import annotations

import sys

import torch
from transformers.models.llama import modeling_llama


def last_token_index(mask_2d: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token per row of a [B, L] 0/1 mask (left or right padding)."""
    positions = torch.arange(mask_2d.shape[1], device=mask_2d.device)
    return torch.where(mask_2d.bool(), positions, -1).max(dim=1).values


def last_token_attention(
    decoder_layer: torch.nn.Module,
    layer_input: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    mask_2d: torch.Tensor,
) -> torch.Tensor:
    """Head-averaged post-softmax attention of the last non-padding token to every position.

    decoder_layer:       a Llama-style decoder layer (input_layernorm, self_attn.{q,k}_proj): Llama,
                         Mistral, Qwen2, Qwen2-VL; Qwen3-VL's query / key norms are applied. Projection
                         biases come with the modules; grouped-query attention (fewer key heads) is
                         repeated as the model repeats it.
    layer_input:         [B, L, D] hidden states entering that layer.
    position_embeddings: the (cos, sin) rotary tables the layer receives ([B, L, head_dim]; for mRoPE
                         already mixed from the 3-D positions, so the row sees the model's own rotation).
    mask_2d:             [B, L] 1 for real tokens, 0 for padding.
    Returns [B, L] float32; padding and future positions get 0.
    """
    attn = decoder_layer.self_attn
    batch, length, _ = layer_input.shape
    rows = torch.arange(batch, device=layer_input.device)
    last = last_token_index(mask_2d)

    normed = decoder_layer.input_layernorm(layer_input)
    query = attn.q_proj(normed[rows, last]).view(batch, 1, -1, attn.head_dim)
    keys = attn.k_proj(normed).view(batch, length, -1, attn.head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3 / Qwen3-VL: RMS norms over the head dimension, before RoPE
        query, keys = attn.q_norm(query), attn.k_norm(keys)
    query, keys = query.transpose(1, 2), keys.transpose(1, 2)
    cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)
    rotate = _rotary_of(attn)
    query, _ = rotate(query, query, cos[rows, last].unsqueeze(1), sin[rows, last].unsqueeze(1))
    _, keys = rotate(keys, keys, cos, sin)
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)  # grouped-query attention

    scores = (query @ keys.mT).squeeze(2).float() * attn.scaling  # [B, heads, L]
    visible = mask_2d.bool() & (torch.arange(length, device=mask_2d.device) <= last.unsqueeze(1))
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1)


def _rotary_of(attention: torch.nn.Module):
    """The rotary function of the attention's own modeling file (Llama's, Mistral's, Qwen2's copy),
    so that a model family with its own variant gets its own; Llama's where a file has none."""
    module = sys.modules.get(type(attention).__module__)
    return getattr(module, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)
