"""Evaluation without a donors x donors matrix (evaluate/neighbours.py) against the dense
path of evaluate/spare.py as the reference: the blocked exact kNN, the sparse kernel and
pseudotime, every SPARE score, and the whole `evaluate` forced onto the blocked path."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from sampleclr_scale.evaluate import EvaluateConfig, evaluate, report
from sampleclr_scale.evaluate import neighbours as nb
from sampleclr_scale.evaluate.spare import (
    _kernel,
    cosine_distances,
    diffusion_pseudotime,
    replicate_score,
    spare_scores,
)
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.pseudobulk import donor_means
from tests.evaluate.test_evaluate import _write_embedding, _write_run

SMALL_BLOCK = 997  # distances per block: many blocks of a few rows, a ragged last one


def _cohort(n: int = 240, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """Donors along a severity trajectory, with missing labels, replicates and ties."""
    rng = np.random.default_rng(seed)
    position = np.sort(rng.uniform(0, 3, n))
    Z = np.column_stack([np.cos(position), np.sin(position), 0.05 * rng.normal(size=(n, 4))])
    Z[7] = Z[8]  # two donors at distance 0: a tie broken by donor order
    Z[20] = 0.0  # a zero vector: distance 1 to everyone
    donors = pd.DataFrame({
        "disease": np.where(position > 1.5, "covid", "healthy").astype(object),
        "severity": np.floor(position).astype(float),
        "age": 40 + 10 * position + rng.normal(size=n),
        "site": rng.choice(["a", "b", "c"], n),
        "person": [f"p{i // 2}" if i < 60 else None for i in range(n)],
    })
    donors.loc[rng.choice(n, 25, replace=False), "disease"] = None
    donors.loc[rng.choice(n, 15, replace=False), "age"] = np.nan
    return Z, donors


COVARIATES = SimpleNamespace(
    relevant={"disease": "categorical", "severity": "ordinal", "age": "continuous"},
    technical={"site": "categorical"}, trajectory="severity", trajectory_root="min",
    replicate_column="person", k=3, trajectory_k=15)


def _flat(scores: dict) -> dict:
    """The nested scores of spare_scores as one flat mapping."""
    flat = {}
    for key, value in scores.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{name}": v for name, v in value.items()})
        else:
            flat[key] = value
    return flat


def _dense_neighbours(D: np.ndarray, k: int) -> np.ndarray:
    others = np.where(np.eye(len(D), dtype=bool), np.inf, D)
    return np.argsort(others, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("k", [1, 3, 15])
def test_blocked_knn_is_the_dense_stable_order(k):
    Z, _ = _cohort()
    D = cosine_distances(Z)
    found = nb.cosine_knn(Z, k, entries=SMALL_BLOCK)
    expected = _dense_neighbours(D, k)
    np.testing.assert_array_equal(found.indices, expected)
    np.testing.assert_allclose(found.distances, np.take_along_axis(D, expected, axis=1),
                               rtol=0, atol=1e-12)
    assert found.indices[7, 0] == 8 and found.indices[8, 0] == 7


def test_ties_are_taken_in_donor_order():
    Z = np.array([[1.0, 0.0]] * 5 + [[0.0, 1.0]])  # five identical donors
    found = nb.cosine_knn(Z, 3, entries=2)
    np.testing.assert_array_equal(found.indices[:5], [[1, 2, 3], [0, 2, 3], [0, 1, 3],
                                                      [0, 1, 2], [0, 1, 2]])
    np.testing.assert_array_equal(found.indices[5], [0, 1, 2])


def test_blocks_bound_the_distances_held():
    blocks = list(nb.row_blocks(1000, 250, entries=1000))
    assert all(b.stop - b.start <= 4 for b in blocks)
    assert blocks[0].start == 0 and blocks[-1].stop == 1000


def test_sparse_kernel_is_the_dense_kernel():
    Z, _ = _cohort()
    D = cosine_distances(Z)
    W = nb.sparse_kernel(nb.cosine_knn(Z, 15, entries=SMALL_BLOCK)).toarray()
    np.testing.assert_allclose(W, _kernel(D, 15), rtol=1e-12, atol=1e-14)


def test_sparse_pseudotime_equals_the_dense_one():
    Z, _ = _cohort()
    neighbours = nb.cosine_knn(Z, 15)
    dense = diffusion_pseudotime(cosine_distances(Z), root=0, k=15)
    np.testing.assert_allclose(nb.sparse_pseudotime(neighbours, root=0), dense,
                               rtol=1e-9, atol=1e-9)


def test_leading_components_order_donors_as_all_components():
    Z, _ = _cohort(n=600, seed=1)
    neighbours = nb.cosine_knn(Z, 15)
    full = nb.sparse_pseudotime(neighbours, root=0)
    leading = nb.sparse_pseudotime(neighbours, root=0, exact_limit=10)
    assert stats.spearmanr(full, leading).statistic > 0.95


def test_blocked_replicates_equal_dense():
    Z, donors = _cohort()
    assert nb.blocked_replicate_score(Z, donors["person"], entries=SMALL_BLOCK) == (
        pytest.approx(replicate_score(cosine_distances(Z), donors["person"]), abs=1e-12))
    assert nb.blocked_replicate_score(Z, [None] * len(Z)) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blocked_scores_equal_dense_scores(seed, monkeypatch):
    monkeypatch.setattr(nb, "BLOCK_ENTRIES", SMALL_BLOCK)
    Z, donors = _cohort(seed=seed)
    dense = spare_scores(cosine_distances(Z), donors, COVARIATES)
    blocked = nb.blocked_spare_scores(Z, donors, COVARIATES)
    assert _flat(blocked) == pytest.approx(_flat(dense), abs=1e-12)
    assert dense["trajectory"] > 0.5 and dense["information"]["severity"] > 0.5


def test_the_switch_and_the_map_sample():
    assert nb.distances_if_small(np.ones((3, 2))).shape == (3, 3)
    assert nb.distances_if_small(np.ones((nb.DENSE_LIMIT + 1, 2))) is None
    np.testing.assert_array_equal(nb.map_sample(10, limit=20), np.arange(10))
    drawn = nb.map_sample(1000, limit=50)
    assert len(np.unique(drawn)) == 50 and np.all(np.diff(drawn) > 0)
    np.testing.assert_array_equal(drawn, nb.map_sample(1000, limit=50))


def test_evaluate_on_the_blocked_path_equals_the_dense_one(store_path, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_umap_module", lambda: None)  # PCA maps: no umap import
    store = BagStore(store_path)
    rng = np.random.default_rng(0)
    severity = store.donors["severity"].to_numpy(np.float64)[:, None]
    Z = np.hstack([donor_means(store), 2.0 * severity]) + 0.05 * rng.normal(
        size=(store.n_donors, 9))
    emb = str(_write_embedding(tmp_path / "sampleclr", store, Z, 0, _write_run(tmp_path / "r")))
    dense = evaluate([emb], store_path, str(tmp_path / "dense"), EvaluateConfig(seeds=2))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nb, "DENSE_LIMIT", 0)
        patch.setattr(nb, "MAP_DONORS", store.n_donors - 3)
        blocked = evaluate([emb], store_path, str(tmp_path / "blocked"),
                           EvaluateConfig(seeds=2))
    for name, method in dense["methods"].items():
        assert blocked["methods"][name]["mean"] == pytest.approx(method["mean"], abs=1e-12)
        if "held_out" in method:
            assert blocked["methods"][name]["held_out"]["mean"] == pytest.approx(
                method["held_out"]["mean"], abs=1e-12)
    assert blocked["map_donors"] == store.n_donors - 3
    assert dense["map_donors"] == store.n_donors
    saved = json.loads((tmp_path / "blocked" / "metrics.json").read_text())
    assert saved["map_donors"] == store.n_donors - 3
    assert "a uniform sample of" in (tmp_path / "blocked" / "report.md").read_text()
