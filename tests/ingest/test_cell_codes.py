"""Per-cell category codes in the bag store (``codes/<column>``, ``cell_codes``): written
bucket by bucket with the features, against the store's own cell table."""

from __future__ import annotations

import anndata
import numpy as np
import pytest
import zarr

from sampleclr_scale.errors import InputError
from sampleclr_scale.ingest.stage import ingest
from sampleclr_scale.store.bag_store import BagStore, code_dtype, create_arrays
from tests.conftest import ingest_config

COLUMNS = ["cell_type", "cell_state"]
BUCKET_CELLS = 500


@pytest.fixture(scope="module")
def code_stores(soma_uri, tmp_path_factory) -> dict[str, BagStore]:
    """The SOMA cohort with two cell columns: default buckets (one here) and chunks, and
    buckets of 500 cells with 64-row chunks, so bucket ends fall inside chunks."""
    root = tmp_path_factory.mktemp("code_stores")
    ingest(ingest_config(soma_uri, root / "default.zarr", cell_columns=COLUMNS))
    config = ingest_config(soma_uri, root / "small.zarr", cell_columns=COLUMNS, chunk_rows=64)
    record_bytes = 4 * 8 + 8 + 4 + 4 * len(COLUMNS)  # features + cell record
    ingest(config.model_copy(update={"bucket_bytes": BUCKET_CELLS * record_bytes}))
    stores = {"default": BagStore(root / "default.zarr"), "small": BagStore(root / "small.zarr")}
    assert stores["small"].n_cells > 5 * BUCKET_CELLS  # several buckets
    return stores


@pytest.mark.parametrize("which", ["default", "small"])
def test_codes_equal_the_cell_tables_codes_row_for_row(code_stores, which):
    store = code_stores[which]
    table = store.cell_table()
    assert store.code_columns == COLUMNS
    for column in COLUMNS:
        codes = store.codes(column)
        assert isinstance(codes, zarr.Array)
        assert codes.dtype == np.int16 and codes.shape == (store.n_cells,)
        assert codes.chunks == (store.features.chunks[0],)
        np.testing.assert_array_equal(codes[:], table[column].cat.codes.to_numpy())
        assert store.categories(column) == [str(c) for c in table[column].cat.categories]
        # a window of rows is a range read, like the features
        a, b = int(store.donor_ptr[3]), int(store.donor_ptr[3]) + 100
        np.testing.assert_array_equal(codes[a:b], table[column].cat.codes.to_numpy()[a:b])


@pytest.mark.parametrize("which", ["default", "small"])
def test_counts_are_a_bincount_of_the_cell_table(code_stores, which):
    store = code_stores[which]
    table = store.cell_table()
    for column in COLUMNS:
        counts = store.category_counts(column)
        n_categories = len(table[column].cat.categories)
        expected = np.bincount(table[column].cat.codes.to_numpy(), minlength=n_categories)
        assert counts.dtype == np.int64 and len(counts) == len(store.categories(column))
        np.testing.assert_array_equal(counts, expected)
        assert counts.sum() == store.n_cells


def test_codes_do_not_depend_on_the_bucket_size(code_stores):
    default, small = code_stores["default"], code_stores["small"]
    np.testing.assert_array_equal(default.source_joinid(), small.source_joinid())
    assert default.attrs["cell_codes"] == small.attrs["cell_codes"]
    for column in COLUMNS:
        np.testing.assert_array_equal(default.codes(column)[:], small.codes(column)[:])


def test_a_missing_column_names_the_available_ones_and_the_fix(code_stores):
    store = code_stores["default"]
    for read in (store.codes, store.categories, store.category_counts):
        with pytest.raises(InputError, match=r"cell_type.*cell_state.*\n.*--cell-columns "
                                             r"cell_type cell_state donor_id"):
            read("donor_id")


def test_a_store_without_cell_columns_has_no_codes(soma_uri, tmp_path):
    out = tmp_path / "plain.zarr"
    ingest(ingest_config(soma_uri, out, cell_columns=[]))
    store = BagStore(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "donor_ptr", "donors.parquet", "features", "manifest.json", "source_joinid",
        "zarr.json"]
    assert "cell_codes" not in store.attrs and store.code_columns == []
    with pytest.raises(InputError, match=r"no column.*\n.*re-ingest with --cell-columns "
                                         r"cell_type"):
        store.codes("cell_type")


def test_missing_values_are_minus_one_and_not_counted(h5ad_path, tmp_path):
    """cell_type set to NaN for some cells (the simulator writes none), and non-finite
    features on others, so the codes array is trimmed to the rows written."""
    adata = anndata.read_h5ad(h5ad_path)
    primary = np.flatnonzero(adata.obs["is_primary_data"].to_numpy())
    cell_type = adata.obs["cell_type"].copy()
    cell_type.iloc[primary[::7]] = np.nan
    adata.obs["cell_type"] = cell_type
    adata.obsm["scvi"][primary[[1, 3]], 0] = np.nan
    path = tmp_path / "missing.h5ad"
    adata.write_h5ad(path)
    store = BagStore(ingest(ingest_config(str(path), tmp_path / "m.zarr")).out)
    assert store.attrs["counts"]["cells_non_finite"] == 2
    table = store.cell_table()["cell_type"]
    codes = store.codes("cell_type")
    assert codes.shape == (store.n_cells,)
    missing = table.isna().to_numpy()
    assert missing.sum() > 100
    np.testing.assert_array_equal(codes[:] == -1, missing)
    np.testing.assert_array_equal(codes[:], table.cat.codes.to_numpy())
    counts = store.category_counts("cell_type")
    assert counts.sum() == store.n_cells - missing.sum()
    np.testing.assert_array_equal(counts, np.bincount(codes[:][~missing],
                                                      minlength=len(counts)))


def test_code_dtype_widens_past_the_int16_range(tmp_path):
    assert code_dtype(1) == code_dtype(32_767) == np.int16
    assert code_dtype(32_768) == np.int32
    group = create_arrays(tmp_path / "s.zarr", n_cells=10, dim=2, dtype="float32",
                          chunk_rows=4, code_columns={"few": 3, "many": 40_000})
    assert group["codes/few"].dtype == np.int16 and group["codes/many"].dtype == np.int32
    assert group["codes/many"].chunks == (4,) and group["codes/many"][:].tolist() == [-1] * 10


@pytest.mark.parametrize("name", ["a/b", "", "__x", ".."])
def test_a_column_that_cannot_name_an_array_is_refused(tmp_path, name):
    with pytest.raises(InputError, match="cannot name the Zarr array"):
        create_arrays(tmp_path / "s.zarr", n_cells=10, dim=2, dtype="float32",
                      chunk_rows=4, code_columns={name: 3})
