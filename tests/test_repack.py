"""tokencarve.repack: shortening a batch to the tokens each row keeps (pure tensors, by hand)."""

import torch

from tokencarve.repack import repack


def test_kept_tokens_are_right_aligned_in_order_behind_left_padding():
    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    hidden = torch.arange(3 * 5 * 2, dtype=torch.float32).view(3, 5, 2)
    mask_2d = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    positions = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 1, 2, 3], [0, 0, 0, 1, 2]])
    packed = repack(hidden, keep, mask_2d, positions)
    # row 0 keeps 3 (the longest), row 1 one token behind two padding slots, row 2 is full
    assert packed.order[:, -1].tolist() == [3, 1, 4]
    assert packed.order[0].tolist() == [0, 2, 3] and packed.order[2].tolist() == [2, 3, 4]
    assert packed.mask_2d.tolist() == [[1, 1, 1], [0, 0, 1], [1, 1, 1]]
    assert packed.position_ids.tolist()[0] == [0, 2, 3] and packed.position_ids[1, -1] == 0  # original positions
    assert packed.position_ids.tolist()[2] == [0, 1, 2]
    for row in range(3):
        real = packed.mask_2d[row].bool()
        assert torch.equal(packed.hidden[row, real], hidden[row, keep[row]])  # same tokens, same order
        assert torch.equal(packed.hidden[row], hidden[row, packed.order[row]])


def test_keeping_everything_changes_nothing():
    hidden = torch.randn(2, 4, 3)
    keep = torch.ones(2, 4, dtype=torch.bool)
    mask_2d, positions = torch.ones(2, 4, dtype=torch.long), torch.arange(4).expand(2, -1)
    packed = repack(hidden, keep, mask_2d, positions)
    assert torch.equal(packed.order, positions) and torch.equal(packed.hidden, hidden)
    assert torch.equal(packed.mask_2d, mask_2d) and torch.equal(packed.position_ids, positions)


def test_padding_slots_are_masked_whatever_the_input_mask_says():
    """A dropped position can hold a real token of the input (a pruned visual token): where it fills a
    left-padding slot, the output mask is 0 all the same."""
    keep = torch.tensor([[1, 1, 1], [0, 0, 1]], dtype=torch.bool)
    packed = repack(torch.randn(2, 3, 1), keep, torch.ones(2, 3, dtype=torch.long), torch.arange(3).expand(2, -1))
    assert packed.mask_2d.tolist() == [[1, 1, 1], [0, 0, 1]]
