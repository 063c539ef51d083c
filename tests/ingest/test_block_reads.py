"""Feature blocks read by Ray actors in parallel give the store a read in this process
gives: the same rows, the same order, the same tables."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pandas as pd
import pytest

from sampleclr_scale.api.datasets import simulated_anndata
from sampleclr_scale.errors import InputError
from sampleclr_scale.ingest.features import EmbeddingFeatures
from sampleclr_scale.ingest.stage import ingest
from sampleclr_scale.sources.anndata import AnnDataSource
from sampleclr_scale.sources.registry import open_source
from sampleclr_scale.store.bag_store import BagStore
from tests.conftest import ingest_config


def _same_store(a: str, b: str) -> None:
    x, y = BagStore(a), BagStore(b)
    assert np.array_equal(x.source_joinid(), y.source_joinid())
    assert np.array_equal(x.features[:], y.features[:])
    assert np.array_equal(x.donor_ptr, y.donor_ptr)
    pd.testing.assert_frame_equal(x.donors, y.donors)
    pd.testing.assert_frame_equal(x.cell_table(), y.cell_table())
    assert x.attrs["counts"] == y.attrs["counts"]


@pytest.mark.ray
@pytest.mark.parametrize("features", ["obsm:scvi", "pca:5"])
def test_parallel_reads_write_the_same_store(soma_uri, ray_cluster, tmp_path, features):
    """Small blocks (many of them, finishing out of order) read by two actors; PCA
    features are computed in the actors from the fit made here."""
    settings = dict(features=features, read_block=1024, batch_key=["dataset_id"])
    if features.startswith("pca"):
        settings |= dict(pca_genes=20, pca_fit_cells=500)
    here, there = tmp_path / "here.zarr", tmp_path / "actors.zarr"
    ingest(ingest_config(soma_uri, here, **settings))
    ingest(ingest_config(soma_uri, there, read_workers=2, **settings))
    _same_store(str(here), str(there))
    import ray

    deadline = time.monotonic() + 30  # the readers are gone: their CPUs free again
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2


def test_a_reader_pickles_without_its_source_and_binds_another(soma_uri):
    with open_source(soma_uri) as source:
        reader = EmbeddingFeatures(source, "scvi")
        expected = reader.read(np.arange(10, 20))
        copy = pickle.loads(pickle.dumps(reader))
    with open_source(soma_uri) as reopened:
        assert np.array_equal(copy.bind(reopened).read(np.arange(10, 20)), expected)


def test_an_object_source_is_read_here_only(tmp_path):
    adata = simulated_anndata(n_donors=8, seed=0)
    config = ingest_config("in-memory", tmp_path / "bags.zarr", donor_key=["sample"],
                           meta=["severity"], stratify=None, primary_only=False,
                           min_cells=10, read_workers=2)
    with pytest.raises(InputError, match="read_workers 2 asks other processes"):
        ingest(config, source=AnnDataSource(adata))
    assert not (tmp_path / "bags.zarr").exists()


@pytest.mark.ray
def test_more_readers_than_a_local_ray_has_cpus_fail_fast(soma_uri, ray_cluster, tmp_path):
    with pytest.raises(InputError, match="read_workers 3 asks for 3 CPUs"):
        ingest(ingest_config(soma_uri, tmp_path / "bags.zarr", read_workers=3))
