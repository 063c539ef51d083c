"""Tests of the synthetic cohort generator and its h5ad / SOMA / Census-shaped writers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import anndata
import cellxgene_census
import numpy as np
import pandas as pd
import pytest
import tiledbsoma
from scipy import sparse, stats

from sampleclr_scale.errors import InputError
from sampleclr_scale.simulate.cohorts import (
    CensusDataset,
    CohortSpec,
    ground_truth,
    simulate_cells,
    simulate_donors,
    write_h5ad,
    write_soma,
)

TINY = CohortSpec(
    n_donors=12,
    min_cells=50,
    max_cells=150,
    n_genes=20,
    embedding_dim=8,
    duplicate_fraction=0.1,
    special_donor_cells=15,
    seed=7,
)
CENSUS_COLUMNS = [
    "dataset_id",
    "donor_id",
    "cell_type",
    "disease",
    "tissue",
    "tissue_general",
    "assay",
    "sex",
    "development_stage",
]


def _cells(spec: CohortSpec, chunk_cells: int = 200_000) -> list[anndata.AnnData]:
    return list(simulate_cells(spec, simulate_donors(spec), chunk_cells))


def _concat(chunks: list[anndata.AnnData]) -> anndata.AnnData:
    return anndata.concat(chunks, merge="same")


def _assert_same(a: anndata.AnnData, b: anndata.AnnData, embedding: str) -> None:
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    assert (a.X != b.X).nnz == 0
    np.testing.assert_array_equal(a.obsm[embedding], b.obsm[embedding])


def _donor_key(obs: pd.DataFrame) -> pd.Series:
    """Census donors are identified by (dataset_id, donor_id)."""
    return obs["dataset_id"].astype(str) + "/" + obs["donor_id"].astype(str)


@pytest.fixture(scope="module")
def tiny() -> anndata.AnnData:
    return _concat(_cells(TINY))


def test_same_seed_same_data_whatever_the_chunking(tiny: anndata.AnnData) -> None:
    chunks = _cells(TINY, chunk_cells=250)
    assert len(chunks) > 3
    _assert_same(_concat(chunks), tiny, TINY.embedding_name)
    _assert_same(_concat(_cells(TINY)), tiny, TINY.embedding_name)
    other = _concat(_cells(dataclasses.replace(TINY, seed=8)))
    assert other.n_obs != tiny.n_obs or not np.array_equal(other.obsm["scvi"], tiny.obsm["scvi"])


def test_chunks_are_whole_donors_in_order() -> None:
    donors = simulate_donors(TINY)
    chunks = _cells(TINY, chunk_cells=250)
    seen: list[str] = []
    for chunk in chunks:
        keys = pd.unique(chunk.obs_names.str.split("-").str[0])
        assert chunk.n_obs <= 250 or len(keys) == 1
        seen.extend(keys)
    assert seen == [f"d{i}" for i in donors.index] + ["pooled", "unknown"]
    dtypes = {tuple(c.obs.dtypes) for c in chunks}
    categories = {tuple(tuple(c.obs[k].cat.categories) for k in CENSUS_COLUMNS) for c in chunks}
    assert len(dtypes) == 1 and len(categories) == 1


def test_donor_table() -> None:
    spec = CohortSpec(n_donors=40, seed=1)
    donors = simulate_donors(spec)
    assert list(donors.columns) == [
        "dataset_id",
        "donor_id",
        "disease",
        "severity",
        "age",
        "sex",
        "assay",
        "n_cells",
    ]
    assert list(donors.index) == list(range(40))
    assert np.bincount(donors["severity"]).tolist() == [10, 10, 10, 10]
    assert ((donors["severity"] == 0) == (donors["disease"] == "normal")).all()
    assert donors["age"].between(20, 85).all()
    assert donors["n_cells"].between(spec.min_cells, spec.max_cells).all()
    assert donors.groupby("dataset_id")["assay"].nunique().eq(1).all()
    assert donors["assay"].nunique() == 2
    assert not donors.duplicated(["dataset_id", "donor_id"]).any()
    assert donors["donor_id"].duplicated().any()  # free text, reused across datasets
    assert donors.dtypes["severity"] == np.int64 and donors.dtypes["age"] == np.float64


def test_obs_var_x_obsm_schema(tiny: anndata.AnnData) -> None:
    obs = tiny.obs
    for column in CENSUS_COLUMNS:
        assert isinstance(obs[column].dtype, pd.CategoricalDtype), column
    assert obs["is_primary_data"].dtype == bool
    assert obs["severity"].dtype == np.int64 and obs["age"].dtype == np.float64
    assert obs.index.is_unique and obs.index.dtype == object
    assert set(obs["tissue"]) == {"blood"} and set(obs["tissue_general"]) == {"blood"}
    assert set(obs["disease"]) == {"normal", "COVID-19"}
    assert len(obs["cell_type"].cat.categories) == 10
    primary = obs[obs["is_primary_data"] & (obs["severity"] >= 0)]
    stages = primary["age"].astype(int).astype(str) + "-year-old stage"
    assert (primary["development_stage"].astype(str) == stages).all()
    assert list(tiny.var.columns) == ["feature_id", "feature_name", "feature_length"]
    assert (tiny.var.index == tiny.var["feature_id"]).all()
    assert isinstance(tiny.X, sparse.csr_matrix) and tiny.X.dtype == np.float32
    assert np.array_equal(tiny.X.data, np.round(tiny.X.data)) and tiny.X.sum() > 0
    embedding = tiny.obsm["scvi"]
    assert embedding.shape == (tiny.n_obs, 8) and embedding.dtype == np.float32
    # the same donor_id names different donors in different datasets, as in Census
    per_id = obs.groupby("donor_id", observed=True)["dataset_id"].nunique()
    assert per_id.max() > 1


def test_duplicates_and_special_donors(tiny: anndata.AnnData) -> None:
    obs = tiny.obs
    donors = simulate_donors(TINY)
    copies = obs[~obs["is_primary_data"]]
    n_cells = [*donors["n_cells"], 15, 15]  # the pseudo-donors get duplicates too
    assert len(copies) == sum(round(0.1 * n) for n in n_cells)
    assert obs[obs["is_primary_data"] & (obs["severity"] >= 0)].shape[0] == donors["n_cells"].sum()
    z = tiny.obsm["scvi"]
    primary_rows = {row.tobytes() for row in z[obs["is_primary_data"].to_numpy()]}
    assert all(row.tobytes() in primary_rows for row in z[~obs["is_primary_data"].to_numpy()])
    for name in ("pooled", "unknown"):
        special = obs[obs["donor_id"] == name]
        assert special["is_primary_data"].sum() == 15
        assert (special["severity"] == -1).all() and special["age"].isna().all()
        assert set(special["sex"]) == {"unknown"} and set(special["development_stage"]) == {
            "unknown"
        }


def test_state_split_keeps_the_within_type_mean_and_widens_the_spread() -> None:
    # One cell type with a state effect, no site shift: per-donor means along the split
    # direction must not move with severity while the spread along it grows.
    spec = CohortSpec(
        n_donors=40,
        min_cells=150,
        max_cells=150,
        n_cell_types=1,
        n_genes=1,
        embedding_dim=16,
        site_effect=0.0,
        seed=3,
    )
    cells = _concat(_cells(spec))
    z = cells.obsm["scvi"].astype(np.float64)
    severity = cells.obs["severity"].to_numpy()
    top = spec.severity_levels - 1
    severe = z[severity == top] - z[severity == top].mean(axis=0)
    direction = np.linalg.eigh(severe.T @ severe)[1][:, -1]
    per_donor = (
        pd.DataFrame({"donor": _donor_key(cells.obs), "x": z @ direction, "severity": severity})
        .groupby("donor")
        .agg(mean=("x", "mean"), var=("x", "var"), severity=("severity", "first"))
    )
    healthy, sick = per_donor[per_donor["severity"] == 0], per_donor[per_donor["severity"] == top]
    shift = sick["mean"].mean() - healthy["mean"].mean()
    standard_error = np.sqrt(sick["mean"].var() / len(sick) + healthy["mean"].var() / len(healthy))
    spread_gain = sick["var"].mean() - healthy["var"].mean()
    expected_gain = (top * spec.state_effect) ** 2
    assert abs(shift) < 4 * standard_error
    assert spread_gain > 10 * (abs(shift) + 4 * standard_error)
    assert abs(spread_gain - expected_gain) < 0.25 * expected_gain


def test_monocyte_fraction_rises_with_severity() -> None:
    spec = CohortSpec(n_donors=80, min_cells=50, max_cells=100, n_genes=8, embedding_dim=8, seed=4)
    obs = _concat(_cells(spec)).obs
    per_donor = (
        pd.DataFrame(
            {
                "donor": _donor_key(obs),
                "monocyte": (obs["cell_type"] == "CD14 monocyte").to_numpy(),
                "severity": obs["severity"].to_numpy(),
            }
        )
        .groupby("donor")
        .agg(monocyte=("monocyte", "mean"), severity=("severity", "first"))
    )
    rho = stats.spearmanr(per_donor["severity"], per_donor["monocyte"]).statistic
    assert rho > 3 / np.sqrt(len(per_donor) - 1)  # three null standard deviations


def test_write_h5ad_round_trip(tmp_path: Path, tiny: anndata.AnnData) -> None:
    path = write_h5ad(TINY, tmp_path / "cohort.h5ad", chunk_cells=250)
    assert path == tmp_path / "cohort.h5ad"
    _assert_same(anndata.read_h5ad(path), tiny, TINY.embedding_name)
    assert [p.name for p in tmp_path.iterdir()] == ["cohort.h5ad"]  # no scratch left


def test_write_soma_round_trip(tmp_path: Path, tiny: anndata.AnnData) -> None:
    uri = write_soma(TINY, tmp_path / "exp", chunk_cells=250)
    assert uri == str(tmp_path / "exp")
    joinids = np.array([0, 1, 300, tiny.n_obs - 1])
    with tiledbsoma.Experiment.open(uri) as exp:
        obs = exp.obs.read().concat().to_pandas()
        assert (obs["soma_joinid"] == np.arange(tiny.n_obs)).all()
        assert (obs["obs_id"].to_numpy() == tiny.obs_names).all()
        for column in ("donor_id", "cell_type", "is_primary_data", "severity"):
            assert (obs[column].to_numpy() == tiny.obs[column].to_numpy()).all(), column
        rna = exp.ms["RNA"]
        coo = rna.obsm["scvi"].read((joinids,)).coos((tiny.n_obs, 8)).concat().to_scipy()
        np.testing.assert_array_equal(coo.tocsr()[joinids].toarray(), tiny.obsm["scvi"][joinids])
        x = rna.X["raw"].read((joinids,)).coos((tiny.n_obs, 20)).concat().to_scipy()
        np.testing.assert_array_equal(x.tocsr()[joinids].toarray(), tiny.X[joinids].toarray())
        var = rna.var.read().concat().to_pandas()
        assert list(var["feature_id"]) == list(tiny.var["feature_id"])
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]


def test_census_like_opens_with_cellxgene_census(tmp_path: Path, tiny: anndata.AnnData) -> None:
    uri = write_soma(TINY, tmp_path / "census", census_like=True, chunk_cells=250)
    with cellxgene_census.open_soma(uri=uri) as census:
        obs = cellxgene_census.get_obs(
            census,
            "homo_sapiens",
            value_filter="is_primary_data == True and donor_id != 'pooled'",
            column_names=["soma_joinid", "dataset_id", "donor_id", "severity"],
        )
        expected = tiny.obs["is_primary_data"] & (tiny.obs["donor_id"] != "pooled")
        assert len(obs) == expected.sum()
        assert (obs["soma_joinid"].to_numpy() == np.flatnonzero(expected.to_numpy())).all()
        summary = census["census_info"]["summary"].read().concat().to_pandas()
        values = dict(zip(summary["label"], summary["value"], strict=True))
        assert values["total_cell_count"] == str(tiny.n_obs)
        assert values["unique_cell_count"] == str(tiny.obs["is_primary_data"].sum())
        datasets = census["census_info"]["datasets"].read().concat().to_pandas()
        assert datasets["dataset_total_cell_count"].sum() == tiny.n_obs
        assert set(datasets["dataset_id"]) == set(tiny.obs["dataset_id"])
        adata = cellxgene_census.get_anndata(
            census, "homo_sapiens", obs_value_filter="dataset_id == 'site-0'"
        )
        assert adata.n_obs == (tiny.obs["dataset_id"] == "site-0").sum()


@pytest.mark.parametrize(
    "change",
    [
        {"min_cells": 500, "max_cells": 100},
        {"n_donors": 0},
        {"n_cell_types": 11},
        {"n_genes": 0},
        {"severity_levels": 1},
        {"duplicate_fraction": 1.5},
        {"state_effect": float("nan")},
        {"embedding_name": ""},
        {"seed": -1},
    ],
)
def test_bad_spec_is_an_input_error(change: dict[str, object]) -> None:
    with pytest.raises(InputError, match="CohortSpec"):
        CohortSpec(**change)  # type: ignore[arg-type]


def test_bad_simulate_cells_input_is_an_input_error() -> None:
    donors = simulate_donors(TINY)
    with pytest.raises(InputError, match="chunk_cells"):
        next(simulate_cells(TINY, donors, chunk_cells=0))
    with pytest.raises(InputError, match="lacks columns"):
        next(simulate_cells(TINY, donors.drop(columns="age")))
    with pytest.raises(InputError, match="dataset_id"):
        next(simulate_cells(TINY, donors.assign(dataset_id="site-9")))


LUNG = CensusDataset("lung-atlas", title="Lung", collection_name="Atlas",
                     diseases=("normal", "COPD"), tissues=("nose", "bronchus", "lung"),
                     tissues_per_donor=2, tissue_general="lung", assays=("10x 3' v2",),
                     suspension_types=("cell", "nucleus"))
BLOOD = CensusDataset("blood-study")


def test_census_datasets_relabel_the_sites_only() -> None:
    spec = dataclasses.replace(TINY, n_sites=2)
    plain = _concat(_cells(spec))
    labelled = _concat(list(simulate_cells(spec, simulate_donors(spec), 250,
                                           datasets=[LUNG, BLOOD])))
    # the same cells, donors and biology; only the dataset's labels change
    same = ["donor_id", "cell_type", "sex", "development_stage", "is_primary_data", "severity"]
    pd.testing.assert_frame_equal(plain.obs[same], labelled.obs[same])
    assert (plain.X != labelled.X).nnz == 0
    obs = labelled.obs
    assert (obs["dataset_id"].astype(str) == plain.obs["dataset_id"].map(
        {"site-0": "lung-atlas", "site-1": "blood-study"}).astype(str)).all()
    lung = obs[obs["dataset_id"] == "lung-atlas"]
    assert ((lung["severity"] > 0) == (lung["disease"] == "COPD")).all()
    assert set(lung["tissue_general"]) == {"lung"} and set(lung["assay"]) == {"10x 3' v2"}
    # each lung donor at two tissues, its primary cells split in halves; copies follow
    donor = lung.index.str.split("-").str[0]
    assert lung.groupby(donor, observed=True)["tissue"].nunique().eq(2).all()
    assert lung.groupby(donor, observed=True)["suspension_type"].nunique().eq(1).all()
    assert set(lung["suspension_type"]) == {"cell", "nucleus"}
    blood = obs[obs["dataset_id"] == "blood-study"]
    assert set(blood["tissue"]) == {"blood"} and set(blood["suspension_type"]) == {"cell"}
    assert (blood["assay"].astype(str) == plain.obs.loc[blood.index, "assay"].astype(str)).all()


def test_census_datasets_copies_keep_their_cells_tissue() -> None:
    spec = dataclasses.replace(TINY, n_sites=2, special_donor_cells=0)
    cells = _concat(list(simulate_cells(spec, simulate_donors(spec), datasets=[LUNG, BLOOD])))
    obs = cells.obs[cells.obs["dataset_id"] == "lung-atlas"]
    embedding = pd.DataFrame(cells.obsm["scvi"][(cells.obs["dataset_id"] == "lung-atlas")],
                             index=obs.index)
    key = embedding.round(6).astype(str).agg(",".join, axis=1)  # a copy has its cell's vector
    assert (~obs["is_primary_data"]).any()
    assert obs.groupby(key.to_numpy())["tissue"].nunique().eq(1).all()


def test_census_datasets_name_the_datasets_table(tmp_path: Path) -> None:
    spec = dataclasses.replace(TINY, n_sites=2)
    uri = write_soma(spec, tmp_path / "census", census_like=True, datasets=[LUNG, BLOOD])
    with cellxgene_census.open_soma(uri=uri) as census:
        datasets = census["census_info"]["datasets"].read().concat().to_pandas()
        obs = cellxgene_census.get_obs(census, "homo_sapiens",
                                       value_filter="dataset_id == 'lung-atlas'",
                                       column_names=["tissue", "suspension_type"])
    titles = dict(zip(datasets["dataset_id"], datasets["dataset_title"], strict=True))
    assert titles == {"lung-atlas": "Lung", "blood-study": "Synthetic cohort"}
    assert set(datasets["collection_name"]) == {"Atlas", "sampleclr_scale synthetic cohort"}
    assert set(obs["tissue"]) == {"nose", "bronchus", "lung"}


@pytest.mark.parametrize(("change", "message"), [
    ({"dataset_id": ""}, "CensusDataset.dataset_id"),
    ({"diseases": ()}, "CensusDataset.diseases"),
    ({"tissues": ["blood"]}, "CensusDataset.tissues"),
    ({"tissues_per_donor": 0}, "CensusDataset.tissues_per_donor"),
])
def test_bad_census_dataset_is_an_input_error(change: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        dataclasses.replace(BLOOD, **change)


def test_census_datasets_must_be_one_per_site() -> None:
    donors = simulate_donors(TINY)  # four sites
    for datasets in ([BLOOD, LUNG], [BLOOD, BLOOD, LUNG, LUNG], ["blood-study"] * 4):
        with pytest.raises(InputError, match="one per site"):
            simulate_cells(TINY, donors, datasets=datasets)


def test_existing_output_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    for write in (write_h5ad, write_soma):
        with pytest.raises(InputError, match="already exists") as caught:
            write(TINY, target)
        assert str(target) in str(caught.value) and "delete it" in str(caught.value)
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


_SHAPE_TYPES = {"CD14 monocyte": "split", "CD4 T cell": "spread", "B cell": "substate"}


def _shape_cells(**overrides):
    spec = CohortSpec.for_scenario("shape", n_donors=24, min_cells=400, max_cells=400,
                                   n_genes=2, embedding_dim=16, site_effect=0.0, seed=5,
                                   **overrides)
    return spec, _concat(_cells(spec))


def test_shape_scenario_changes_within_type_shapes_only() -> None:
    # Each shape type's state moves along one direction with severity without moving
    # the type's mean; composition does not follow severity.
    spec, cells = _shape_cells()
    obs, z = cells.obs, cells.obsm["scvi"].astype(np.float64)
    donor = np.asarray(_donor_key(obs))
    top = spec.severity_levels - 1
    for cell_type, shape in _SHAPE_TYPES.items():
        of_type = (obs["cell_type"] == cell_type).to_numpy()
        severe = of_type & (obs["severity"] == top).to_numpy()
        centred = z[severe] - pd.DataFrame(z[severe]).groupby(donor[severe]).transform("mean")
        direction = np.linalg.eigh(centred.T.to_numpy() @ centred.to_numpy())[1][:, -1]
        table = pd.DataFrame({"donor": donor[of_type], "x": z[of_type] @ direction,
                              "severity": obs["severity"].to_numpy()[of_type]})
        per_donor = table.groupby("donor").agg(mean=("x", "mean"), var=("x", "var"),
                                               severity=("severity", "first"))
        healthy, sick = (per_donor[per_donor["severity"] == s] for s in (0, top))
        noise = np.sqrt(sick["mean"].var() / len(sick) + healthy["mean"].var() / len(healthy))
        assert abs(sick["mean"].mean() - healthy["mean"].mean()) < 4 * noise, cell_type
        assert sick["var"].mean() > 1.5 * healthy["var"].mean(), cell_type
        states = set(obs["cell_state"][of_type & (obs["severity"] == top).to_numpy()])
        assert states >= {"split": {"split+", "split-"}, "spread": {"spread"},
                          "substate": {"substate"}}[shape]
    unchanged = ~obs["cell_type"].isin(list(_SHAPE_TYPES)).to_numpy()
    assert set(obs["cell_state"][unchanged]) == {"base"}
    assert set(obs["cell_state"][(obs["severity"] == 0).to_numpy()]) == {"base"}
    share = obs.groupby(donor)["cell_type"].apply(lambda t: (t == "CD14 monocyte").mean())
    severity = obs.groupby(donor)["severity"].first()
    assert abs(stats.spearmanr(share, severity[share.index])[0]) < 0.5


def test_substate_share_grows_with_severity() -> None:
    spec, cells = _shape_cells()
    obs = cells.obs[cells.obs["cell_type"] == "B cell"]
    share = (obs["cell_state"] == "substate").groupby(obs["severity"]).mean()
    expected = [min(0.1 * s * spec.state_effect, 0.5) for s in share.index]
    np.testing.assert_allclose(share.to_numpy(), expected, atol=0.03)


def test_composition_scenario_has_no_state_change_and_mixed_is_the_default() -> None:
    spec = dataclasses.replace(TINY, scenario="composition", state_effect=0.0)
    obs = _concat(_cells(spec)).obs
    assert set(obs["cell_state"]) == {"base"}
    assert CohortSpec.for_scenario("mixed") == CohortSpec()
    truth = ground_truth(CohortSpec.for_scenario("shape"))
    assert {t: v["shape"] for t, v in truth["cell_types"].items() if v["shape"]} == _SHAPE_TYPES
    assert all(v["composition"] == 0 for v in truth["cell_types"].values())
    assert truth["site_effect"] == 1.0 and truth["scenario"] == "shape"
    with pytest.raises(InputError, match="scenario"):
        CohortSpec.for_scenario("bimodal")


def test_site_composition_shifts_proportions_per_site() -> None:
    spec = dataclasses.replace(TINY, n_donors=40, n_sites=2, site_composition=1.5,
                               composition_effect=0.0, seed=8)
    obs = _concat(_cells(spec)).obs
    by_site = pd.crosstab(obs["dataset_id"], obs["cell_type"], normalize="index")
    plain = _concat(_cells(dataclasses.replace(spec, site_composition=0.0))).obs
    baseline = pd.crosstab(plain["dataset_id"], plain["cell_type"], normalize="index")
    assert (by_site.iloc[0] - by_site.iloc[1]).abs().max() > 0.05
    assert (by_site - baseline).abs().to_numpy().max() > 0.05


def test_cli_simulates_a_scenario(tmp_path: Path) -> None:
    from sampleclr_scale.cli import main

    out = tmp_path / "shape.h5ad"
    main(["simulate", "--out", str(out), "--format", "h5ad", "--scenario", "shape",
          "--donors", "8", "--min-cells", "60", "--max-cells", "80", "--genes", "3",
          "--dim", "8", "--site-effect", "2.5"])
    obs = anndata.read_h5ad(out).obs
    assert {"split+", "split-", "spread", "substate"} <= set(obs["cell_state"])
    assert obs.groupby("severity", observed=True)["cell_state"].apply(
        lambda s: (s == "base").all()).loc[0]
