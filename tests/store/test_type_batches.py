"""Per-(batch, cell type) location and scale: streamed at ingest, shrunk, applied on read."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sampleclr_scale.config import LoaderConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.loading.loader import DonorBagDataset
from sampleclr_scale.loading.views import BalancedViews, views_of
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.type_batches import (
    CellTypeBatches,
    apply_affine,
    shrunk_affine,
)


def _pandas_moments(rows, batch, types, n_batches, n_types):
    """Count, mean and M2 per (batch, type) with a pandas groupby (the reference)."""
    frame = pd.DataFrame(np.asarray(rows, dtype=np.float64))
    keep = np.asarray(types) >= 0
    count = np.zeros((n_batches, n_types), dtype=np.int64)
    mean = np.zeros((n_batches, n_types, rows.shape[1]))
    m2 = np.zeros_like(mean)
    for (b, k), part in frame[keep].groupby([batch[keep], types[keep]]):
        values = part.to_numpy()
        count[b, k], mean[b, k] = len(values), values.mean(axis=0)
        m2[b, k] = ((values - values.mean(axis=0)) ** 2).sum(axis=0)
    return count, mean, m2


def _loop_affine(count, mean, m2, n0):
    """shrunk_affine written as plain loops over batches, types and features."""
    B, K, d = mean.shape
    scale, offset = np.zeros((B, K + 1, d)), np.zeros((B, K + 1, d))
    for j in range(d):
        def pooled(groups):  # [(n, mean, m2)] -> n, mean, population std
            n = sum(g[0] for g in groups)
            mu = sum(g[0] * g[1] for g in groups) / n
            ss = sum(g[2] + g[0] * (g[1] - mu) ** 2 for g in groups)
            return n, mu, np.sqrt(ss / n)
        types = [pooled([(count[b, k], mean[b, k, j], m2[b, k, j]) for b in range(B)
                         if count[b, k]]) for k in range(K)]
        everything = pooled([(count[b, k], mean[b, k, j], m2[b, k, j])
                             for b in range(B) for k in range(K) if count[b, k]])
        for b in range(B):
            n_b = sum(count[b])
            effects = []
            for k in range(K):
                sd = np.sqrt(m2[b, k, j] / max(count[b, k], 1))
                sd = sd if sd >= 1e-6 else 1.0
                effects.append((mean[b, k, j] - types[k][1], np.log(sd) - np.log(types[k][2])))
            d_b = sum(count[b, k] * effects[k][0] for k in range(K)) / n_b
            l_b = sum(count[b, k] * effects[k][1] for k in range(K)) / n_b
            for k in range(K):
                w = count[b, k] / (count[b, k] + n0)
                mu = types[k][1] + w * effects[k][0] + (1 - w) * d_b
                sd = types[k][2] * np.exp(w * effects[k][1] + (1 - w) * l_b)
                scale[b, k, j] = types[k][2] / sd
                offset[b, k, j] = types[k][1] - mu * types[k][2] / sd
            own = pooled([(count[b, k], mean[b, k, j], m2[b, k, j]) for k in range(K)
                          if count[b, k]])
            scale[b, K, j] = everything[2] / own[2]
            offset[b, K, j] = everything[1] - own[1] * everything[2] / own[2]
    return scale, offset


@pytest.fixture
def cells():
    rng = np.random.default_rng(1)
    n, B, K = 3000, 3, 4
    batch = rng.integers(0, B, n)
    types = rng.choice(np.arange(-1, K), n, p=[0.05, 0.4, 0.3, 0.2, 0.05])
    types[(batch == 2) & (types == 3)] = 1  # batch 2 has no cell of type 3
    shift = rng.normal(0, 2, (B, K + 1, 5))
    rows = rng.normal(size=(n, 5)) * (1 + batch[:, None]) + shift[batch, types]
    return rows, batch, types, B, K


def test_streamed_moments_equal_a_pandas_reference(cells) -> None:
    rows, batch, types, B, K = cells
    donor = np.arange(len(rows))  # one donor per row: its batch is the row's
    moments = CellTypeBatches(batch, [f"b{i}" for i in range(B)], "cell_type", K, 5)
    for lo in range(0, len(rows), 257):  # any slicing
        moments.add(rows[lo:lo + 257], donor[lo:lo + 257], types[lo:lo + 257])
    expected = _pandas_moments(rows, batch, types, B, K)
    got = (moments.moments.count.reshape(B, K), moments.moments.mean.reshape(B, K, 5),
           moments.moments.m2.reshape(B, K, 5))
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-8)
    maps = moments.finish(["b2", "b0"])  # the kept batches, in their order
    scale, offset = shrunk_affine(*(a[[2, 0]] for a in expected), 50.0)
    np.testing.assert_allclose(maps["batch_type_scale"], scale)
    np.testing.assert_allclose(maps["batch_type_offset"], offset)


@pytest.mark.parametrize("n0", [1e-9, 50.0, 1e6])
def test_shrunk_affine_equals_a_plain_loop(cells, n0: float) -> None:
    rows, batch, types, B, K = cells
    moments = _pandas_moments(rows, batch, types, B, K)
    scale, offset = shrunk_affine(*moments, n0)
    expected = _loop_affine(*moments, n0)
    np.testing.assert_allclose(scale, expected[0], rtol=1e-5)
    np.testing.assert_allclose(offset, expected[1], rtol=1e-5, atol=1e-5)


def test_without_shrinkage_each_pair_lands_on_its_types_location_and_scale(cells) -> None:
    rows, batch, types, B, K = cells
    scale, offset = shrunk_affine(*_pandas_moments(rows, batch, types, B, K), 1e-9)
    mapped = apply_affine(rows, scale, offset, batch, types)
    for k in range(K):
        of_type = types == k
        target = rows[of_type].mean(0), rows[of_type].std(0)
        for b in range(B):
            pair = of_type & (batch == b)
            if pair.any():
                np.testing.assert_allclose(mapped[pair].mean(0), target[0], atol=1e-3)
                np.testing.assert_allclose(mapped[pair].std(0), target[1], rtol=1e-3)
    # strong shrinkage: every pair of a batch is corrected by the batch's pooled effect
    count, mean, m2 = _pandas_moments(rows, batch, types, B, K)
    scale, offset = shrunk_affine(count, mean, m2, 1e12)
    type_mean = (count[..., None] * mean).sum(0) / count.sum(0)[:, None]
    corrected_mean = (type_mean - offset[:, :K]) / scale[:, :K]  # what maps onto type_mean
    for b in range(B):
        pooled = (count[b, :, None] * (mean[b] - type_mean)).sum(0) / count[b].sum()
        np.testing.assert_allclose(corrected_mean[b] - type_mean, np.tile(pooled, (K, 1)),
                                   atol=1e-4)


def test_apply_affine_equals_a_loop() -> None:
    rng = np.random.default_rng(0)
    scale, offset = rng.uniform(0.5, 2, (2, 4, 3)), rng.normal(size=(2, 4, 3))
    rows = rng.normal(size=(2, 5, 3))
    batch, types = np.array([1, 0])[:, None], rng.integers(-1, 3, (2, 5))
    got = apply_affine(rows, scale.astype(np.float32), offset.astype(np.float32), batch, types)
    for i in range(2):
        for j in range(5):
            k = types[i, j] if types[i, j] >= 0 else 3
            np.testing.assert_allclose(got[i, j], rows[i, j] * scale[batch[i, 0], k]
                                       + offset[batch[i, 0], k], rtol=1e-5)
    in_place = rows.astype(np.float32)
    returned = apply_affine(in_place, scale.astype(np.float32), offset.astype(np.float32),
                            batch, types, out=in_place)
    assert returned is in_place
    np.testing.assert_array_equal(in_place, got)


def test_ingest_stores_the_maps_of_its_rows(batch_store) -> None:
    store = BagStore(batch_store)
    scale, offset, column = store.batch_type_maps
    rows = np.asarray(store.features[:], dtype=np.float64)
    types = np.asarray(store.codes(column)[:], dtype=np.int64)
    batch = np.repeat(store.donor_batch, store.cells_per_donor)
    K = len(store.category_counts(column))
    expected = shrunk_affine(*_pandas_moments(rows, batch, types, scale.shape[0], K))
    assert scale.shape == (len(store.batch_labels), K + 1, store.dim)
    np.testing.assert_allclose(scale, expected[0], rtol=1e-4)
    np.testing.assert_allclose(offset, expected[1], rtol=1e-4, atol=1e-4)
    assert store.attrs["batch"]["cell_type"]["column"] == "cell_type"


def test_loader_maps_each_cell_with_its_pair(batch_store) -> None:
    store = BagStore(batch_store)
    scale, offset, column = store.batch_type_maps
    codes = np.asarray(store.codes(column)[:])
    config = LoaderConfig(batch_size=4, cells_per_view=30, seed=2)
    dataset = DonorBagDataset(batch_store, config, standardize="batch_cell_type")
    raw = DonorBagDataset(batch_store, config)
    dataset.set_epoch(0)
    raw.set_epoch(0)
    for plain, mapped in zip(raw, dataset, strict=True):
        donors = mapped.donor.numpy()
        views = views_of(store, donors, seed=2, epoch=0, view_range=config.view_range,
                         draw=BalancedViews.of(store, "cell_type"))
        for i, (n_a, n_b, rows) in enumerate(views):
            b = store.donor_batch[donors[i]]
            for v, part in ((0, rows[:n_a]), (1, rows[n_a:n_a + n_b])):
                for j, row in enumerate(part):
                    k = codes[row] if codes[row] >= 0 else scale.shape[1] - 1
                    expected = plain.cells[i, v, j].numpy() * scale[b, k] + offset[b, k]
                    np.testing.assert_allclose(mapped.cells[i, v, j].numpy(), expected,
                                               rtol=1e-5, atol=1e-5)
        assert not mapped.cells.numpy()[~mapped.mask.numpy()].any()


def test_batch_cell_type_needs_its_statistics(store_path) -> None:
    with pytest.raises(InputError, match="per-\\(batch, cell type\\)"):
        DonorBagDataset(store_path, LoaderConfig(batch_size=4, cells_per_view=20),
                        standardize="batch_cell_type")
