"""Shorten a batch of sequences to the tokens each row keeps: the adapter's repack after the cut.

Pure tensors, like tokencarve.core: the adapter decides which positions survive (real text tokens
and each image's kept visual tokens), this module moves them. Kept tokens of every row are packed
right-aligned, in their original order, and rows with fewer of them get extra left padding: the
layout generate() already uses for left-padded batches, so decoding continues as it would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Repacked:
    """A batch shortened from L to L' = the most tokens any row keeps.

    order:        [B, L']    source position (0..L-1) of every output slot; left-padding slots point
                             at dropped positions (their rows are masked out)
    hidden:       [B, L', D] hidden states of the kept tokens, right-aligned
    mask_2d:      [B, L']    1 on real (kept) slots, 0 on padding
    position_ids: [..., B, L'] the kept tokens' original positions (RoPE continues from them); mRoPE
                             positions [3 or 4, B, L] are gathered row by row
    """

    order: torch.Tensor
    hidden: torch.Tensor
    mask_2d: torch.Tensor
    position_ids: torch.Tensor


def repack(
    hidden: torch.Tensor, keep_mask: torch.Tensor, mask_2d: torch.Tensor, position_ids: torch.Tensor
) -> Repacked:
    """Keep the positions where `keep_mask` ([B, L] bool) is True, right-aligned per row.

    A stable sort of the 0/1 mask puts each row's dropped positions first and its kept ones last,
    both in original order; the last L' columns are then the kept tokens behind left padding."""
    length = keep_mask.shape[1]
    counts = keep_mask.sum(1)
    new_length = int(counts.max())
    order = torch.sort(keep_mask.to(torch.int8), dim=1, stable=True).indices[:, length - new_length :]
    real_slot = torch.arange(new_length, device=hidden.device) >= (new_length - counts).unsqueeze(1)
    return Repacked(
        order=order,
        hidden=hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])),
        mask_2d=mask_2d.gather(1, order) * real_slot,
        position_ids=position_ids.gather(-1, order.expand(*position_ids.shape[:-2], -1, -1)),
    )
