"""Tests of the simulator's per-cell-type site effects, new scenarios and confounded design."""

from __future__ import annotations

import dataclasses

import anndata
import numpy as np
import pandas as pd
import pytest

from sampleclr_scale.errors import InputError
from sampleclr_scale.simulate.cohorts import (
    CELL_TYPE_SITE_EFFECTS,
    CohortSpec,
    ground_truth,
    simulate_cells,
    simulate_donors,
)
from sampleclr_scale.simulate.site_effects import SiteEffects, confounded_sites

SMALL = dict(n_donors=40, min_cells=150, max_cells=300, n_genes=3, embedding_dim=8, seed=3)


def _cells(spec: CohortSpec) -> anndata.AnnData:
    return anndata.concat(list(simulate_cells(spec, simulate_donors(spec))), merge="same")


def test_effects_off_leave_old_cohorts_unchanged_bit_for_bit() -> None:
    plain = CohortSpec.for_scenario("shape", **SMALL)
    a = _cells(plain)
    effects = SiteEffects.draw(3, 4, 10, 8, 0.0, 0.0)
    assert not effects.type_shifts.any() and (effects.gains == 1).all()
    b = _cells(dataclasses.replace(plain, site_type_effect=0.0, site_gain=0.0))
    np.testing.assert_array_equal(a.obsm["scvi"], b.obsm["scvi"])


def test_apply_is_gain_then_type_shift() -> None:
    effects = SiteEffects.draw(0, 2, 3, 4, 1.0, 0.5)
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    types = np.array([2, 0, 2])
    expected = np.stack([x[i] * effects.gains[1] + effects.type_shifts[1, types[i]]
                         for i in range(3)])
    np.testing.assert_allclose(effects.apply(x, types, 1), expected)


def test_site_type_shift_differs_per_cell_type_and_survives_site_centring() -> None:
    # Centring each site's cells (removing its mean shift) leaves a per-type site residue.
    spec = CohortSpec.for_scenario("shape", **SMALL, site_type_effect=1.0, site_effect=0.0)
    cells = _cells(spec)
    z = pd.DataFrame(cells.obsm["scvi"].astype(np.float64))
    site, ctype = cells.obs["dataset_id"].astype(str), cells.obs["cell_type"].astype(str)
    centred = z - z.groupby(site.to_numpy()).transform("mean")
    type_means = centred.groupby([site.to_numpy(), ctype.to_numpy()]).mean()
    spread = type_means.groupby(level=1).std().to_numpy().mean()
    plain = _cells(dataclasses.replace(spec, site_type_effect=0.0))
    z0 = pd.DataFrame(plain.obsm["scvi"].astype(np.float64))
    c0 = z0 - z0.groupby(site.to_numpy()).transform("mean")
    spread0 = c0.groupby([site.to_numpy(), ctype.to_numpy()]).mean().groupby(
        level=1).std().to_numpy().mean()
    assert spread > 0.5 > 2 * spread0


def test_site_gain_scales_features_per_site() -> None:
    spec = CohortSpec.for_scenario("shape", **SMALL, site_gain=0.5, site_effect=0.0)
    cells = _cells(spec)
    z = pd.DataFrame(cells.obsm["scvi"].astype(np.float64))
    sd = z.groupby(cells.obs["dataset_id"].astype(str).to_numpy()).std()
    ratio = (sd.max() / sd.min()).to_numpy()
    assert ratio.max() > 1.5


def test_composition_scenario_moves_two_types_only() -> None:
    truth = ground_truth(CohortSpec.for_scenario("composition"))
    moved = {t: v["composition"] for t, v in truth["cell_types"].items() if v["composition"]}
    assert set(moved) == {"CD14 monocyte", "CD4 T cell"}
    assert moved["CD14 monocyte"] > 0 > moved["CD4 T cell"]
    assert all(v["shape"] is None for v in truth["cell_types"].values())
    for name, value in CELL_TYPE_SITE_EFFECTS.items():
        assert truth[name] == value
    spec = CohortSpec.for_scenario("composition", **SMALL)
    obs = _cells(spec).obs
    share = obs.groupby("severity")["cell_type"].apply(lambda t: (t == "CD14 monocyte").mean())
    assert share.iloc[-1] > 1.5 * share.iloc[0]
    assert set(obs["cell_state"]) == {"base"}


def test_realistic_scenario_shifts_one_type_and_splits_another() -> None:
    spec = CohortSpec.for_scenario("realistic", **SMALL)
    truth = ground_truth(spec)
    shapes = {t: v["shape"] for t, v in truth["cell_types"].items() if v["shape"]}
    assert shapes == {"CD14 monocyte": "shift", "CD8 T cell": "split"}
    assert truth["cell_types"]["CD14 monocyte"]["composition"] == pytest.approx(
        0.5 * ground_truth(CohortSpec.for_scenario("composition"))["cell_types"][
            "CD14 monocyte"]["composition"], rel=0.2)
    cells = _cells(dataclasses.replace(spec, site_type_effect=0.0, site_gain=0.0,
                                       site_effect=0.0))
    obs, z = cells.obs, cells.obsm["scvi"].astype(np.float64)
    mono = (obs["cell_type"] == "CD14 monocyte").to_numpy()
    top = obs["severity"].to_numpy() == spec.severity_levels - 1
    low = obs["severity"].to_numpy() == 0
    shift = np.linalg.norm(z[mono & top].mean(0) - z[mono & low].mean(0))
    assert shift > 1.5  # 1.5 * 3 * 0.6 = 2.7 along the program, less donor noise
    assert set(obs["cell_state"][mono & top]) == {"shift"}
    cd8 = (obs["cell_type"] == "CD8 T cell").to_numpy()
    assert set(obs["cell_state"][cd8 & top]) == {"split+", "split-"}


def test_confounding_puts_the_most_severe_donors_in_site_zero() -> None:
    donors = simulate_donors(CohortSpec(n_donors=200, confounding=0.9, seed=1))
    table = pd.crosstab(donors["dataset_id"], donors["severity"])
    assert table.loc["site-0", 3] > 0.75 * table[3].sum()
    assert table.sum(axis=1).max() - table.sum(axis=1).min() <= 1  # site sizes kept
    assert simulate_donors(CohortSpec(n_donors=200, seed=1))["severity"].equals(
        donors["severity"])


def test_confounded_sites_properties_against_a_plain_loop() -> None:
    rng = np.random.default_rng(0)
    sites = rng.integers(0, 4, 100)
    severity = rng.integers(0, 4, 100)
    assert confounded_sites(sites, severity, 4, 4, 0.0, 0) is sites
    moved = confounded_sites(sites, severity, 4, 4, 1.0, 0)
    assert np.array_equal(np.bincount(moved, minlength=4), np.bincount(sites, minlength=4))
    # every top donor outside site 0 moved while site 0 had lower-level donors to swap
    outside = [i for i in range(100) if severity[i] == 3 and sites[i] != 0]
    swappable = [i for i in range(100) if severity[i] != 3 and sites[i] == 0]
    assert sum(moved[i] == 0 for i in outside) == min(len(outside), len(swappable))


@pytest.mark.parametrize("change", [{"site_gain": -1.0}, {"site_type_effect": float("nan")},
                                    {"confounding": 1.5}])
def test_bad_site_effects_are_input_errors(change: dict[str, float]) -> None:
    with pytest.raises(InputError, match=next(iter(change))):
        CohortSpec(**change)
