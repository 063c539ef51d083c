"""New cohorts in a store's feature space: the stored feature spec, its fingerprint,
``ingest --features-like`` and embedding's refusal of a store in another space."""

from __future__ import annotations

import json
import logging
import re
import shutil

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from sampleclr_scale.cli import main
from sampleclr_scale.config import IngestConfig, TrainConfig
from sampleclr_scale.embed.config import EmbedConfig
from sampleclr_scale.embed.embedder import run_embedding
from sampleclr_scale.errors import InputError
from sampleclr_scale.ingest.stage import ingest
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.feature_spec import (
    SPEC_GROUP,
    EmbeddingSpec,
    PCASpec,
    check_same_space,
    locate_genes,
    read_spec,
)
from sampleclr_scale.store.manifest import write_manifest
from sampleclr_scale.train.artifact import load_model
from sampleclr_scale.train.driver import train
from tests.conftest import ingest_config

PCA = {"features": "pca:5", "pca_genes": 20, "pca_fit_cells": 500}
"""The training cohort's PCA: 20 of the simulator's 30 genes, 5 components."""


def like_config(source: str, out, like, **overrides) -> IngestConfig:
    """The test cohort's ingest settings with ``--features-like like`` (no ``features``)."""
    values = ingest_config(source, out, **overrides).model_dump(exclude={"features"})
    return IngestConfig(**{**values, "features_like": str(like)})


@pytest.fixture(scope="module")
def pca_store(soma_uri, tmp_path_factory) -> str:
    """The training store: the SOMA cohort with its own PCA."""
    out = tmp_path_factory.mktemp("spec") / "train.zarr"
    ingest(ingest_config(soma_uri, out, **PCA))
    return str(out)


def _stored_pca(store: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Gene ids, mean and components as written in the store, read with zarr directly."""
    group = zarr.open_group(store, mode="r")[SPEC_GROUP]
    return list(group.attrs["genes"]), group["mean"][:], group["components"][:]


def _rewrite_genes(h5ad_path: str, path, genes: list[str], extra: int = 0) -> np.ndarray:
    """The cohort's .h5ad with only ``genes``, in that order, plus ``extra`` new genes of
    random counts; returns its dense counts."""
    adata = anndata.read_h5ad(h5ad_path)
    counts = adata[:, genes].X.toarray()
    rng = np.random.default_rng(0)
    counts = np.hstack([counts, rng.poisson(3.0, (adata.n_obs, extra)).astype(np.float32)])
    ids = [*genes, *(f"ENSGEXTRA{i}" for i in range(extra))]
    var = pd.DataFrame({"feature_id": ids}, index=pd.Index(ids, dtype=str))
    anndata.AnnData(X=sp.csr_matrix(counts), obs=adata.obs, var=var).write_h5ad(path)
    return counts


def _reference_features(counts: np.ndarray, source_genes: list[str], store: str
                        ) -> np.ndarray:
    """Numpy reference: normalise to 1e4 counts per cell, log1p, take the spec's genes by
    id (missing ones at the mean, i.e. left out of the projection), centre, project."""
    genes, mean, components = _stored_pca(store)
    totals = counts.sum(axis=1, keepdims=True)
    x = np.log1p(np.divide(counts * 1e4, totals, out=np.zeros_like(counts), where=totals > 0))
    present = [i for i, g in enumerate(genes) if g in source_genes]
    columns = [source_genes.index(genes[i]) for i in present]
    return (x[:, columns] - mean[present]) @ components[:, present].T


def test_the_pca_is_stored_and_fingerprinted(pca_store, h5ad_path):
    store = BagStore(pca_store)
    genes, mean, components = _stored_pca(pca_store)
    assert len(genes) == 20 and mean.shape == (20,) and components.shape == (5, 20)
    assert all(g.startswith("ENSGSYN") for g in genes)  # ids, not positions
    assert {f"{SPEC_GROUP}/mean/zarr.json", f"{SPEC_GROUP}/components/zarr.json"} <= set(
        store.manifest.files)  # ingest wrote them before the manifest
    record = store.attrs["feature_spec"]
    assert record == {"kind": "pca", "n_components": 5, "n_genes": 20, "dim": 5,
                      "fingerprint": store.feature_spec.fingerprint}
    # the stored PCA is the one the features were computed with (the .h5ad holds the
    # same cells as the SOMA experiment, row i = soma_joinid i)
    adata = anndata.read_h5ad(h5ad_path)
    expected = _reference_features(adata.X.toarray(), list(adata.var["feature_id"]), pca_store)
    np.testing.assert_allclose(store.features[:], expected[store.source_joinid()], rtol=1e-4,
                               atol=1e-4)


def test_features_like_gives_the_same_features_for_the_same_cells(pca_store, soma_uri,
                                                                  h5ad_path, tmp_path,
                                                                  capsys):
    # the same cohort, once from SOMA and once from .h5ad (via the command line), each put
    # in the training store's PCA space: the training store's features, cell for cell
    again = tmp_path / "again.zarr"
    ingest(like_config(soma_uri, again, pca_store))
    out = tmp_path / "from_h5ad.zarr"
    assert main(["ingest", h5ad_path, "--out", str(out), "--features-like", pca_store,
                 "--donor-key", "dataset_id", "donor_id", "--min-cells", "40",
                 "--primary-only", "--seed", "3", "--meta", "disease",
                 "--stratify", "disease"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["genes_missing"] == 0
    trained = BagStore(pca_store)
    for path in (again, out):
        store = BagStore(path)
        assert np.array_equal(store.source_joinid(), trained.source_joinid())
        np.testing.assert_allclose(store.features[:], trained.features[:], rtol=1e-5,
                                   atol=1e-5)
        assert store.attrs["feature_spec"] == trained.attrs["feature_spec"]
        assert store.attrs["ingest"]["features_like"] == pca_store
        assert "features" not in store.attrs["ingest"]
        # the new store carries the spec on: a third cohort may be put in its space
        for a, b in zip(_stored_pca(str(path)), _stored_pca(pca_store), strict=True):
            assert np.array_equal(a, b)


def test_permuted_and_partly_missing_genes_match_a_numpy_reference(pca_store, h5ad_path,
                                                                   tmp_path, caplog):
    genes, _, _ = _stored_pca(pca_store)
    others = [f"ENSGSYN{g:08d}" for g in range(30) if f"ENSGSYN{g:08d}" not in genes]
    dropped = genes[7]
    kept = [g for g in [*genes, *others] if g != dropped]
    source_genes = [*np.random.default_rng(1).permutation(kept)]
    source = tmp_path / "permuted.h5ad"
    counts = _rewrite_genes(h5ad_path, source, source_genes, extra=3)
    source_genes += [f"ENSGEXTRA{i}" for i in range(3)]
    with caplog.at_level(logging.WARNING, "sampleclr_scale.store.feature_spec"):
        store = BagStore(ingest(like_config(str(source), tmp_path / "p.zarr", pca_store)).out)
    assert f"lacks 1 of the feature spec's 20 genes (5.0%), e.g. ['{dropped}']" in caplog.text
    assert store.attrs["counts"]["genes_missing"] == 1
    assert store.attrs["features"]["missing_genes"] == [dropped]
    assert store.attrs["feature_spec"] == BagStore(pca_store).attrs["feature_spec"]
    expected = _reference_features(counts, source_genes, pca_store)[store.source_joinid()]
    np.testing.assert_allclose(store.features[:], expected, rtol=1e-4, atol=1e-4)
    # and not what the training store has: the missing gene and the library sizes differ
    assert not np.allclose(store.features[:], BagStore(pca_store).features[:], atol=1e-3)


def test_too_many_missing_genes_are_refused_above_the_threshold(pca_store, h5ad_path,
                                                                tmp_path):
    genes, _, _ = _stored_pca(pca_store)
    source = tmp_path / "few.h5ad"
    _rewrite_genes(h5ad_path, source, genes[5:])  # 5 of 20 missing: 25%
    with pytest.raises(InputError, match=re.escape(
            "lacks 5 of the feature spec's 20 genes (25.0%)") + ".*max_missing_genes"):
        ingest(like_config(str(source), tmp_path / "refused.zarr", pca_store))
    assert not (tmp_path / "refused.zarr").exists()
    report = ingest(like_config(str(source), tmp_path / "ok.zarr", pca_store,
                                max_missing_genes=0.25))
    assert report.counts["genes_missing"] == 5


def test_fingerprints_tell_feature_spaces_apart(pca_store, store_path, soma_uri, tmp_path):
    own = tmp_path / "own.zarr"  # the same cohort with a PCA fitted on other cells
    ingest(ingest_config(soma_uri, own, **{**PCA, "pca_fit_cells": 300}))
    trained, other = BagStore(pca_store).feature_spec, BagStore(own).feature_spec
    assert other.dim == trained.dim and other.fingerprint != trained.fingerprint
    embedding = BagStore(store_path).feature_spec
    assert embedding == EmbeddingSpec("scvi", 8)
    assert embedding.fingerprint == EmbeddingSpec("scvi", 8).fingerprint
    assert len({embedding.fingerprint, EmbeddingSpec("scvi", 7).fingerprint,
                EmbeddingSpec("pca", 8).fingerprint, trained.fingerprint}) == 4
    # every part of a PCA spec is in its fingerprint
    mean = trained.mean.copy()
    mean[3] += 1e-3
    changed = [PCASpec(trained.genes, mean, trained.components, trained.target_sum),
               PCASpec(("X", *trained.genes[1:]), trained.mean, trained.components, 1e4),
               PCASpec(trained.genes, trained.mean, trained.components[::-1], 1e4),
               PCASpec(trained.genes, trained.mean, trained.components, 1e6)]
    assert trained.fingerprint == PCASpec(trained.genes, trained.mean.copy(),
                                          trained.components.copy(), 1e4).fingerprint
    assert trained.fingerprint not in {spec.fingerprint for spec in changed}


def test_stores_from_before_feature_specs():
    # an embedding store has its spec in the features attribute; a PCA one has none
    old = {"features": {"kind": "embedding", "name": "scvi", "dim": 8}}
    assert read_spec(old, zarr.group()) == EmbeddingSpec("scvi", 8)
    assert read_spec({"features": {"kind": "pca", "dim": 5}}, zarr.group()) is None


def test_features_like_an_embedding_store(store_path, soma_uri, h5ad_path, tmp_path):
    same = BagStore(ingest(like_config(soma_uri, tmp_path / "same.zarr", store_path)).out)
    assert np.array_equal(same.features[:], BagStore(store_path).features[:])
    assert same.attrs["feature_spec"] == BagStore(store_path).attrs["feature_spec"]
    adata = anndata.read_h5ad(h5ad_path)
    adata.obsm["scvi"] = adata.obsm["scvi"][:, :6]  # another embedding model's width
    narrow = tmp_path / "narrow.h5ad"
    adata.write_h5ad(narrow)
    with pytest.raises(InputError, match=r"'scvi' has width 6, the features of .* width 8"):
        ingest(like_config(str(narrow), tmp_path / "n.zarr", store_path))


def test_features_like_needs_a_stored_pca_and_no_features(pca_store, soma_uri, tmp_path):
    with pytest.raises(InputError, match="features_like takes the features of its store"):
        IngestConfig.from_mapping({"source": soma_uri, "out": "x", "features": "pca:5",
                                   "features_like": pca_store})
    old = tmp_path / "old.zarr"  # a PCA store as ingested before specs were stored
    shutil.copytree(pca_store, old)
    shutil.rmtree(old / SPEC_GROUP)
    group = zarr.open_group(str(old), mode="r+")
    del group.attrs["feature_spec"]
    write_manifest(old)
    with pytest.raises(InputError, match="does not store its PCA"):
        ingest(like_config(soma_uri, tmp_path / "new.zarr", old))


def test_locate_genes_by_id():
    assert locate_genes(("b", "x", "a"), np.array(["a", "b", "c"])).tolist() == [1, -1, 0]
    assert locate_genes(("a",), np.array(["a", "c", "c"])).tolist() == [0]  # c: not asked
    with pytest.raises(InputError, match=r"more than one column \(e\.g\. \['c'\]\)"):
        locate_genes(("a", "c"), np.array(["a", "c", "c"]))


@pytest.mark.parametrize(("index", "extra", "expected"), [
    (None, {}, ["g1", "g2"]),  # the unnamed index: var_id
    ("gene", {}, ["g1", "g2"]),  # a named index: its column
    ("gene", {"feature_id": ["E1", "E2"]}, ["E1", "E2"]),  # Census's ids first
])
def test_soma_gene_ids(index, extra, expected, tmp_path):
    import tiledbsoma.io

    from sampleclr_scale.sources.soma import SomaSource

    var = pd.DataFrame(extra, index=pd.Index(["g1", "g2"], name=index))
    adata = anndata.AnnData(X=sp.csr_matrix(np.ones((3, 2), np.float32)), var=var)
    tiledbsoma.io.from_anndata(str(tmp_path / "e"), adata, "RNA")
    with SomaSource.open(str(tmp_path / "e")) as source:
        assert source.var_names("data").tolist() == expected


# --- the trained model and embedding -----------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(pca_store, tmp_path_factory) -> str:
    """A model trained (one epoch, in this process) on the PCA store."""
    run = str(tmp_path_factory.mktemp("spec-run") / "run")
    config = TrainConfig.from_mapping({"preset": "small", "workers": 1, "epochs": 1,
                                       "supervised_epochs": 0, "patience": None,
                                       "loader": {"batch_size": 4, "cells_per_view": 32}})
    train(pca_store, run, config, in_process=True)
    return run


def test_the_model_records_its_stores_feature_spec(trained_run, pca_store):
    _, artifact = load_model(trained_run)
    assert artifact["feature_spec"] == BagStore(pca_store).attrs["feature_spec"]


def test_embed_refuses_a_store_of_another_feature_space(trained_run, pca_store, soma_uri,
                                                        tmp_path, ray_cluster):
    own = tmp_path / "own.zarr"  # a new cohort with its own PCA: as many features
    ingest(ingest_config(soma_uri, own, **{**PCA, "seed": 5}))
    trained, other = (BagStore(s).attrs["feature_spec"]["fingerprint"][:12]
                      for s in (pca_store, own))
    config = EmbedConfig(cells=20, batch_donors=8, workers=1)
    with pytest.raises(InputError, match=(
            rf"(?s)trained on features pca:5 of 20 genes \(fingerprint {trained}\).*"
            rf"{own} has pca:5 of 20 genes \(fingerprint {other}\).*"
            rf"--features-like {pca_store}")):
        run_embedding(own, trained_run, tmp_path / "refused", config)
    assert not (tmp_path / "refused").exists()
    like = ingest(like_config(soma_uri, tmp_path / "like.zarr", pca_store, seed=5)).out
    result = run_embedding(like, trained_run, tmp_path / "emb", config)
    assert result.n_donors == BagStore(like).n_donors


def test_models_and_stores_from_before_feature_specs(pca_store, caplog):
    spec = BagStore(pca_store).feature_spec
    where = {"run_dir": "RUN", "store": "STORE", "trained_on": "TRAIN"}
    with caplog.at_level(logging.WARNING, "sampleclr_scale.store.feature_spec"):
        check_same_space(None, spec, **where)  # an older model: embedded, with a warning
    assert "records no feature spec" in caplog.text
    check_same_space(spec.record(), spec, **where)
    with pytest.raises(InputError, match=r"(?s)STORE has no feature spec.*--features-like "
                                         "TRAIN"):
        check_same_space(spec.record(), None, **where)  # an older PCA store
