"""The donor-search benchmark's parts: exact neighbours, recall, and a tiny run."""

from __future__ import annotations

import numpy as np

from sampleclr_scale.bench.search import (
    bench_search,
    exact_neighbours,
    recall_at,
    search_table,
    simulated_donors,
)


def test_exact_neighbours_and_recall():
    X = simulated_donors(300, 8, seed=0)
    Q = simulated_donors(20, 8, seed=1)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    q = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    expected = np.argsort(-(q @ unit.T), axis=1)[:, :5]
    found = exact_neighbours(X, Q, 5, block=7)
    np.testing.assert_array_equal(found, expected)
    assert recall_at(found, expected) == 1.0
    assert recall_at(found[:, ::-1], expected) == 1.0  # order does not matter
    assert recall_at(np.zeros_like(found) - 1, expected) == 0.0


def test_a_tiny_run_gives_the_table(tmp_path):
    figures = bench_search([400], dim=8, queries=30, k=10, workdir=tmp_path, compare_max=0)
    row = figures["sizes"][0]
    assert row["exact"]["recall"] == 1.0 and "pynndescent" not in row
    assert row["hnsw"]["ef_search"]["128"]["recall"] >= 0.95
    assert row["hnsw"]["rebuilt_on_open"] is False
    table = search_table(figures)
    assert "| 400 | HNSW, ef_search 128 (default) |" in table
