"""End-to-end ingest from real SOMA / h5ad / Census-shaped sources, and the store's
invariants."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import tiledbsoma

from sampleclr_scale.ingest.features import normalise_log1p
from sampleclr_scale.ingest.stage import hash_order_keys, ingest, plan_buckets
from sampleclr_scale.store.bag_store import BagStore
from tests.conftest import META, ingest_config


def _source_obs(soma_uri: str) -> pd.DataFrame:
    with tiledbsoma.Experiment.open(soma_uri) as exp:
        return exp.obs.read().concat().to_pandas().set_index("soma_joinid")


def _source_embedding(soma_uri: str) -> np.ndarray:
    with tiledbsoma.Experiment.open(soma_uri) as exp:
        array = exp.ms["RNA"].obsm["scvi"]
        return array.read().coos((exp.obs.count, array.shape[1])).concat().to_scipy().toarray()


def test_store_invariants(store_path, soma_uri):
    store = BagStore(store_path)
    obs = _source_obs(soma_uri)
    ptr = store.donor_ptr
    assert ptr[0] == 0 and np.all(np.diff(ptr) > 0) and ptr[-1] == store.n_cells
    assert store.features.shape == (store.n_cells, 8)
    joinid = store.source_joinid()
    assert len(np.unique(joinid)) == len(joinid)

    # rows sorted by donor: every row of donor i comes from that donor in the source
    cells = obs.loc[joinid]
    key = cells["dataset_id"].astype(str) + "/" + cells["donor_id"].astype(str)
    row_donor = np.repeat(np.arange(store.n_donors), store.cells_per_donor)
    assert np.array_equal(key.to_numpy(), store.donors["donor"].to_numpy()[row_donor])

    # only primary cells of real donors; none of the special donors
    assert cells["is_primary_data"].all()
    assert not cells["donor_id"].isin(["pooled", "unknown"]).any()

    # random order inside donors: not sorted by source id
    monotone = [np.all(np.diff(joinid[a:b]) > 0) for a, b in itertools.pairwise(ptr)]
    assert not any(monotone)

    # features round trip to the source rows; cell table matches the source obs
    assert np.array_equal(store.features[:], _source_embedding(soma_uri)[joinid])
    assert np.array_equal(store.cell_table()["cell_type"].astype(str).to_numpy(),
                          cells["cell_type"].astype(str).to_numpy())


def test_donor_table(store_path, soma_uri):
    store = BagStore(store_path)
    donors = store.donors
    obs = _source_obs(soma_uri)
    obs = obs[obs["is_primary_data"] & ~obs["donor_id"].isin(["pooled", "unknown"])]
    assert list(donors.columns) == ["donor", "dataset_id", "donor_id", *META[1:],
                                    "n_cells", "split"]
    assert np.array_equal(donors["n_cells"].to_numpy(), store.cells_per_donor)
    expected = obs.groupby(["dataset_id", "donor_id"], observed=True)[META[1:]].first()
    for _, row in donors.iterrows():
        truth = expected.loc[(row["dataset_id"], row["donor_id"])]
        for column in META[1:]:
            assert row[column] == truth[column] or (pd.isna(row[column]) and pd.isna(truth[column]))
    # stratified split: both disease values on both sides
    assert set(donors["split"]) == {"train", "validation"}
    assert donors.groupby("split")["disease"].nunique().min() == 2
    assert store.attrs["counts"]["cells_of_special_donors"] > 0


def test_h5ad_and_soma_give_the_same_store(store_path, h5ad_path, tmp_path):
    out = tmp_path / "from_h5ad.zarr"
    ingest(ingest_config(h5ad_path, out))
    a, b = BagStore(store_path), BagStore(out)
    assert np.array_equal(a.donor_ptr, b.donor_ptr)
    assert np.array_equal(a.source_joinid(), b.source_joinid())
    assert np.array_equal(a.features[:], b.features[:])
    pd.testing.assert_frame_equal(a.donors.astype(str), b.donors.astype(str))


def test_block_and_bucket_sizes_do_not_change_the_store(store_path, soma_uri, tmp_path):
    out = tmp_path / "small_blocks.zarr"
    ingest(ingest_config(soma_uri, out, read_block=1024, bucket_bytes=2**20, chunk_rows=64))
    a, b = BagStore(store_path), BagStore(out)
    assert np.array_equal(a.source_joinid(), b.source_joinid())
    assert np.array_equal(a.features[:], b.features[:])


def test_plan_buckets_keeps_donors_whole_and_bounded():
    sizes = np.array([5, 3, 9, 1, 1, 20, 2])
    bucket = plan_buckets(sizes, 10)
    assert bucket.tolist() == [0, 0, 1, 1, 2, 3, 4]
    totals = np.bincount(bucket, weights=sizes)
    assert all(t <= 10 or np.sum(bucket == b) == 1 for b, t in enumerate(totals))


def test_hash_order_is_a_seeded_permutation_key():
    ids = np.arange(10_000)
    a, b = hash_order_keys(ids, 1), hash_order_keys(ids, 2)
    assert len(np.unique(a)) == len(ids)
    assert np.array_equal(a, hash_order_keys(ids, 1))
    assert abs(np.corrcoef(np.argsort(a), np.argsort(b))[0, 1]) < 0.05


def test_census_shaped_source(census_uri, store_path, tmp_path):
    """census:PATH: donor key dataset_id/donor_id and primary cells by default."""
    from sampleclr_scale.config import IngestConfig

    out = tmp_path / "census.zarr"
    bare = IngestConfig(source=f"census:{census_uri}", out=str(out))
    assert bare.primary_only and bare.donor_key == ["dataset_id", "donor_id"]
    ingest(bare.model_copy(update={"meta": META, "min_cells": 40, "seed": 3,
                                   "cell_columns": ["cell_type"], "stratify": "disease"}))
    census, soma = BagStore(out), BagStore(store_path)
    assert np.array_equal(census.source_joinid(), soma.source_joinid())
    assert census.attrs["source"].startswith("census:")


def test_pca_features(soma_uri, tmp_path):
    out = tmp_path / "pca.zarr"
    ingest(ingest_config(soma_uri, out, features="pca:5", pca_genes=20, pca_fit_cells=500))
    store = BagStore(out)
    assert store.dim == 5 and store.attrs["features"]["kind"] == "pca"
    x = store.features[:]
    assert np.isfinite(x).all()
    # PCA coordinates are centred on the fitted subsample: column means near zero and
    # variances decreasing
    assert np.abs(x.mean(axis=0)).max() < 0.3 * x.std(axis=0).max()
    assert np.all(np.diff(x.var(axis=0)) < 0.05 * x.var(axis=0)[0])


def test_normalise_log1p_matches_a_dense_reference():
    import scipy.sparse as sp

    counts = sp.csr_matrix(np.array([[1, 0, 3], [0, 0, 0], [2, 2, 0]], dtype=np.float32))
    dense = counts.toarray()
    totals = dense.sum(axis=1, keepdims=True)
    expected = np.log1p(np.divide(dense * 1e4, totals, out=np.zeros_like(dense),
                                  where=totals > 0))
    assert np.allclose(normalise_log1p(counts).toarray(), expected, rtol=1e-6)


def test_non_finite_cells_are_dropped_and_counted(h5ad_path, tmp_path):
    import anndata

    adata = anndata.read_h5ad(h5ad_path)
    bad = np.flatnonzero(adata.obs["is_primary_data"].to_numpy())[[0, 5, 9]]
    adata.obsm["scvi"][bad[:2], 0] = np.nan
    adata.obsm["scvi"][bad[2], 3] = np.inf
    path = tmp_path / "nan.h5ad"
    adata.write_h5ad(path)
    store = BagStore(ingest(ingest_config(str(path), tmp_path / "s.zarr")).out)
    assert store.attrs["counts"]["cells_non_finite"] == 3
    assert not np.isin(bad, store.source_joinid()).any()
    assert np.isfinite(store.features[:]).all()


def test_min_cells_drops_and_counts(soma_uri, tmp_path):
    store = BagStore(ingest(ingest_config(soma_uri, tmp_path / "m.zarr", min_cells=150,
                                          stratify=None)).out)
    counts = store.attrs["counts"]
    assert counts["donors_below_min_cells"] > 0
    assert store.cells_per_donor.min() >= 150
    assert counts["donors"] == store.n_donors


def test_existing_store_is_replaced_only_when_complete(store_path, soma_uri, tmp_path,
                                                       monkeypatch):
    import shutil

    from sampleclr_scale.errors import InputError
    from sampleclr_scale.ingest import features

    out = tmp_path / "keep.zarr"
    shutil.copytree(store_path, out)
    before = BagStore(out).features[:]
    with pytest.raises(InputError, match="already exists"):
        ingest(ingest_config(soma_uri, out))

    def broken(self, joinids):  # fault injection: the source fails mid-read
        raise OSError("disk vanished")

    monkeypatch.setattr(features.EmbeddingFeatures, "read", broken)
    with pytest.raises(OSError, match="disk vanished"):
        ingest(ingest_config(soma_uri, out, overwrite=True))
    assert np.array_equal(BagStore(out).features[:], before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.zarr"]  # no leftovers

    monkeypatch.undo()
    ingest(ingest_config(soma_uri, out, overwrite=True, seed=11))  # re-run is safe
    after = BagStore(out)
    assert after.n_cells == len(before) and not np.array_equal(after.features[:], before)


def _cell_index(tmp_path):
    """Two obs blocks of five cells over three donor groups; group 1 is dropped."""
    from sampleclr_scale.ingest.cell_index import CellIndex

    index = CellIndex(tmp_path, ["cell_type"])
    index.append(np.array([0, 2, 5]), np.array([0, 1, 0]),
                 pd.DataFrame({"cell_type": ["a", None, "b"]}))
    index.append(np.array([9, 7]), np.array([1, 2]),
                 pd.DataFrame({"cell_type": ["c", "b"]}))
    index.keep(np.array([1, -1, 0], dtype=np.int32), n_kept=3)
    return index


@pytest.mark.parametrize(("size", "expected"), [
    # block size -> (joinid, donor, cell_type) of the kept cells, block by block
    (2, [([0], [1], ["a"]), ([5], [1], ["b"]), ([7], [0], ["b"])]),
    (3, [([0, 5], [1, 1], ["a", "b"]), ([7], [0], ["b"])]),
    (5, [([0, 5, 7], [1, 1, 0], ["a", "b", "b"])]),
])
def test_cell_index_reads_back_kept_cells_in_sorted_blocks(tmp_path, size, expected):
    index = _cell_index(tmp_path)
    blocks = list(index.blocks(size))
    assert [(list(b["joinid"]), list(b["donor"]),
             list(index.cell_table(b["codes"])["cell_type"].astype(str)))
            for b in blocks] == expected
    assert index.n_cells == 5 and index.n_kept == 3


def test_cell_index_keeps_missing_values_and_samples_kept_cells(tmp_path):
    index = _cell_index(tmp_path)
    codes = np.concatenate([b["codes"] for b in index.blocks(2)] +
                           [np.fromfile(index.path, index.dtype)["codes"]])
    table = index.cell_table(codes)["cell_type"]
    assert list(table.cat.categories) == ["a", "b", "c"]
    assert table.isna().sum() == 1  # the None of cell 2
    for seed in range(5):
        sample = index.sample(2, seed)
        assert len(sample) == 2 and set(sample) <= {0, 5, 7}
        assert np.all(np.diff(sample) > 0)
        assert np.array_equal(sample, index.sample(2, seed))
    assert list(index.sample(10, 0)) == [0, 5, 7]


def test_split_keeps_groups_together_and_classes_balanced():
    from sampleclr_scale.ingest.split import split_donors

    rng = np.random.default_rng(0)
    donors = pd.DataFrame({"site": rng.integers(0, 10, 200).astype(str),
                           "disease": rng.choice(["a", "b"], 200)})
    split = split_donors(donors, 0.2, "disease", "site", seed=1)
    assert set(split) == {"train", "validation"}
    sides = pd.DataFrame({"site": donors["site"], "split": split}).groupby("site")["split"]
    assert (sides.nunique() == 1).all()  # no site on both sides
    grouped = split_donors(donors, 0.2, None, "site", seed=1)
    assert (pd.DataFrame({"s": donors["site"], "x": grouped}).groupby("s")["x"].nunique()
            == 1).all()
    plain = split_donors(donors, 0.25, "disease", None, seed=1)
    assert (plain == "validation").sum() == 50
    by_class = pd.crosstab(donors["disease"], plain, normalize="index")["validation"]
    assert np.allclose(by_class, 0.25, atol=0.02)
    assert np.array_equal(plain, split_donors(donors, 0.25, "disease", None, seed=1))


def test_features_from_a_separately_hosted_embedding_array(soma_uri, store_path, tmp_path):
    """obsm:URI reads a SOMA sparse array keyed by soma_joinid, as Census hosts embeddings."""
    import pyarrow as pa

    with tiledbsoma.Experiment.open(soma_uri) as exp:
        source = exp.ms["RNA"].obsm["scvi"]
        table = source.read().tables().concat()
        shape = source.shape
    uri = str(tmp_path / "hosted_scvi")
    with tiledbsoma.SparseNDArray.create(uri, type=pa.float32(), shape=shape) as hosted:
        hosted.write(table)
    out = tmp_path / "hosted.zarr"
    ingest(ingest_config(soma_uri, out, features=f"obsm:{uri}"))
    assert np.array_equal(BagStore(out).features[:], BagStore(store_path).features[:])


def test_a_census_copy_named_like_a_version_opens_as_a_folder(census_uri, monkeypatch):
    """``census:census-copy`` names a local folder when one is there (a version otherwise)."""
    from pathlib import Path

    from sampleclr_scale.sources.census import absolute_location as _absolute
    from sampleclr_scale.sources.registry import open_source

    monkeypatch.chdir(Path(census_uri).parent)
    name = Path(census_uri).name
    assert _absolute(name) == str(Path(census_uri).resolve())
    assert _absolute("2025-11-08") == "2025-11-08" and _absolute("stable") == "stable"
    with open_source(f"census:{name}") as source:
        assert "donor_id" in source.obs_columns
