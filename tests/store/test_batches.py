"""Technical batches at ingest (``--batch-key``): donor-level check, batch codes, and the
per-batch feature mean and std accumulated out of core, against in-memory references."""

from __future__ import annotations

import json

import anndata
import numpy as np
import pandas as pd
import pytest

from sampleclr_scale.cli import main
from sampleclr_scale.errors import InputError
from sampleclr_scale.ingest.stage import ingest
from sampleclr_scale.store import batches
from sampleclr_scale.store.bag_store import BagStore
from tests.conftest import ingest_config
from tests.ingest.test_ingest import _source_embedding, _source_obs

BATCH_KEY = ["dataset_id", "assay"]
MIN_CELLS = 150  # drops some donors: the statistics cover only the donors written


def _batch_config(source: str, out, **overrides):
    return ingest_config(source, out, batch_key=BATCH_KEY, min_cells=MIN_CELLS,
                         stratify=None, **overrides)


@pytest.fixture(scope="module")
def batch_stores(soma_uri, tmp_path_factory) -> dict[str, BagStore]:
    """The SOMA cohort ingested with ``--batch-key dataset_id assay``: with the default
    bucket size (one bucket here), and with buckets of 500 cells and 97-row slices, so
    many partial moments are merged."""
    root = tmp_path_factory.mktemp("batch_stores")
    ingest(_batch_config(soma_uri, root / "default.zarr"))
    config = _batch_config(soma_uri, root / "small.zarr")
    record_bytes = 4 * 8 + 8 + 4 + 4 * len(config.cell_columns)  # features + cell record
    small = config.model_copy(update={"bucket_bytes": 500 * record_bytes})  # below the min
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batches, "_SLICE_ROWS", 97)
        ingest(small)
    stores = {"default": BagStore(root / "default.zarr"), "small": BagStore(root / "small.zarr")}
    assert stores["small"].n_cells > 5 * 500  # several buckets
    return stores


def _reference(rows: np.ndarray, codes: np.ndarray, n_batches: int):
    """Mean and population std per code, in float64, all rows in memory."""
    x = rows.astype(np.float64)
    mean = np.stack([x[codes == b].mean(axis=0) for b in range(n_batches)])
    std = np.stack([x[codes == b].std(axis=0) for b in range(n_batches)])
    return mean, np.where(std < batches.MIN_STD, 1.0, std)


@pytest.mark.parametrize("which", ["default", "small"])
def test_batch_stats_match_the_stores_own_rows(batch_stores, which):
    store = batch_stores[which]
    mean, std = store.batch_stats
    assert mean.dtype == std.dtype == np.float32 and mean.shape == (4, store.dim)
    row_batch = np.repeat(store.donor_batch, store.cells_per_donor)
    ref_mean, ref_std = _reference(store.features[:], row_batch, len(store.batch_labels))
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std, ref_std, rtol=1e-6, atol=1e-7)


def test_batch_stats_match_the_source_rows_of_the_kept_cells(batch_stores, soma_uri):
    store = batch_stores["default"]
    obs = _source_obs(soma_uri)
    obs = obs[obs["is_primary_data"] & ~obs["donor_id"].isin(["pooled", "unknown"])]
    size = obs.groupby(["dataset_id", "donor_id"], observed=True)["assay"].transform("size")
    obs = obs[size >= MIN_CELLS]
    labels = (obs["dataset_id"].astype(str) + "|" + obs["assay"].astype(str)).to_numpy()
    assert sorted(set(labels)) == store.batch_labels
    codes = np.searchsorted(store.batch_labels, labels)
    rows = _source_embedding(soma_uri)[obs.index.to_numpy()]
    ref_mean, ref_std = _reference(rows, codes, len(store.batch_labels))
    mean, std = store.batch_stats
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std, ref_std, rtol=1e-6, atol=1e-7)
    assert int(store.attrs["counts"]["donors_below_min_cells"]) > 0


def test_batch_stats_do_not_depend_on_the_bucket_size(batch_stores):
    a, b = batch_stores["default"], batch_stores["small"]
    assert np.array_equal(a.features[:], b.features[:])
    np.testing.assert_allclose(a.batch_stats[0], b.batch_stats[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a.batch_stats[1], b.batch_stats[1], rtol=1e-6, atol=1e-7)


def test_batch_codes_labels_and_donor_table(batch_stores, store_path):
    store = batch_stores["default"]
    labels = ["site-0|10x 3' v3", "site-1|10x 5' v2", "site-2|10x 3' v3", "site-3|10x 5' v2"]
    assert store.batch_key == BATCH_KEY and store.batch_labels == labels
    assert store.attrs["batch"] == {"key": BATCH_KEY, "labels": labels}
    assert store.attrs["ingest"]["batch_key"] == BATCH_KEY
    donors = store.donors
    assert donors["batch"].dtype == np.int32 and store.donor_batch.dtype == np.int32
    joined = donors["dataset_id"].astype(str) + "|" + donors["assay"].astype(str)
    assert np.array_equal(np.array(labels)[store.donor_batch], joined.to_numpy())
    # the rest of the store is the store without --batch-key, less the small donors
    base = BagStore(store_path)
    kept = base.cells_per_donor >= MIN_CELLS
    assert np.array_equal(store.features[:], base.features[:][np.repeat(kept,
                                                                        base.cells_per_donor)])
    columns = [c for c in base.donors.columns if c != "split"]
    pd.testing.assert_frame_equal(donors[columns],
                                  base.donors.loc[kept, columns].reset_index(drop=True))


def test_standardize_matches_the_reference(batch_stores):
    store = batch_stores["small"]
    mean, std = store.batch_stats
    codes = store.donor_batch
    one = store.donor_rows(5)
    expected = (one - mean[codes[5]]) / std[codes[5]]
    assert store.standardize(one, int(codes[5])).dtype == np.float32
    np.testing.assert_allclose(store.standardize(one, int(codes[5])), expected, rtol=1e-6)
    bags = np.stack([store.donor_rows(d)[:50] for d in range(store.n_donors)])  # [B, m, d]
    expected = (bags - mean[codes][:, None]) / std[codes][:, None]
    np.testing.assert_allclose(store.standardize(bags, codes), expected, rtol=1e-6)
    per_row = np.repeat(codes[:, None], 50, axis=1)  # [B, m] codes
    np.testing.assert_allclose(store.standardize(bags, per_row), expected, rtol=1e-6)
    # over all cells of a batch the standardised features have mean 0 and std 1
    x = store.standardize(store.features[:], np.repeat(codes, store.cells_per_donor))
    for b in range(len(store.batch_labels)):
        rows = x[np.repeat(codes, store.cells_per_donor) == b].astype(np.float64)
        np.testing.assert_allclose(rows.mean(axis=0), 0, atol=1e-5)
        np.testing.assert_allclose(rows.std(axis=0), 1, atol=1e-5)
    with pytest.raises(InputError, match=r"batch codes must be in 0\.\.3"):
        store.standardize(one, -1)
    with pytest.raises(InputError, match="do not broadcast"):
        store.standardize(bags, codes[:3])


def test_a_store_without_batch_key_has_no_batch_stats(store_path):
    store = BagStore(store_path)
    assert store.batch_key == [] and store.batch_labels == []
    assert store.donor_batch is None and store.batch_stats is None
    assert "batch" not in store.attrs and "batch_key" not in store.attrs["ingest"]
    assert "batch" not in store.donors.columns
    with pytest.raises(InputError, match=r"(?s)no per-batch statistics.*--batch-key"):
        store.standardize(store.donor_rows(0), 0)


def test_batch_moments_merge_slices_stably(monkeypatch):
    """Chan's merge over many uneven slices matches a two-pass float64 reference, also for
    a large offset (where a raw sum of squares loses the variance) and constant features."""
    rng = np.random.default_rng(0)
    rows = (1e4 + 1e-2 * rng.normal(size=(5000, 3))).astype(np.float32)
    rows[:, 2] = 7.0
    codes = rng.integers(0, 4, 5000)
    monkeypatch.setattr(batches, "_SLICE_ROWS", 333)
    moments = batches.BatchMoments(5, 3)  # batch 4 gets no rows
    for part in np.array_split(np.arange(5000), [10, 11, 2000, 4990]):
        moments.add(rows[part], codes[part])
    mean, std = moments.result()
    ref_mean, ref_std = _reference(rows, codes, 4)
    np.testing.assert_allclose(mean[:4], ref_mean, rtol=1e-7)
    np.testing.assert_allclose(std[:4], ref_std, rtol=1e-5)
    assert np.all(std[:, 2] == 1.0) and np.all(mean[4] == 0) and np.all(std[4] == 1)
    assert moments.count.tolist() == [*np.bincount(codes).tolist(), 0]


def _h5ad_with(h5ad_path: str, tmp_path, column: str, values) -> str:
    adata = anndata.read_h5ad(h5ad_path)
    adata.obs[column] = values(adata.obs)
    path = tmp_path / f"{column}.h5ad"
    adata.write_h5ad(path)
    return str(path)


def test_a_batch_column_varying_within_a_donor_is_refused(h5ad_path, tmp_path):
    path = _h5ad_with(h5ad_path, tmp_path, "pool",
                      lambda obs: np.where(np.arange(len(obs)) % 2, "pool-a", "pool-b"))
    with pytest.raises(InputError) as err:
        ingest(ingest_config(path, tmp_path / "s.zarr", batch_key=["dataset_id", "pool"]))
    message = str(err.value)
    assert "'pool' is not donor-level" in message and "e.g. donor 'site-" in message
    assert "add pool to --donor-key" in message and "constant within each donor" in message
    assert not (tmp_path / "s.zarr").exists()


def test_missing_batch_values_are_refused(h5ad_path, tmp_path):
    def with_gaps(obs: pd.DataFrame) -> pd.Series:
        pool = obs["dataset_id"].astype(str).str.replace("site", "pool").astype(object)
        real = obs["is_primary_data"].to_numpy() & ~obs["donor_id"].isin(["pooled",
                                                                          "unknown"])
        pool.iloc[np.flatnonzero(real)[[3, 50, 700]]] = None
        pool.iloc[np.flatnonzero(~real)[:5]] = None  # not in the cohort: not counted
        return pool

    path = _h5ad_with(h5ad_path, tmp_path, "pool", with_gaps)
    with pytest.raises(InputError, match=r"(?s)'pool' has no value \(None/NaN\) for 3 cells"
                                         r" of \d donors?.*--obs-filter \"pool in \["):
        ingest(ingest_config(path, tmp_path / "s.zarr", batch_key=["pool"]))


def test_cli_batch_key_and_yaml(h5ad_path, tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    common = ["--donor-key", "dataset_id", "donor_id", "--min-cells", "40", "--primary-only"]
    assert main(["ingest", h5ad_path, "--out", str(out), *common,
                 "--batch-key", "dataset_id"]) == 0
    summary = json.loads(capsys.readouterr().out)
    store = BagStore(out)
    assert summary["donors"] == store.n_donors
    assert store.batch_key == ["dataset_id"]
    assert store.batch_labels == ["site-0", "site-1", "site-2", "site-3"]
    assert "dataset_id" in store.donors.columns and store.batch_stats[0].shape == (4, 8)

    config = tmp_path / "ingest.yaml"
    config.write_text("batch_key: [assay]\n")
    out = tmp_path / "yaml.zarr"
    assert main(["ingest", h5ad_path, "--out", str(out), "--config", str(config), *common]) == 0
    store = BagStore(out)
    assert store.batch_key == ["assay"] and store.batch_labels == ["10x 3' v3", "10x 5' v2"]
    assert "assay" in store.donors.columns
