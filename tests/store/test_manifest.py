"""The store's manifest (issue #11): a store that lost or damaged a file is refused by name,
on open, on read and by ``sampleclr-scale check``, instead of reading Zarr's fill values.

Every store here is a real one: a copy of the session's ingested store, damaged on disk,
or one ingested to the session's S3 server.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from sampleclr_scale.cli import main
from sampleclr_scale.config import LoaderConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.ingest.stage import ingest
from sampleclr_scale.loading.loader import DonorBagDataset
from sampleclr_scale.storage import Location
from sampleclr_scale.store.bag_store import DONORS_FILE, BagStore
from sampleclr_scale.store.manifest import MANIFEST_FILE, check_store, read_manifest
from tests.conftest import ingest_config

FEATURES_CHUNK = "features/c/1/0"  # the test store's second (last) chunk of 4096 rows
DONOR_PTR_CHUNK = "donor_ptr/c/0"


@pytest.fixture
def store(store_path, tmp_path) -> Path:
    """A copy of the session's store, free to damage."""
    copy = tmp_path / "bags.zarr"
    shutil.copytree(store_path, copy)
    return copy


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _flip(path: Path, at: int) -> None:
    """Change one byte, keeping the size."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _damaged(store: Path) -> str:
    """The InputError message of opening ``store``."""
    with pytest.raises(InputError) as err:
        BagStore(store)
    return str(err.value)


def test_ingest_lists_every_file_of_the_store(store_path, capsys) -> None:
    root = Path(store_path)
    # what later stages add (priors, embeddings written back) is not ingest's
    on_disk = {p.relative_to(root).as_posix(): p.stat().st_size
               for p in root.rglob("*") if p.is_file()
               and p.relative_to(root).parts[0] not in ("priors", "embeddings")}
    manifest = read_manifest(Location(root))
    assert manifest.sizes == {k: v for k, v in on_disk.items() if k != MANIFEST_FILE}
    assert {FEATURES_CHUNK, DONOR_PTR_CHUNK, DONORS_FILE, "zarr.json"} <= set(manifest.files)

    assert main(["check", store_path]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] is True and summary["files"] == len(manifest.files)
    assert summary["fingerprint"] == BagStore(store_path).fingerprint == manifest.fingerprint


def test_a_missing_features_chunk_is_named_on_open(store) -> None:
    # before: the store opened and the chunk's rows read as zeros (its fill value)
    (store / FEATURES_CHUNK).unlink()
    message = _damaged(store)
    assert f"{FEATURES_CHUNK} (missing)" in message
    assert f"sampleclr-scale ingest SOURCE --out {store} --overwrite" in message
    with pytest.raises(InputError, match=FEATURES_CHUNK):  # so training refuses it too
        DonorBagDataset(str(store), LoaderConfig(cells_per_view=10))


def test_a_truncated_features_chunk_is_named_on_open(store) -> None:
    size = (store / FEATURES_CHUNK).stat().st_size
    _truncate(store / FEATURES_CHUNK, 1000)
    assert f"{FEATURES_CHUNK} (1000 bytes, {size} in the manifest)" in _damaged(store)


def test_a_truncated_donor_table_is_named_on_open(store) -> None:
    # before: a raw pyarrow traceback, once the table was first read
    _truncate(store / DONORS_FILE, 100)
    assert f"{DONORS_FILE} (100 bytes" in _damaged(store)


def test_a_missing_donor_ptr_chunk_is_named_on_open(store) -> None:
    # before: the pointers read as zeros: "views ... larger than any donor (largest has 0)"
    (store / DONOR_PTR_CHUNK).unlink()
    assert f"{DONOR_PTR_CHUNK} (missing)" in _damaged(store)


def test_the_open_check_names_ten_files_and_check_names_all(store, capsys) -> None:
    lost = [path for path in read_manifest(Location(store)).files if path != "zarr.json"]
    assert len(lost) > 10
    for path in lost:
        (store / path).unlink()
    message = _damaged(store)
    assert message.count("(missing)") == 10
    assert f"and {len(lost) - 10} more (`sampleclr-scale check {store}` names them" in message
    assert main(["check", str(store)]) == 2
    err = capsys.readouterr().err
    assert f"{len(lost)} file(s) differ" in err
    assert all(f"{path} (missing)" in err for path in lost)


def test_a_chunk_lost_after_the_open_is_an_error_when_read(store) -> None:
    bags = BagStore(store)
    last = bags.n_cells - 1
    np.testing.assert_array_equal(bags.features[last:], BagStore(store).features[last:])
    (store / FEATURES_CHUNK).unlink()  # after the open check
    with pytest.raises(InputError, match=rf"{FEATURES_CHUNK} \(missing, found on read\)"):
        bags.features[last:]
    _truncate(store / "source_joinid" / "c" / "0", 10)
    with pytest.raises(InputError, match=r"source_joinid/c/0 \(10 bytes, \d+ in the manifest, "
                                         r"found on read\)"):
        bags.source_joinid(0, 10)


def test_check_finds_changed_bytes_the_open_check_cannot_see(store, capsys) -> None:
    manifest = read_manifest(Location(store))
    _flip(store / FEATURES_CHUNK, 123)
    _flip(store / DONORS_FILE, 10)
    BagStore(store)  # sizes unchanged: opens (the open check does not read the data)
    assert main(["check", str(store)]) == 2
    err = capsys.readouterr().err
    for path in (FEATURES_CHUNK, DONORS_FILE):
        assert f"{path} (CRC32 " in err and f"{manifest.files[path][1]} in the manifest" in err
    assert "2 file(s) differ" in err and "--overwrite" in err


def test_a_store_without_a_manifest_is_refused(store) -> None:
    (store / MANIFEST_FILE).unlink()  # as written by an older version
    message = _damaged(store)
    assert f"has no {MANIFEST_FILE}" in message and "--overwrite" in message
    (store / MANIFEST_FILE).write_text('{"files": []}')
    assert "is not a bag store manifest" in _damaged(store)


def test_what_is_added_later_is_outside_the_manifest(store) -> None:
    before = BagStore(store).fingerprint
    prior = zarr.open_group(str(store / "priors" / "pseudobulk"), mode="w")
    prior.create_array("values", data=np.ones(4, dtype=np.float32))  # as save_prior does
    assert BagStore(store).fingerprint == before
    assert check_store(store)["complete"]


def test_a_store_ingested_to_s3_is_checked(soma_uri, bucket) -> None:
    uri = f"{bucket}/cohort/bags.zarr"
    ingest(ingest_config(soma_uri, uri))  # built locally, published to S3
    manifest = read_manifest(Location(uri))
    assert check_store(uri)["fingerprint"] == BagStore(uri).fingerprint == manifest.fingerprint
    fs = Location(uri).fs
    fs.rm_file(f"{Location(uri).path}/{FEATURES_CHUNK}")
    with pytest.raises(InputError, match=rf"{FEATURES_CHUNK} \(missing\)"):
        BagStore(uri)


def test_a_chunk_lost_between_epochs_stops_the_next_one(store) -> None:
    # the dataset checks the store once; each epoch re-opens it without the open check,
    # and the read of a lost chunk still names it (the mmap reader keeps its maps, and so
    # the data, for the process's next epoch)
    config = LoaderConfig(batch_size=4, cells_per_view=20, reader="zarr", balance=None)
    dataset = DonorBagDataset(str(store), config, rank=0, world_size=1)
    assert len(list(dataset)) == len(dataset)
    (store / FEATURES_CHUNK).unlink()
    dataset.set_epoch(1)
    with pytest.raises(InputError, match=rf"{FEATURES_CHUNK} \(missing, found on read\)"):
        list(dataset)
    with pytest.raises(InputError, match=rf"{FEATURES_CHUNK} \(missing\)"):
        DonorBagDataset(str(store), config, rank=0, world_size=1)
