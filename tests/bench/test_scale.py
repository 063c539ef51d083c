"""The evaluate stage of `bench scale` on the test store (the other stages need Ray and
are the benchmark's own business)."""

from __future__ import annotations

import numpy as np
import pytest

from sampleclr_scale.bench.scale import evaluate_stage
from sampleclr_scale.evaluate import report
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.pseudobulk import donor_means
from tests.evaluate.test_evaluate import _write_embedding


def test_evaluate_stage(store_path, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_umap_module", lambda: None)  # PCA maps: no umap import
    store = BagStore(store_path)
    Z = donor_means(store) + 0.05 * np.random.default_rng(0).normal(size=(store.n_donors, 8))
    emb = _write_embedding(tmp_path / "emb", store, Z, 0)
    figures = evaluate_stage(store_path, str(emb), str(tmp_path / "report"))
    assert figures["donors"] == store.n_donors and figures["path"] == "dense"
    assert figures["map_donors"] == store.n_donors
    assert 0.0 <= figures["sampleclr_total"] <= 1.0
    assert (tmp_path / "report" / "report.md").is_file()


def test_donor_sizes_put_the_cells_in_about_the_donors_asked_for():
    import math

    from sampleclr_scale.bench.ingest import cells_per_donor_range

    for n_cells, n_donors in ((50_000_000, 15_000), (2_000_000, 800), (10_000, 3)):
        lo, hi = cells_per_donor_range(n_cells, n_donors)
        assert abs(hi - 10 * lo) <= 5  # a tenfold range, rounded
        mean = (hi - lo) / math.log(hi / lo)  # of the log-uniform sizes
        assert round(n_cells / mean) == pytest.approx(n_donors, rel=0.01)
    assert cells_per_donor_range(50_000_000, 15_000) == (853, 8528)  # the committed run's
