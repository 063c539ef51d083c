"""Embedding stage: cell selection, Ray embedding, write-back to SOMA and to the store."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch

from sampleclr_scale.cli import main
from sampleclr_scale.embed import writeback
from sampleclr_scale.embed.config import EmbedConfig
from sampleclr_scale.embed.embedder import embed, run_embedding
from sampleclr_scale.embed.selection import (
    eigenvector_centrality,
    knn_graph,
    lowest,
    rank_agreement_per_donor_vs_global,
    select_cells,
)
from sampleclr_scale.embed.worker import embed_donors
from sampleclr_scale.errors import InputError
from sampleclr_scale.ingest.stage import ingest
from sampleclr_scale.model import ModelConfig, SampleCLR
from sampleclr_scale.pipeline import Headers, PipelineConfig, _Run
from sampleclr_scale.storage import Location
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.train.artifact import load_model, save_model
from tests.conftest import ingest_config

RUN = "run-a"
CONFIG = EmbedConfig(cells=100, mode="centrality", batch_donors=5, workers=2, run_name=RUN)


def _graph(n: int, edges: list[tuple[int, int]]) -> sp.csr_array:
    i, j = np.array(edges).T
    return sp.csr_array((np.ones(2 * len(i)), (np.r_[i, j], np.r_[j, i])), shape=(n, n))


def _path(n: int) -> sp.csr_array:
    return _graph(n, [(i, i + 1) for i in range(n - 1)])


# --- selection -----------------------------------------------------------------------


def test_star_hub_is_most_central():
    c = eigenvector_centrality(_graph(6, [(0, leaf) for leaf in range(1, 6)]))
    assert np.argmax(c) == 0 and np.allclose(c[1:], c[1])
    # Perron vector of the star K_{1,5}: hub sqrt(5) times a leaf, unit norm.
    assert np.isclose(c[0], np.sqrt(0.5)) and np.isclose(c[1], np.sqrt(0.1))


@pytest.mark.parametrize("n", [10, 300])  # dense solver and ARPACK
def test_path_matches_analytic_eigenvector(n):
    expected = np.sin(np.arange(1, n + 1) * np.pi / (n + 1))
    c = eigenvector_centrality(_path(n))
    assert np.allclose(c, expected / np.linalg.norm(expected), atol=1e-8)
    assert np.isclose(np.linalg.norm(c), 1.0) and (c >= 0).all()


def test_disconnected_and_empty_graphs():
    # A 5-clique and a triangle: only the clique (larger eigenvalue) is central.
    clique = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    c = eigenvector_centrality(_graph(8, [*clique, (5, 6), (6, 7), (5, 7)]))
    assert np.allclose(c[:5], 1 / np.sqrt(5)) and np.all(c[5:] == 0)
    assert np.allclose(eigenvector_centrality(sp.csr_array((4, 4))), 0.5)


def test_knn_graph_is_symmetric_and_unweighted():
    x = np.random.default_rng(0).normal(size=(200, 6)).astype(np.float32)
    g = knn_graph(x, k=7)
    assert (g != g.T).nnz == 0 and set(np.unique(g.data)) == {1.0}
    assert g.diagonal().sum() == 0 and (np.diff(g.indptr) >= 7).all()
    assert knn_graph(x[:4], k=15).nnz == 12  # k capped at n - 1: complete graph


def test_centrality_selection_takes_the_lowest_and_is_deterministic():
    x = np.random.default_rng(1).normal(size=(300, 5)).astype(np.float32)
    chosen = select_cells(x, 100, "centrality", k=15, seed=0, donor=0)
    centrality = eigenvector_centrality(knn_graph(x, 15))
    assert len(np.unique(chosen)) == 100 and np.all(np.diff(chosen) > 0)
    assert centrality[chosen].max() <= np.delete(centrality, chosen).min()
    assert np.array_equal(chosen, select_cells(x.copy(), 100, "centrality", k=15, seed=9,
                                               donor=0))


def test_ties_are_broken_by_row_order():
    assert lowest(np.array([1.0, 0.0, 0.0, 2.0, 0.0]), 2).tolist() == [1, 2]


def test_random_selection_is_seeded():
    x = np.zeros((500, 3), dtype=np.float32)
    a = select_cells(x, 50, "random", k=15, seed=0, donor=3)
    assert len(np.unique(a)) == 50
    assert np.array_equal(a, select_cells(x, 50, "random", k=15, seed=0, donor=3))
    assert not np.array_equal(a, select_cells(x, 50, "random", k=15, seed=1, donor=3))
    assert not np.array_equal(a, select_cells(x, 50, "random", k=15, seed=0, donor=4))


@pytest.mark.parametrize("mode", ["centrality", "random"])
def test_small_donors_are_resampled_with_replacement(mode):
    x = np.random.default_rng(2).normal(size=(30, 4)).astype(np.float32)
    chosen = select_cells(x, 100, mode, k=15, seed=5, donor=7)
    assert len(chosen) == 100 and set(chosen.tolist()) == set(range(30))
    assert np.array_equal(chosen, select_cells(x, 100, mode, k=15, seed=5, donor=7))
    assert not np.array_equal(chosen, select_cells(x, 100, mode, k=15, seed=5, donor=8))


def test_all_mode_and_bad_mode():
    x = np.ones((12, 2), dtype=np.float32)
    assert select_cells(x, 5, "all", k=15, seed=0, donor=0).tolist() == list(range(12))
    with pytest.raises(InputError, match="unknown cell selection mode"):
        select_cells(x, 5, "best", k=15, seed=0, donor=0)


def test_rank_agreement_report(store_path):
    store = BagStore(store_path)
    report = rank_agreement_per_donor_vs_global(store, [0, 1, 2], k=15, cells=30)
    assert report["n_donors"] == 3 == len(report["per_donor"])
    assert -1 <= report["spearman_median"] <= 1 and 0 <= report["overlap_mean"] <= 1


# --- embedding with Ray --------------------------------------------------------------


def _snapshot(uri: str) -> dict:
    """Everything the write-back must leave alone: obs, X, obsm, the member names."""
    import tiledbsoma

    with tiledbsoma.Experiment.open(uri) as exp:
        rna = exp.ms["RNA"]
        return {
            "members": sorted(exp),
            "obs": exp.obs.read().concat().to_pandas(),
            "X": rna.X["raw"].read().tables().concat().to_pandas(),
            "obsm": {k: rna.obsm[k].read().tables().concat().to_pandas() for k in rna.obsm},
        }


@pytest.fixture(scope="module")
def setup(store_path, soma_uri, tmp_path_factory):
    """A copy of the store and of the SOMA experiment, and an untrained 2-head model."""
    root = tmp_path_factory.mktemp("embed")
    store = root / "bags.zarr"
    shutil.copytree(store_path, store)
    experiment = root / "exp"
    shutil.copytree(soma_uri, experiment)
    torch.manual_seed(0)
    config = ModelConfig.preset("small", input_dim=BagStore(store).dim, n_heads=2)
    run = root / "model-run"
    run.mkdir()
    save_model(run, model_config=config, state_dict=SampleCLR(config).state_dict(), tasks=[],
               train_config={}, store=str(store), history=[])
    return {"root": root, "store": store, "soma": str(experiment), "run": run,
            "before": _snapshot(str(experiment))}


@pytest.fixture(scope="module")
def embedded(setup, ray_cluster):
    out = setup["root"] / "emb"
    return embed(setup["store"], setup["run"], out, CONFIG, write_back=setup["soma"])


def _cells(result) -> pd.DataFrame:
    return pq.read_table(result.cell_weights).to_pandas()


def _z(path) -> np.ndarray:
    table = pq.read_table(path)
    return np.stack(table["z"].to_numpy(zero_copy_only=False)).astype(np.float32)


@pytest.mark.ray
def test_every_donor_once_with_m_cells(embedded, setup):
    store = BagStore(setup["store"])
    donors = pq.read_table(embedded.donor_embeddings).to_pandas()
    assert donors["donor_index"].tolist() == list(range(store.n_donors))
    assert donors.drop(columns=["donor_index", "z"]).equals(store.donors)
    cells = _cells(embedded)
    assert (cells.groupby("donor_index").size() == CONFIG.cells).all()
    assert list(cells.columns) == ["donor_index", "store_row", "source_joinid", "head_0",
                                   "head_1"]
    ptr = store.donor_ptr
    for donor, rows in cells.groupby("donor_index")["store_row"]:
        x = store.donor_rows(donor)
        expected = select_cells(x, CONFIG.cells, "centrality", k=15, seed=0,
                                donor=donor) + ptr[donor]
        assert np.array_equal(rows.to_numpy(), expected)
    assert np.array_equal(cells["source_joinid"], store.source_joinid()[cells["store_row"]])
    assert embedded.n_donors == store.n_donors and embedded.donors_per_s > 0


@pytest.mark.ray
def test_z_and_weights_equal_a_direct_model_call(embedded, setup):
    store = BagStore(setup["store"])
    model, _ = load_model(setup["run"])
    cells, z = _cells(embedded), _z(embedded.donor_embeddings)
    for donor, chosen in cells.groupby("donor_index"):
        x = torch.from_numpy(store.features[:][chosen["store_row"].to_numpy()])[None]
        with torch.no_grad():
            out = model(x, torch.ones(x.shape[:2], dtype=torch.bool))
        np.testing.assert_allclose(out.z[0].numpy(), z[donor], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.weights[0].numpy(),
                                   chosen[["head_0", "head_1"]].to_numpy(), rtol=1e-5,
                                   atol=1e-7)


@pytest.mark.ray
def test_in_process_embedding_equals_the_actors(embedded, setup, tmp_path):
    """One implementation, two places: the in-process worker chooses the actors' cells and
    computes their vectors (up to float sums over another number of threads)."""
    local = run_embedding(setup["store"], setup["run"], tmp_path / "local", CONFIG,
                          in_process=True)
    np.testing.assert_allclose(_z(local.donor_embeddings), _z(embedded.donor_embeddings),
                               rtol=1e-5, atol=1e-6)
    cells, expected = _cells(local), _cells(embedded)
    columns = ["donor_index", "store_row", "source_joinid"]
    assert cells[columns].equals(expected[columns])
    np.testing.assert_allclose(cells[["head_0", "head_1"]], expected[["head_0", "head_1"]],
                               rtol=1e-5, atol=1e-7)


@pytest.mark.ray
def test_rerun_is_identical_and_random_mode_differs(embedded, setup):
    again = run_embedding(setup["store"], setup["run"], setup["root"] / "again", CONFIG)
    assert np.array_equal(_z(again.donor_embeddings), _z(embedded.donor_embeddings))
    assert _cells(again).equals(_cells(embedded))
    random = run_embedding(setup["store"], setup["run"], setup["root"] / "random",
                           CONFIG.model_copy(update={"mode": "random"}))
    assert not np.array_equal(_z(random.donor_embeddings), _z(embedded.donor_embeddings))
    setup["random"] = random


@pytest.mark.ray
def test_overwrite_replaces_embeddings_never_a_foreign_folder_or_an_input(embedded, setup):
    overwrite = CONFIG.model_copy(update={"overwrite": True})
    folder = setup["root"] / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"holding notes\.txt, not an embedding folder"):
        run_embedding(setup["store"], setup["run"], folder, overwrite)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    with pytest.raises(InputError, match="which this stage reads"):
        run_embedding(setup["store"], setup["run"], setup["store"], overwrite)
    assert BagStore(setup["store"]).n_donors > 0  # untouched

    copy = setup["root"] / "emb-copy"
    shutil.copytree(embedded.out, copy)
    again = run_embedding(setup["store"], setup["run"], copy, overwrite)  # replaced
    assert np.array_equal(_z(again.donor_embeddings), _z(embedded.donor_embeddings))


@pytest.mark.ray
def test_h5ad_and_provenance(embedded, setup):
    import anndata

    adata = anndata.read_h5ad(embedded.h5ad)
    store = BagStore(setup["store"])
    np.testing.assert_array_equal(adata.X, _z(embedded.donor_embeddings))
    assert adata.obs_names.tolist() == store.donors["donor"].tolist()
    for column in store.donors.columns:
        assert adata.obs[column].astype(str).tolist() == store.donors[column].astype(str).tolist()
    provenance = json.loads(embedded.provenance.read_text())
    assert provenance["checkpoint"] == str(setup["run"].resolve())
    assert provenance["config"]["cells"] == CONFIG.cells and provenance["versions"]["torch"]
    assert json.loads(adata.uns["sampleclr_provenance"]) == provenance


@pytest.mark.ray
def test_a_model_without_heads_writes_no_predictions(embedded):
    assert embedded.predictions is None
    assert not (embedded.out / "predictions.parquet").exists()
    assert json.loads(embedded.provenance.read_text())["tasks"] == []


# --- write-back ----------------------------------------------------------------------


def _expected_weights(result, n_obs: int) -> sp.coo_array:
    cells = _cells(result).drop_duplicates("source_joinid")
    ids = cells["source_joinid"].to_numpy()
    values = cells[["head_0", "head_1"]].to_numpy()
    return sp.coo_array((values.ravel(), (np.repeat(ids, 2), np.tile([0, 1], len(ids)))),
                        shape=(n_obs, 2))


def _assert_round_trip(donors: pd.DataFrame, weights: sp.coo_array, result, n_obs: int):
    written = pq.read_table(result.donor_embeddings).to_pandas()
    z = _z(result.donor_embeddings)
    assert donors["donor_index"].tolist() == written["donor_index"].tolist()
    for column in ("donor", "dataset_id", "donor_id", "split"):
        assert donors[column].tolist() == written[column].astype(str).tolist()
    np.testing.assert_array_equal(donors[[f"z_{j}" for j in range(z.shape[1])]].to_numpy(), z)
    assert weights.shape == (n_obs, 2)
    assert (weights.tocsr() != _expected_weights(result, n_obs).tocsr()).nnz == 0


@pytest.mark.ray
def test_soma_round_trip_leaves_the_experiment_alone(embedded, setup):
    donors, weights = writeback.read_back(setup["soma"], RUN)
    n_obs = len(setup["before"]["obs"])
    _assert_round_trip(donors, weights, embedded, n_obs)
    after = _snapshot(setup["soma"])
    assert after["members"] == sorted([*setup["before"]["members"], "sampleclr"])
    assert after["obs"].equals(setup["before"]["obs"])
    assert after["X"].equals(setup["before"]["X"])
    assert all(after["obsm"][k].equals(v) for k, v in setup["before"]["obsm"].items())


@pytest.mark.ray
def test_rewriting_a_run_replaces_it(embedded, setup):
    import tiledbsoma

    random = setup.get("random") or run_embedding(
        setup["store"], setup["run"], setup["root"] / "random",
        CONFIG.model_copy(update={"mode": "random"}))
    n_obs = len(setup["before"]["obs"])
    for result in (random, embedded, embedded):
        writeback.write_back_soma(result.out, setup["soma"], RUN)
        _assert_round_trip(*writeback.read_back(setup["soma"], RUN), result, n_obs)
    home = setup["root"] / "exp" / "sampleclr"
    with tiledbsoma.Collection.open(str(home)) as collection:
        assert sorted(collection) == [RUN]
    assert len([p for p in home.iterdir() if p.name.startswith(RUN)]) == 1


@pytest.mark.ray
def test_incomplete_run_is_refused(embedded, setup):
    home, n_obs = writeback._prepare(setup["soma"], 0)
    staging = writeback._stage(home, "crashed", writeback._Results(embedded.out), n_obs)
    with pytest.raises(InputError, match="incomplete"):
        writeback.read_back(setup["soma"], staging)
    with pytest.raises(InputError, match="no sampleclr results named 'crashed'"):
        writeback.read_back(setup["soma"], "crashed")


@pytest.mark.ray
def test_store_round_trip(embedded, setup):
    assert embedded.write_back["store"] == str(setup["store"] / "embeddings" / RUN)
    donors, weights = writeback.read_back(setup["store"], RUN)
    n_obs = int(_cells(embedded)["source_joinid"].max()) + 1
    _assert_round_trip(donors, weights, embedded, n_obs)
    with pytest.raises(InputError, match="no embeddings named"):
        writeback.read_back(setup["store"], "other")


def test_all_mode_embeds_every_cell(setup):
    store = BagStore(setup["store"])
    model, _ = load_model(setup["run"])
    batch = embed_donors(store, model, [0, 1, 2], EmbedConfig(mode="all"))
    assert batch.counts.tolist() == store.cells_per_donor[:3].tolist()
    assert batch.store_rows.tolist() == list(range(int(store.donor_ptr[3])))
    assert batch.z.shape == (3, model.config.output_dim)


def test_default_write_back_target_is_the_source_experiment(setup, soma_uri):
    store = BagStore(setup["store"])
    assert writeback.soma_target(store, None) == soma_uri
    assert writeback.soma_target(store, setup["soma"]) == setup["soma"]


def test_census_store_needs_a_write_back_target(census_uri, setup, tmp_path):
    census_store = tmp_path / "census.zarr"
    ingest(ingest_config(f"census:{census_uri}", census_store))
    with pytest.raises(InputError, match=r"Census.*read-only"):
        embed(census_store, setup["run"], tmp_path / "out", CONFIG)
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="read-only"):
        writeback.soma_target(BagStore(census_store), f"census:{census_uri}")
    assert writeback.soma_target(BagStore(census_store), str(tmp_path / "x")) == str(
        tmp_path / "x")


@pytest.mark.ray
def test_census_results_go_to_a_new_local_experiment(embedded, tmp_path):
    target = str(tmp_path / "results")
    writeback.write_back_soma(embedded.out, target, RUN)
    donors, weights = writeback.read_back(target, RUN)
    n_obs = int(_cells(embedded)["source_joinid"].max()) + 1
    _assert_round_trip(donors, weights, embedded, n_obs)


def test_embedding_draws_and_standardises_cells_as_the_model_trained(soma_uri, tmp_path):
    # A model trained on per-batch standardised features and views balanced over cell
    # types embeds each donor from cells in the cohort's cell-type proportions,
    # standardised with the donor's batch statistics.
    from sampleclr_scale.embed.selection import select_balanced
    from sampleclr_scale.loading.views.balanced import balanced_quotas

    store_dir = tmp_path / "bags.zarr"
    ingest(ingest_config(soma_uri, store_dir, batch_key=["dataset_id"]))
    store = BagStore(store_dir)
    torch.manual_seed(1)
    model = SampleCLR(ModelConfig.preset("small", input_dim=store.dim)).eval()
    config = EmbedConfig(cells=60, mode="random", batch_donors=5)
    batch = embed_donors(store, model, list(range(6)), config, standardize=True,
                         balance="cell_type")
    counts = store.category_counts("cell_type")
    target = counts / counts.sum()
    codes = store.codes("cell_type")[:]
    mean, std = store.batch_stats
    starts = np.cumsum([0, *batch.counts[:-1]])
    for donor, start in zip(batch.donors.tolist(), starts, strict=True):
        first, stop = int(store.donor_ptr[donor]), int(store.donor_ptr[donor + 1])
        rows = batch.store_rows[start:start + config.cells]
        expected = first + select_balanced(codes[first:stop], config.cells, target, 0, donor)
        assert np.array_equal(rows, expected)
        present = np.bincount(codes[first:stop], minlength=len(target)) > 0
        assert np.array_equal(np.bincount(codes[rows], minlength=len(target)),
                              balanced_quotas(present, target, config.cells))
        b = store.donor_batch[donor]
        x = torch.from_numpy((store.features[:][rows] - mean[b]) / std[b])[None]
        with torch.no_grad():
            z = model(x, torch.ones(x.shape[:2], dtype=torch.bool)).z[0].numpy()
        np.testing.assert_allclose(batch.z[donor], z, rtol=1e-5, atol=1e-6)


def test_a_model_trained_standardised_needs_batch_statistics(setup, tmp_path):
    config = ModelConfig.preset("small", input_dim=BagStore(setup["store"]).dim)
    run = tmp_path / "run"
    run.mkdir()
    save_model(run, model_config=config, state_dict=SampleCLR(config).state_dict(), tasks=[],
               train_config={}, store=str(setup["store"]), history=[], standardize=True)
    with pytest.raises(InputError, match="standardised per technical batch"):
        run_embedding(setup["store"], run, tmp_path / "emb", CONFIG)


@pytest.mark.parametrize("name", ["zarr.json", "ZARR.JSON", ".zgroup", ".zattrs", ".zarray",
                                  ".results"])
def test_run_names_that_zarr_reads_as_metadata_are_refused(name, setup, tmp_path):
    # results named zarr.json would turn STORE/embeddings/zarr.json into a folder
    with pytest.raises(InputError, match=re.escape(f"run_name {name!r} must be")):
        EmbedConfig.from_mapping({"run_name": name})
    run = tmp_path / name  # a run directory names its results by default
    shutil.copytree(setup["run"], run)
    with pytest.raises(InputError, match=re.escape(f"{name!r} cannot name embedding results")):
        embed(setup["store"], run, tmp_path / "emb", EmbedConfig(cells=100, workers=1))
    assert not (tmp_path / "emb").exists()
    assert not (setup["store"] / "embeddings" / name).is_dir()


# --- no write-back -------------------------------------------------------------------


EMBEDDING_FILES = {"donor_embeddings.parquet", "donor_embeddings.h5ad",
                   "cell_weights.parquet", "provenance.json"}


def _listing(root) -> list[tuple[str, int, int]]:
    """Every file under ``root``: relative path, size, modification time."""
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in Path(root).rglob("*") if p.is_file())


def _embed_args(setup, out, *extra: str) -> list[str]:
    return ["embed", "--store", str(setup["store"]), "--checkpoint", str(setup["run"]),
            "--out", str(out), "--workers", "1", "--cells", "50", *extra]


def _assert_complete(folder, store) -> None:
    """The embedding folder of a model without heads, of every donor of ``store``."""
    assert {p.name for p in Path(folder).iterdir()} == EMBEDDING_FILES
    assert len(writeback._Results(folder).donors) == BagStore(store).n_donors


@pytest.mark.ray
def test_no_write_back_writes_only_the_embedding_folder(setup, ray_cluster, tmp_path):
    # without the flag, the results would go into the store and its source experiment
    source = writeback.soma_target(BagStore(setup["store"]), None)
    before = {where: _listing(where) for where in (setup["store"], source, setup["soma"])}
    out = setup["root"] / "no-write-back"
    assert main(_embed_args(setup, out, "--no-write-back", "--run-name", "nowb")) == 0
    assert {where: _listing(where) for where in before} == before
    _assert_complete(out, setup["store"])


def test_write_back_and_no_write_back_together_are_refused(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(_embed_args(setup, tmp_path / "emb", "--write-back", str(tmp_path / "x"),
                         "--no-write-back"))
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "emb").exists()


@pytest.mark.parametrize("word", ["none", "None", "false", ""])
def test_a_write_back_that_names_no_experiment_is_refused(word, setup, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(_embed_args(setup, tmp_path / "emb", "--write-back", word)) == 2
    assert "--no-write-back" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no experiment, no folder


@pytest.mark.ray
def test_a_recipe_without_write_back_embeds_only_the_folders(setup, soma_uri, ray_cluster,
                                                             tmp_path):
    shutil.copytree(setup["store"], tmp_path / "bags.zarr")
    shutil.copytree(setup["run"], tmp_path / "runs" / "sampleclr")
    recipe = PipelineConfig(name="test", source=soma_uri, write_back=False,
                            embed={"cells": 50, "workers": 1})
    before = {where: _listing(where) for where in (tmp_path / "bags.zarr", soma_uri)}
    run = _Run(recipe, Location(tmp_path), Headers(), in_process=True, train_overrides={},
               embed_overrides={})
    assert run.embed("sampleclr") == [str(tmp_path / "embeddings" / "sampleclr")]
    assert {where: _listing(where) for where in before} == before
    _assert_complete(tmp_path / "embeddings" / "sampleclr", setup["store"])


def test_a_model_whose_heads_read_composition_needs_the_stores_cell_types(soma_uri,
                                                                          tmp_path):
    """Refused in the driver, before any actor starts and with nothing written: a store
    without cell_type codes, and one whose cell types are none of the model's."""
    without = tmp_path / "no_types.zarr"
    ingest(ingest_config(soma_uri, without, cell_columns=[]))
    store = BagStore(without)
    config = ModelConfig.preset("small", input_dim=store.dim,
                                head_composition=("CD14 monocyte", "B cell"))
    run = tmp_path / "run"
    run.mkdir()
    save_model(run, model_config=config, state_dict=SampleCLR(config).state_dict(), tasks=[],
               train_config={}, store=str(without), history=[])
    with pytest.raises(InputError, match=r"(?s)no cell_type codes.*--cell-columns cell_type"):
        embed(without, run, tmp_path / "emb", CONFIG, write_back=False)
    assert not (tmp_path / "emb").exists()
    other = ModelConfig.preset("small", input_dim=store.dim,
                               head_composition=("mast cell", "erythrocyte"))
    save_model(run, model_config=other, state_dict=SampleCLR(other).state_dict(), tasks=[],
               train_config={}, store=str(without), history=[])
    typed = tmp_path / "typed.zarr"
    ingest(ingest_config(soma_uri, typed))
    with pytest.raises(InputError, match="none of the model's 2 cell types"):
        embed(typed, run, tmp_path / "emb", CONFIG, write_back=False)
    assert not (tmp_path / "emb").exists()
