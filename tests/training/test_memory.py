"""The memory meter counts storages resized in place, as FSDP frees and re-gathers a block's parameters."""

from __future__ import annotations

import torch

from peftkit.training.memory import LiveBytes


def test_a_storage_resized_in_place_is_counted_at_its_new_size() -> None:
    resize = torch.UntypedStorage.resize_
    made_before = torch.empty(250)  # 1000 bytes the meter has not seen
    with LiveBytes() as counter:
        block = torch.empty(1000)  # 4000 bytes
        block.untyped_storage().resize_(0)  # freed in place, as FSDP reshards after a block's forward
        block.untyped_storage().resize_(8000)  # gathered into it again
        other = torch.empty(500)  # 2000 bytes
        made_before.untyped_storage().resize_(3000)  # counted from its first resize
        assert torch.UntypedStorage.resize_ is not resize
    assert torch.UntypedStorage.resize_ is resize  # put back when the meter stops
    assert counter.log == [(1, 4000), (1, -4000), (1, 8000), (2, 2000), (3, 3000)]
    assert counter.peak_bytes() == 13000
    del block, other, made_before
    assert sum(nbytes for _, nbytes in counter.log) == 0  # freed at the size each had last
