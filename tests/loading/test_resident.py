"""Device-resident bags (on CPU tensors here; tests/test_gpu.py has CUDA): the batches of
the streaming loader, drawn by index from features loaded once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sampleclr_scale.config import LoaderConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.loading.loader import DonorBagDataset, DonorBatch, make_loader
from sampleclr_scale.loading.resident import (
    RESIDENT_FRACTION,
    ResidentBags,
    choose_resident,
    load_features,
    resident_dtype,
    use_resident,
)
from sampleclr_scale.loading.rows import view_index
from sampleclr_scale.store.bag_store import BagStore

TASKS = {"severity": "ordinal", "age": "regression"}
CPU = torch.device("cpu")


def assert_same_batches(streamed: list[DonorBatch], resident: list[DonorBatch]) -> None:
    """The two sources' batches hold the same tensors, exactly."""
    assert len(streamed) == len(resident) > 0
    for s, r in zip(streamed, resident, strict=True):
        assert (s.epoch, s.step) == (r.epoch, r.step)
        for name in ("cells", "mask", "donor", "batch"):
            a, b = getattr(s, name), getattr(r, name)
            assert (a is None) == (b is None), name
            if a is not None:
                b = b.cpu()
                assert a.dtype == b.dtype and torch.equal(a, b), name
        assert s.labels.keys() == r.labels.keys()
        for column, labels in s.labels.items():  # NaN marks a missing regression target
            torch.testing.assert_close(labels, r.labels[column].cpu(), rtol=0, atol=0,
                                       equal_nan=True)


def both_sources(store_path: str, config: LoaderConfig, features: torch.Tensor, *,
                 epoch: int = 0, start_step: int = 0, **data) -> tuple[list, list]:
    """One epoch of the streaming loader and of the resident source, same settings."""
    streaming = DonorBagDataset(store_path, config, **data)
    resident = ResidentBags(store_path, config, features=features, **data)
    for source in (streaming, resident):
        source.set_epoch(epoch)
        source.set_start_step(start_step)
    return list(make_loader(streaming)), list(resident)


@pytest.fixture(scope="module")
def features(batch_store) -> torch.Tensor:
    store = BagStore(batch_store)
    return load_features(store, CPU, resident_dtype(store, LoaderConfig()), block_rows=1000)


def test_features_load_whole_in_blocks(batch_store, features):
    store = BagStore(batch_store)
    assert features.dtype == torch.float32 and features.device == CPU
    assert torch.equal(features, torch.from_numpy(store.features[:]))
    bf16 = load_features(store, CPU, resident_dtype(
        store, LoaderConfig(resident_dtype="bfloat16")), block_rows=777)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, features.bfloat16())


@pytest.mark.parametrize(("balance", "strength"), [(None, 1.0), ("cell_type", 1.0),
                                                  ("cell_type", 0.5)])
@pytest.mark.parametrize("standardize", [False, True, "batch_cell_type"])
def test_resident_batches_equal_the_streamed_ones(batch_store, features, balance, strength,
                                                  standardize):
    # uniform, balanced and partly balanced views, raw and standardised, fixed and
    # variable view sizes
    for sizes in ({"cells_per_view": 40}, {"cells_per_view": 60, "min_cells_per_view": 15}):
        config = LoaderConfig(batch_size=3, seed=5, balance=balance,
                              balance_strength=strength, **sizes)
        streamed, resident = both_sources(batch_store, config, features, epoch=2,
                                          tasks=TASKS, standardize=standardize)
        assert_same_batches(streamed, resident)
        assert resident[0].batch is not None  # the store's batch codes
        padded = any(not batch.mask.all() for batch in resident)
        assert padded == ("min_cells_per_view" in sizes)


@pytest.mark.parametrize(("rank", "world_size", "start_step"), [(0, 2, 0), (1, 2, 1), (0, 1, 3)])
def test_ranks_and_resumed_epochs_match_too(batch_store, features, rank, world_size,
                                            start_step):
    config = LoaderConfig(batch_size=2, cells_per_view=30, seed=1)
    streamed, resident = both_sources(batch_store, config, features, epoch=1,
                                      start_step=start_step, rank=rank,
                                      world_size=world_size)
    assert_same_batches(streamed, resident)
    assert resident[0].step == start_step


def test_view_index_lays_out_the_rows_as_the_batch():
    views = [(2, 3, np.array([10, 11, 20, 21, 22])), (1, 1, np.array([5, 6]))]
    index, mask = view_index(views, m=3)
    assert index.tolist() == [[[10, 11, 0], [20, 21, 22]], [[5, 0, 0], [6, 0, 0]]]
    assert mask.tolist() == [[[True, True, False], [True, True, True]],
                             [[True, False, False], [True, False, False]]]
    index, mask = view_index([(2, 2, np.array([7, 8, 9, 4]))], m=2)  # no padding
    assert index.tolist() == [[[7, 8], [9, 4]]] and mask.all() and index.dtype == np.int64


def test_resident_features_must_be_the_stores(batch_store, features):
    with pytest.raises(InputError, match="not those of"):
        ResidentBags(batch_store, LoaderConfig(batch_size=2, cells_per_view=20),
                     features=features[:-5])


def test_auto_holds_features_on_a_gpu_with_room_and_streams_on_cpu(batch_store):
    gib = 2**30
    assert not choose_resident("auto", "cpu", need=1, free=0)
    assert choose_resident("always", "cpu", need=100 * gib, free=0)
    assert not choose_resident("never", "cuda", need=1, free=100 * gib)
    assert choose_resident("auto", "cuda", need=4 * gib, free=10 * gib)
    assert not choose_resident("auto", "cuda", need=RESIDENT_FRACTION * 10 * gib, free=10 * gib)
    assert choose_resident("always", "cuda", need=9 * gib, free=10 * gib)
    with pytest.raises(InputError, match="GiB free"):
        choose_resident("always", "cuda", need=11 * gib, free=10 * gib)
    store = BagStore(batch_store)
    assert not use_resident(store, LoaderConfig(), CPU)
    assert use_resident(store, LoaderConfig(resident="always"), CPU)
