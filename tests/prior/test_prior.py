"""Donor priors: the kNN KL estimator against loop references and analytic values, and the
Ray-built pseudobulk / GloScope priors of a real bag store against direct computations."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr
from scipy.spatial.distance import cdist

from sampleclr_scale.errors import InputError
from sampleclr_scale.prior.build import _read_subsamples, build_prior, neighbour_pairs
from sampleclr_scale.prior.config import PriorConfig
from sampleclr_scale.prior.graph import PriorGraph, prior_summary, symmetric_graph
from sampleclr_scale.prior.similarity import (
    cosine_similarity,
    knn_kl_divergence,
    kth_neighbour_distances,
    nearest_donors,
    similarity_from_divergence,
    symmetric_kl,
)
from sampleclr_scale.prior.storage import available_priors, load_prior, save_prior
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.pseudobulk import donor_means


def _reference_kl(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """Wang, Kulkarni & Verdu (2009) eq. 5, one point at a time with scipy distances."""
    n, d = x.shape
    total = 0.0
    for i in range(n):
        within = np.sort(np.delete(cdist(x[i : i + 1], x)[0], i))
        across = np.sort(cdist(x[i : i + 1], y)[0])
        total += np.log(across[k - 1] / within[k - 1])
    return d * total / n + np.log(len(y) / (n - 1))


def _first_rows(store: BagStore, cells: int) -> list[np.ndarray]:
    return [store.donor_rows(i)[:cells].astype(np.float64) for i in range(store.n_donors)]


def _graph_checks(prior: PriorGraph, n: int) -> np.ndarray:
    dense = prior.to_dense()
    assert dense.shape == (n, n) and prior.values.dtype == np.float32
    assert np.array_equal(dense, dense.T)
    assert np.array_equal(np.diag(dense), np.ones(n, dtype=np.float32))
    assert np.all(prior.rows[prior.rows == prior.cols] == np.arange(n))  # diagonal stored once
    return dense


# ---- the estimator ----------------------------------------------------------------------

def test_knn_kl_matches_a_loop_reference():
    rng = np.random.default_rng(0)
    for n, m, d, k in [(40, 30, 3, 3), (25, 60, 2, 1), (50, 50, 5, 7)]:
        x, y = rng.normal(size=(n, d)), rng.normal(0.5, 1.5, size=(m, d))
        expected = _reference_kl(x, y, k)
        assert knn_kl_divergence(x, y, k) == pytest.approx(expected, rel=1e-9, abs=1e-9)
        rho = kth_neighbour_distances(x, k)
        reference_rho = np.sort(cdist(x, x) + np.diag(np.full(n, np.inf)), axis=1)[:, k - 1]
        assert np.allclose(rho, reference_rho, rtol=1e-9)
        assert knn_kl_divergence(x, y, k, rho=rho) == pytest.approx(expected, rel=1e-9)
        both = _reference_kl(x, y, k) + _reference_kl(y, x, k)
        assert symmetric_kl(x, y, k) == pytest.approx(max(both, 0.0), rel=1e-9, abs=1e-9)


def test_knn_kl_on_gaussians():
    # n = m = 2000, k = 5 in 2-D. Over 100 seeds (measured) the estimate of KL = 0.5 had
    # mean 0.46 (finite-sample bias) and sd 0.036, so 0.15 allows bias + 3 sd; for equal
    # distributions the sd was 0.018, so 0.08 is more than 4 sd.
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2000, 2))
    same = rng.normal(size=(2000, 2))
    mu = np.array([1.0, 0.0])
    shifted = rng.normal(size=(2000, 2)) + mu
    assert abs(knn_kl_divergence(x, same, 5)) < 0.08
    assert knn_kl_divergence(x, shifted, 5) == pytest.approx(mu @ mu / 2, abs=0.15)


def test_symmetric_kl_is_symmetric_and_clipped_at_zero():
    rng = np.random.default_rng(3)
    clipped = 0
    for seed in range(20):
        x = rng.normal(size=(30, 2))
        y = rng.normal(size=(35, 2)) + (seed % 3) * 0.5
        value = symmetric_kl(x, y, 4)
        assert value >= 0.0
        assert value == pytest.approx(symmetric_kl(y, x, 4), rel=1e-12, abs=1e-12)
        raw = knn_kl_divergence(x, y, 4) + knn_kl_divergence(y, x, 4)
        clipped += raw < 0
        assert value == pytest.approx(max(raw, 0.0), rel=1e-9, abs=1e-12)
    assert clipped  # equal distributions do give negative raw estimates
    with pytest.raises(InputError, match="k = 30"):
        symmetric_kl(x, y, 30)


def test_cosine_similarity_and_nearest_donors():
    rng = np.random.default_rng(5)
    means = rng.normal(size=(12, 4)) + 0.5
    sim = cosine_similarity(means)
    for i in range(12):
        for j in range(12):
            expected = means[i] @ means[j] / np.linalg.norm(means[i]) / np.linalg.norm(means[j])
            assert sim[i, j] == pytest.approx(expected, rel=1e-12)
    near = nearest_donors(means, 3)
    assert near.shape == (12, 3)
    for i in range(12):
        assert i not in near[i]
        order = [j for j in np.argsort(-sim[i], kind="stable") if j != i][:3]
        assert list(near[i]) == order
    assert nearest_donors(means, 50).shape == (12, 11)
    assert np.allclose(similarity_from_divergence(np.array([0.0, 5.0]), 5.0), [1.0, np.exp(-1)])


# ---- priors of a real bag store -----------------------------------------------------------

def test_pseudobulk_is_the_mean_of_each_donors_rows(store_path):
    store = BagStore(store_path)
    direct = np.stack([store.donor_rows(i).astype(np.float64).mean(axis=0)
                       for i in range(store.n_donors)])
    np.testing.assert_allclose(donor_means(store), direct, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(donor_means(store, block_rows=100), direct, rtol=1e-6, atol=1e-9)


def test_prior_config_refuses_bad_settings():
    for bad in ({"kind": "umap"}, {"kind": "gloscope", "k": 0},
                {"kind": "gloscope", "scale": 0.0}, {"kind": "gloscope", "neighbours": 0},
                {"kind": "gloscope", "cells_per_donor": 1}, {"kind": "gloscope", "tau": 1},
                {"kind": "gloscope", "correct": "yes"}):
        with pytest.raises(InputError, match="not a valid PriorConfig"):
            PriorConfig.from_mapping(bad)


def test_gloscope_windows_follow_the_seed(store_path):
    store = BagStore(store_path)
    for seed in (0, 1, 3):
        cells, offsets = _read_subsamples(store, 50, seed,
                                          lambda a, b: store.features[a:b])
        for donor in range(store.n_donors):
            n = int(store.cells_per_donor[donor])
            rows = np.arange(seed * 50, seed * 50 + 50) % n
            assert np.array_equal(cells[offsets[donor] : offsets[donor + 1]],
                                  store.donor_rows(donor)[rows])


def _corrected_by_loop(store: BagStore, donor: int) -> np.ndarray:
    """Independent reference: a donor's rows, each mapped by its (batch, cell type)'s
    scale and offset, one cell at a time (row K of the maps: a cell without a type)."""
    scale, offset, column = store.batch_type_maps
    first, stop = int(store.donor_ptr[donor]), int(store.donor_ptr[donor + 1])
    batch, codes = int(store.donor_batch[donor]), store.codes(column)[first:stop]
    k = scale.shape[1] - 1
    return np.stack([row * scale[batch, c if c >= 0 else k] + offset[batch, c if c >= 0 else k]
                     for row, c in zip(store.features[first:stop], codes, strict=True)])


def test_corrected_rows_are_each_cells_pair_map(batch_store):
    store = BagStore(batch_store)
    donors = [0, 5, store.n_donors - 1]
    expected = np.concatenate([_corrected_by_loop(store, d) for d in donors])
    got = np.concatenate([store.type_corrected_rows(int(store.donor_ptr[d]),
                                                    int(store.donor_ptr[d + 1]))
                          for d in donors])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # a range across donors, as the prior reads the stores' rows in blocks
    lo, hi = int(store.donor_ptr[2]) + 7, int(store.donor_ptr[4]) + 3
    together = np.concatenate([_corrected_by_loop(store, d) for d in (2, 3, 4)])
    np.testing.assert_allclose(store.type_corrected_rows(lo, hi),
                               together[7 : hi - int(store.donor_ptr[2])], rtol=1e-5, atol=1e-5)


@pytest.mark.ray
def test_a_prior_compares_the_cells_as_training_corrects_them(batch_store, store_path,
                                                              ray_cluster):
    store = BagStore(batch_store)
    n = store.n_donors
    corrected = build_prior(batch_store, PriorConfig(kind="pseudobulk"))
    assert corrected.params["correct"] == "batch_cell_type"  # auto, on a store with the maps
    means = np.stack([_corrected_by_loop(store, d).astype(np.float64).mean(axis=0)
                      for d in range(n)])
    unit = means / np.linalg.norm(means, axis=1, keepdims=True)
    assert np.allclose(corrected.to_dense(), unit @ unit.T, atol=1e-5)
    stored = build_prior(batch_store, PriorConfig(kind="pseudobulk", correct="none"))
    assert stored.params["correct"] == "none"
    assert not np.allclose(stored.to_dense(), corrected.to_dense(), atol=1e-3)
    cells, offsets = _read_subsamples(store, 50, 1, store.type_corrected_rows)
    for donor in range(n):
        rows = np.arange(50, 100) % int(store.cells_per_donor[donor])
        np.testing.assert_allclose(cells[offsets[donor] : offsets[donor + 1]],
                                   _corrected_by_loop(store, donor)[rows], rtol=1e-5, atol=1e-5)
    # a store without the statistics: auto builds the stored cells' prior, asking fails
    assert build_prior(store_path, PriorConfig(kind="pseudobulk")).params["correct"] == "none"
    with pytest.raises(InputError, match="per-\\(batch, cell type\\) statistics"):
        build_prior(store_path, PriorConfig(kind="pseudobulk", correct="batch_cell_type"))


def test_k_must_be_below_the_smallest_subsample(store_path):
    with pytest.raises(InputError, match="smallest subsample, 20"):
        build_prior(store_path, PriorConfig(kind="gloscope", k=25, cells_per_donor=20))


@pytest.fixture(scope="module")
def dense_priors(store_path, ray_cluster) -> dict[str, PriorGraph]:
    return {"pseudobulk": build_prior(store_path, PriorConfig(kind="pseudobulk")),
            "gloscope": build_prior(store_path, PriorConfig(kind="gloscope", k=10, n_pcs=5))}


@pytest.mark.ray
def test_dense_priors_equal_direct_computations(store_path, dense_priors):
    store = BagStore(store_path)
    n = store.n_donors

    pseudobulk = _graph_checks(dense_priors["pseudobulk"], n)
    means = np.stack([store.donor_rows(i).astype(np.float64).mean(axis=0) for i in range(n)])
    unit = means / np.linalg.norm(means, axis=1, keepdims=True)
    assert np.allclose(pseudobulk, unit @ unit.T, atol=1e-6)
    assert prior_summary(dense_priors["pseudobulk"])["edges"] == n * (n - 1) // 2

    gloscope = _graph_checks(dense_priors["gloscope"], n)
    assert np.all((gloscope > 0) & (gloscope <= 1))
    subsamples = _first_rows(store, 300)
    pooled = np.concatenate(subsamples)
    _, _, vt = np.linalg.svd(pooled - pooled.mean(axis=0), full_matrices=False)
    scores = [(s - pooled.mean(axis=0)) @ vt[:5].T for s in subsamples]
    expected = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            D = max(0.0, _reference_kl(scores[i], scores[j], 10)
                    + _reference_kl(scores[j], scores[i], 10))
            expected[i, j] = expected[j, i] = np.exp(-D / 5.0)
    assert np.allclose(gloscope, expected, rtol=1e-5, atol=1e-6)
    assert dense_priors["gloscope"].params["mode"] == "dense"


@pytest.mark.ray
def test_sparse_priors_keep_every_donors_neighbours(store_path, dense_priors):
    store = BagStore(store_path)
    n, K = store.n_donors, 4
    full_means = np.stack([store.donor_rows(i).astype(np.float64).mean(axis=0) for i in range(n)])
    window_means = np.stack([s.mean(axis=0) for s in _first_rows(store, 300)])
    for kind, means in (("pseudobulk", full_means), ("gloscope", window_means)):
        extra = {"k": 10, "n_pcs": 5} if kind == "gloscope" else {}
        prior = build_prior(store_path,
                            PriorConfig(kind=kind, dense_limit=10, neighbours=K, **extra))
        _graph_checks(prior, n)
        assert prior.params["mode"] == "sparse"
        off_diagonal = int((prior.rows != prior.cols).sum())
        assert off_diagonal <= n * K * 2
        assert off_diagonal < n * (n - 1)  # genuinely sparse
        stored = set(zip(prior.rows.tolist(), prior.cols.tolist(), strict=True))
        for i, row in enumerate(nearest_donors(means, K)):
            assert all((i, int(j)) in stored and (int(j), i) in stored for j in row)
        # the same pairs as the dense prior, only fewer of them
        dense = dense_priors[kind].to_dense()
        assert np.allclose(prior.values, dense[prior.rows, prior.cols], rtol=1e-6, atol=1e-6)


@pytest.mark.ray
def test_neighbour_pairs_of_some_donors_are_their_nearest_by_the_priors_means(
        store_path, dense_priors):
    # the pairs the channel's weight is chosen on (train/reference): each of some donors
    # with its K nearest among them, by the means the prior ranks donors by beyond
    # dense_limit (GloScope: its windows of cells; pseudobulk: all cells), by a plain loop
    store = BagStore(store_path)
    donors = np.arange(1, store.n_donors, 2)
    full_means = np.stack([store.donor_rows(i).astype(np.float64).mean(axis=0)
                           for i in range(store.n_donors)])
    window_means = np.stack([s.mean(axis=0) for s in _first_rows(store, 300)])
    for kind, means in (("pseudobulk", full_means), ("gloscope", window_means)):
        sub = means[donors]
        expected = set()
        for i in range(len(donors)):
            cosine = [float(sub[i] @ sub[j] / np.linalg.norm(sub[i]) / np.linalg.norm(sub[j]))
                      if j != i else -np.inf for j in range(len(donors))]
            for j in np.argsort(cosine)[::-1][:3]:
                expected.add((min(i, int(j)), max(i, int(j))))
        a, b = neighbour_pairs(store, dense_priors[kind], donors, 3)
        assert set(zip(a.tolist(), b.tolist(), strict=True)) == expected, kind


def test_values_at_reads_stored_pairs_and_marks_the_rest_missing():
    prior = symmetric_graph(5, np.array([0, 1]), np.array([1, 3]), np.array([0.5, 0.7]),
                            "gloscope", {}, {})
    got = prior.values_at(np.array([0, 1, 3, 2, 4, 0]), np.array([1, 0, 1, 4, 4, 4]))
    np.testing.assert_allclose(got, [0.5, 0.5, 0.7, np.nan, 1.0, np.nan], rtol=1e-6)
    dense = prior.to_dense()
    a, b = np.divmod(np.arange(25), 5)
    stored = dense[a, b] != 0
    np.testing.assert_allclose(prior.values_at(a, b)[stored], dense[a, b][stored])


def test_windows_of_some_donors_are_their_windows_among_all(store_path):
    store = BagStore(store_path)
    cells, offsets = _read_subsamples(store, 40, 2, lambda a, b: store.features[a:b])
    donors = np.array([4, 1, 7])
    some, some_offsets = _read_subsamples(store, 40, 2, lambda a, b: store.features[a:b],
                                          donors)
    for i, donor in enumerate(donors):
        np.testing.assert_array_equal(some[some_offsets[i]:some_offsets[i + 1]],
                                      cells[offsets[donor]:offsets[donor + 1]])


@pytest.mark.ray
def test_gloscope_similarity_is_higher_within_a_severity(store_path, dense_priors):
    """The simulated severity changes cell states and composition: donors of the same
    severity must be more alike than a random relabelling of the donors makes them."""
    severity = BagStore(store_path).donors["severity"].to_numpy()
    assert np.all(severity >= 0)
    sim = dense_priors["gloscope"].to_dense()
    off = ~np.eye(len(severity), dtype=bool)

    def gap(labels: np.ndarray) -> float:
        same = labels[:, None] == labels[None, :]
        return float(sim[same & off].mean() - sim[~same].mean())

    rng = np.random.default_rng(0)
    null = [gap(rng.permutation(severity)) for _ in range(200)]
    assert gap(severity) > 0
    assert gap(severity) > np.quantile(null, 0.95)


@pytest.mark.ray
@pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")
def test_save_load_replace_and_missing(store_path, dense_priors, tmp_path):
    store_copy = tmp_path / "bags.zarr"  # without the prior a default training run built
    shutil.copytree(store_path, store_copy, ignore=shutil.ignore_patterns("priors"))
    store = str(store_copy)
    with pytest.raises(InputError, match=f"sampleclr-scale prior --store {store} --kind gloscope"):
        load_prior(store, "gloscope")
    assert available_priors(store) == []

    first = dense_priors["gloscope"]
    save_prior(store, first)
    loaded = load_prior(store, "gloscope")
    for name in ("rows", "cols", "values"):
        assert np.array_equal(getattr(loaded, name), getattr(first, name))
        assert getattr(loaded, name).dtype == getattr(first, name).dtype
    assert loaded.params == first.params and loaded.n_donors == first.n_donors
    assert loaded.timings == first.timings

    smaller = PriorGraph(n_donors=first.n_donors, rows=np.arange(first.n_donors),
                         cols=np.arange(first.n_donors),
                         values=np.ones(first.n_donors, np.float32), kind="gloscope",
                         params={"mode": "test"})
    save_prior(store, smaller)
    save_prior(store, dense_priors["pseudobulk"])
    assert load_prior(store, "gloscope").params == {"mode": "test"}
    assert len(load_prior(store, "gloscope").values) == first.n_donors
    assert available_priors(store) == ["gloscope", "pseudobulk"]
    assert sorted(p.name for p in (store_copy / "priors").iterdir()) == [
        "gloscope", "pseudobulk", "zarr.json"]  # no staging directories left

    group = zarr.open_group(store, mode="r")
    assert "priors" in group.group_keys()
    reopened = BagStore(store)
    assert np.array_equal(reopened.features[:], BagStore(store_path).features[:])

    broken = PriorGraph(n_donors=first.n_donors, rows=np.arange(first.n_donors),
                        cols=np.arange(first.n_donors), values=np.array(["x"] * first.n_donors),
                        kind="gloscope")
    with pytest.raises(ValueError):
        save_prior(store, broken)  # fails half-way: the stored prior stays as it was
    assert load_prior(store, "gloscope").params == {"mode": "test"}
    assert sorted(p.name for p in (store_copy / "priors").iterdir()) == [
        "gloscope", "pseudobulk", "zarr.json"]

    wrong = PriorGraph(n_donors=3, rows=np.arange(3), cols=np.arange(3),
                       values=np.ones(3, np.float32), kind="gloscope")
    with pytest.raises(InputError, match="does not fit"):
        save_prior(store, wrong)
    with pytest.raises(InputError, match="unknown prior kind"):
        load_prior(store, "cosine")


def test_every_prior_kind_has_its_builder():
    from sampleclr_scale._types import PRIOR_KINDS
    from sampleclr_scale.prior.build import PRIOR_BUILDERS

    assert set(PRIOR_BUILDERS) == set(PRIOR_KINDS)
