"""Rank and world size of the data-parallel job (a leaf: nothing of the package imported).

The loader shards donors by them and the losses gather across them; both read them here.
"""

from __future__ import annotations

import torch.distributed as dist


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the world size of the default process group.

    Returns
    -------
    tuple of int
        ``(rank, world_size)``; ``(0, 1)`` when no default process group is initialised.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
