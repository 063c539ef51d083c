"""The cell-type-aware baselines and the confounding table against plain loops."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from sampleclr_scale.evaluate import celltype_baselines as cb
from sampleclr_scale.evaluate.confounding import (
    confounding_sentences,
    confounding_table,
    cramers_v,
)


@pytest.fixture
def tiny() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    n_donors, n_types, n = 6, 3, 400
    donor = np.sort(rng.integers(0, n_donors, n))
    types = rng.integers(-1, n_types, n)  # -1: no cell type
    types[(donor == 2) & (types == 1)] = 0  # donor 2 lacks type 1
    rows = rng.normal(size=(n, 4)) * rng.uniform(0.5, 3, 4) + 10
    batch = np.array([0, 0, 1, 1, 1, 0])
    return {"rows": rows, "donor": donor, "types": types, "batch": batch,
            "n_donors": n_donors, "n_types": n_types}


def _loop_moments(t: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    N, K, d = t["n_donors"], t["n_types"], t["rows"].shape[1]
    count, mean, m2 = np.zeros((N, K), int), np.zeros((N, K, d)), np.zeros((N, K, d))
    for i in range(N):
        for k in range(K):
            x = t["rows"][(t["donor"] == i) & (t["types"] == k)]
            count[i, k] = len(x)
            if len(x):
                mean[i, k] = x.mean(0)
                m2[i, k] = ((x - x.mean(0)) ** 2).sum(0)
    return count, mean, m2


def test_type_moments_match_a_loop_whatever_the_slicing(tiny: dict) -> None:
    expected = _loop_moments(tiny)
    got = cb.type_moments(tiny["rows"], tiny["donor"], tiny["types"], tiny["n_donors"],
                          tiny["n_types"])
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-9)
    moments = cb.TypeMoments(tiny["n_donors"], tiny["n_types"], 4)
    for lo in range(0, 400, 37):
        sl = slice(lo, lo + 37)
        moments.add_cells(tiny["rows"][sl], tiny["donor"][sl], tiny["types"][sl])
    for a, b in zip(moments.arrays(), expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-9)


def test_standardized_type_means_match_cells_standardised_per_pair(tiny: dict) -> None:
    t = tiny
    count, mean, m2 = _loop_moments(t)
    got = cb.standardized_type_means(count, mean, m2, t["batch"]).reshape(6, 3, 4)
    cell_batch = t["batch"][t["donor"]]
    for i in range(6):
        for k in range(3):
            own = (t["donor"] == i) & (t["types"] == k)
            if not own.any():
                np.testing.assert_array_equal(got[i, k], 0.0)
                continue
            pair = t["rows"][(cell_batch == t["batch"][i]) & (t["types"] == k)]
            z = (t["rows"][own] - pair.mean(0)) / pair.std(0)
            np.testing.assert_allclose(got[i, k], z.mean(0), atol=1e-9)


def test_type_pseudobulk_fills_missing_types_and_centres_per_batch(tiny: dict) -> None:
    count, mean, _ = _loop_moments(tiny)
    plain = cb.type_pseudobulk(count, mean).reshape(6, 3, 4)
    have = [i for i in range(6) if count[i, 1] > 0]
    np.testing.assert_allclose(plain[2, 1], mean[have, 1].mean(0))
    np.testing.assert_allclose(plain[0, 0], mean[0, 0])
    centred = cb.type_pseudobulk(count, mean, tiny["batch"]).reshape(6, -1)
    for b in (0, 1):
        np.testing.assert_allclose(centred[tiny["batch"] == b].mean(0), 0.0, atol=1e-9)


def test_cramers_v_and_the_confounding_table() -> None:
    a = np.array(list("aabbccaabbcc"))
    assert cramers_v(a, a) == pytest.approx(1.0)
    b = np.array(list("xyxyxyxyxyxy"))
    table = pd.crosstab(a, b).to_numpy()
    n = table.sum()
    chi2 = sum((table[i, j] - table[i].sum() * table[:, j].sum() / n) ** 2
               / (table[i].sum() * table[:, j].sum() / n)
               for i in range(3) for j in range(2))
    assert cramers_v(a, b) == pytest.approx(math.sqrt(chi2 / (n * 1)))
    assert cramers_v(a, np.zeros(12)) == 0.0
    rng = np.random.default_rng(0)
    donors = pd.DataFrame({"severity": np.arange(200) % 4, "age": rng.normal(50, 10, 200)})
    donors["site"] = np.where(donors["severity"] == 3, "s0", rng.choice(["s1", "s2"], 200))
    donors["sex"] = rng.choice(["f", "m"], 200)
    out = confounding_table(donors, {"severity": "ordinal", "age": "continuous"},
                            {"site": "categorical", "sex": "categorical"})
    assert out["severity"]["site"]["cramers_v"] > 0.7 > 0.3 > out["severity"]["sex"]["cramers_v"]
    assert out["severity"]["site"]["ami"] > 0.3 and out["age"]["site"]["n"] == 200
    assert out["severity"]["site"]["p_value"] < 1e-6 < out["severity"]["sex"]["p_value"]
    assert "Confounded: severity with site" in confounding_sentences(out)[0]
    donors["site"] = rng.choice(["s1", "s2"], 200)
    calm = confounding_table(donors, {"severity": "ordinal"}, {"site": "categorical"})
    assert confounding_sentences(calm)[0].startswith("No relevant covariate")
