"""The schedule: which donors each rank and worker takes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sampleclr_scale.errors import InputError
from sampleclr_scale.loading.schedule import (
    Shard,
    epoch_permutation,
    rank_batches,
    steps_per_epoch,
    worker_steps,
)

layouts = st.tuples(
    st.integers(1, 300),  # donors
    st.integers(1, 16),  # batch size
    st.integers(1, 4),  # world size
    st.booleans(),  # drop_last
    st.integers(0, 2**31),  # seed
    st.integers(0, 50),  # epoch
)


def _all_ranks(donors, seed, epoch, batch, world, drop_last):
    return [
        rank_batches(donors, seed=seed, epoch=epoch, batch_size=batch,
                     shard=Shard(rank, world), drop_last=drop_last)
        for rank in range(world)
    ]


@settings(max_examples=200, deadline=None)
@given(layouts)
def test_each_donor_once_per_epoch_and_equal_steps(layout):
    n, batch, world, drop_last, seed, epoch = layout
    if drop_last and n < batch * world:
        with pytest.raises(InputError, match="cannot fill one global batch"):
            _all_ranks(np.arange(n), seed, epoch, batch, world, drop_last)
        return
    donors = np.arange(1000, 1000 + n)
    per_rank = _all_ranks(donors, seed, epoch, batch, world, drop_last)
    steps = steps_per_epoch(n, batch, world, drop_last)
    assert all(b.shape == (steps, batch) for b in per_rank)  # equal steps on every rank
    seen = np.concatenate([b.ravel() for b in per_rank])
    counts = np.bincount(seen - 1000, minlength=n)
    if drop_last:
        # no donor twice; exactly the last incomplete global batch is dropped
        assert counts.max() <= 1
        assert counts.sum() == n - n % (batch * world)
    else:
        # every donor at least once; only the padding of the last global batch repeats
        assert counts.min() >= 1
        assert counts.sum() - n == steps * batch * world - n
    # within one global step, no donor appears on two ranks (when the epoch has enough)
    if n >= batch * world:
        for step in range(steps):
            members = np.concatenate([b[step] for b in per_rank])
            assert len(np.unique(members)) == len(members)


@settings(max_examples=50, deadline=None)
@given(layouts)
def test_order_deterministic_and_changes_with_epoch(layout):
    n, batch, world, _, seed, epoch = layout
    donors = np.arange(n)
    a = _all_ranks(donors, seed, epoch, batch, world, False)
    b = _all_ranks(donors, seed, epoch, batch, world, False)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    if n >= 8:
        other = epoch_permutation(donors, seed, epoch + 1)
        assert not np.array_equal(epoch_permutation(donors, seed, epoch), other)


def test_permutation_is_independent_of_rank_and_world():
    donors = np.arange(97)
    one = rank_batches(donors, seed=3, epoch=2, batch_size=4, shard=Shard(0, 1),
                       drop_last=False)
    two = _all_ranks(donors, 3, 2, 2, 2, False)
    # the same global order, dealt differently: step s of 1 rank = steps s of both ranks
    interleaved = np.concatenate([np.stack(two, axis=1).reshape(-1, 4)]).ravel()
    assert np.array_equal(one.ravel()[:96], interleaved[:96])


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 60), st.integers(1, 5), st.integers(0, 59))
def test_workers_partition_the_steps_in_loader_order(n_steps, n_workers, start):
    start = min(start, n_steps)
    per_worker = [list(worker_steps(n_steps, Shard(0, 1, w, n_workers), start))
                  for w in range(n_workers)]
    merged = sorted(s for steps in per_worker for s in steps)
    assert merged == list(range(start, n_steps))
    # the DataLoader takes one item from each worker in turn: that must be step order
    round_robin = [steps[i] for i in range(n_steps) for steps in per_worker
                   if i < len(steps)]
    assert round_robin == list(range(start, n_steps))
