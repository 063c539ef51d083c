"""A store edited by hand, its manifest rewritten to match, is refused on open (or by
``check``) with a message naming what is inconsistent; never a traceback or silent zeros."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from sampleclr_scale.cli import main
from sampleclr_scale.errors import InputError
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.manifest import write_manifest


@pytest.fixture
def copy(store_path, tmp_path):
    out = tmp_path / "bags.zarr"
    shutil.copytree(store_path, out)
    return out


def _set_ptr(store, edit) -> None:
    group = zarr.open_group(str(store), mode="r+")
    ptr = group["donor_ptr"][:]
    edit(ptr)
    group["donor_ptr"][:] = ptr
    write_manifest(str(store))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda p: p.__setitem__(slice(1, 3), p[2:0:-1].copy()), r"does not increase at donor"),
    (lambda p: p.__setitem__(0, -5), r"donor_ptr starts at -5, not 0"),
    (lambda p: p.__setitem__(-1, p[-1] + 7), r"donor_ptr ends at \d+, features has \d+ rows"),
])
def test_a_broken_donor_ptr_is_refused(copy, edit, message):
    _set_ptr(copy, edit)
    with pytest.raises(InputError, match=rf"(?s)bag store .* is inconsistent: .*{message}.*"
                                         r"fix: ingest the store again"):
        BagStore(copy)


def test_a_donor_table_with_fewer_rows_is_refused(copy):
    table = pq.read_table(copy / "donors.parquet")
    pq.write_table(table.slice(0, table.num_rows - 2), copy / "donors.parquet")
    write_manifest(str(copy))
    with pytest.raises(InputError, match=r"donors.parquet has \d+ rows, donor_ptr \d+ donors"):
        BagStore(copy)


def test_a_features_chunk_gone_from_disk_and_manifest_is_refused(copy):
    (copy / "features" / "c" / "0" / "0").unlink()
    write_manifest(str(copy))
    with pytest.raises(InputError, match=r"1 chunk\(s\) of features are not in the manifest "
                                         r"\(e.g. features/c/0/0\): Zarr would read them"):
        BagStore(copy)


def test_check_refuses_codes_out_of_range_and_non_finite_features(copy, capsys):
    assert main(["check", str(copy)]) in (0, None)
    assert json.loads(capsys.readouterr().out)["consistent"] is True
    group = zarr.open_group(str(copy), mode="r+")
    n = len(BagStore(copy).categories("cell_type"))
    codes = group["codes/cell_type"][:]
    codes[5] = n + 3
    group["codes/cell_type"][:] = codes
    features = group["features"][:10]
    features[3, 1] = np.nan
    group["features"][:10] = features
    write_manifest(str(copy))
    BagStore(copy)  # cheap checks on open pass: reading every row is check's job
    assert main(["check", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "codes of cell column 'cell_type' lie outside its" in err
    assert "features hold NaN or infinite values (e.g. row 3)" in err
    assert "Traceback" not in err
