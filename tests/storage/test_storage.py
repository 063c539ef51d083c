"""Stores and outputs behind URIs: Location, publishing to object storage, a bag store on S3;
and the safety of publishing (what --overwrite replaces, locks, crash recovery, cleanup).

S3 is the session's local S3 server (``s3_endpoint`` in conftest); every call goes through
s3fs / zarr / pyarrow over HTTP, as against AWS.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest

from sampleclr_scale.cli import main
from sampleclr_scale.config import LoaderConfig
from sampleclr_scale.embed.writeback import read_back
from sampleclr_scale.errors import InputError
from sampleclr_scale.ingest.stage import ingest
from sampleclr_scale.loading.loader import DonorBagDataset, make_loader
from sampleclr_scale.storage import Location, local_directory, staged_output
from sampleclr_scale.storage.outputs import OutputKind, claim
from sampleclr_scale.store.bag_store import BAG_STORE, BagStore
from sampleclr_scale.train.artifact import load_model
from tests.conftest import ingest_config


def upload_store(store_path: str, uri: str) -> None:
    """Publish a copy of a local store at ``uri`` (commit file last)."""
    with staged_output(uri, overwrite=False, kind=BAG_STORE) as staging:
        fsspec.filesystem("file").cp(store_path, str(staging), recursive=True)


def _files(location: Location) -> dict[str, bytes]:
    """Relative path -> content of every file under ``location``."""
    root = location.path.rstrip("/") + "/"
    return {p[len(root):]: location.fs.cat_file(p) for p in location.fs.find(location.path)}


# --- Location -----------------------------------------------------------------------------


def test_local_paths_and_file_uris_are_absolute_local_paths(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative, uri = Location("runs/a"), Location(f"file://{tmp_path}/runs/a")
    assert relative == uri and relative.is_local and relative.uri == str(tmp_path / "runs/a")
    assert (relative / "model.pt").local == tmp_path / "runs/a/model.pt"
    assert os.fspath(relative) == str(tmp_path / "runs/a") and relative.name == "a"


def test_remote_uris_are_named_and_joined(bucket) -> None:
    run = Location(f"{bucket}/runs/a/")
    assert not run.is_local and run.uri == f"{bucket}/runs/a" and run.name == "a"
    assert (run / "model.pt").uri == f"{bucket}/runs/a/model.pt"
    with pytest.raises(TypeError, match="is remote"):
        os.fspath(run)
    with pytest.raises(InputError, match="is not a local path"):
        _ = run.local


def test_unknown_protocol_names_the_fix() -> None:
    with pytest.raises(InputError, match=r"(?s)cannot open nosuch://x.*install the fsspec"):
        Location("nosuch://x/y")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_files_round_trip(where, tmp_path, bucket) -> None:
    root = Location(tmp_path / "d" if where == "local" else f"{bucket}/d")
    (root / "a.json").write_text('{"x": 1}')
    (root / "sub" / "m.pt").write_torch({"w": np.arange(3)})
    assert (root / "a.json").read_text() == '{"x": 1}' and (root / "a.json").is_file()
    assert np.array_equal((root / "sub" / "m.pt").read_torch("file", "-")["w"], np.arange(3))
    with pytest.raises(TypeError, match="cannot save 'object' as plain data"):
        (root / "o.pt").write_torch({"w": object()})
    assert root.children() == ["a.json", "sub"] and (root / "none").children() == []
    (root / "sub").remove()
    assert not (root / "sub").exists() and root.children() == ["a.json"]
    if where == "local":  # the atomic write left no temporary file behind
        assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["a.json"]


# --- publishing -----------------------------------------------------------------------------


TEST_OUTPUT = OutputKind("a test output", "zarr.json",
                         recognise=lambda where: (where / "zarr.json").is_file())
"""The outputs of the tests below: a folder with a zarr.json."""


def _write_output(staging: Path, marker: str) -> None:
    (staging / "data").mkdir(parents=True)
    (staging / "data" / "part0").write_text(marker)
    (staging / "zarr.json").write_text(marker)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_staged_output_publishes_refuses_and_replaces(where, tmp_path, bucket) -> None:
    final = Location(tmp_path / "out" if where == "local" else f"{bucket}/out")
    with staged_output(final, overwrite=False, kind=TEST_OUTPUT) as staging:
        _write_output(staging, "first")
    assert (final / "zarr.json").read_text() == "first"

    ran = False
    with pytest.raises(InputError, match="already exists"), \
            staged_output(final, overwrite=False, kind=TEST_OUTPUT) as staging:
        ran = True  # refused before the work starts
    assert not ran

    with pytest.raises(RuntimeError), \
            staged_output(final, overwrite=True, kind=TEST_OUTPUT) as staging:
        _write_output(staging, "second")
        raise RuntimeError("the stage failed")
    assert _files(final) == {"data/part0": b"first", "zarr.json": b"first"}  # untouched

    with staged_output(final, overwrite=True, kind=TEST_OUTPUT) as staging:
        (staging / "only").mkdir(parents=True)
        (staging / "only" / "x").write_text("new")
        (staging / "zarr.json").write_text("second")
    assert _files(final) == {"only/x": b"new", "zarr.json": b"second"}  # old files gone
    if where == "local":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_interrupted_upload_is_not_a_store_and_a_rerun_repairs_it(
        store_path, bucket, monkeypatch) -> None:
    uri = f"{bucket}/bags.zarr"
    fs = Location(uri).fs
    real_put_file = fs.put_file

    def fail_on_commit(lpath, rpath, *args, **kwargs):
        if rpath.endswith("bags.zarr/zarr.json"):
            raise ConnectionError("connection lost")
        return real_put_file(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(fs, "put_file", fail_on_commit)
    with pytest.raises(ConnectionError):
        upload_store(store_path, uri)
    monkeypatch.undo()
    assert (Location(uri) / "features" / "zarr.json").is_file()  # the data went up ...
    with pytest.raises(InputError, match="is not a bag store"):
        BagStore(uri)  # ... but without its commit file nobody reads it
    with staged_output(uri, overwrite=True, kind=BAG_STORE) as staging:
        fsspec.filesystem("file").cp(store_path, str(staging), recursive=True)
    assert BagStore(uri).n_cells == BagStore(store_path).n_cells


def test_local_directory_adds_files_to_a_remote_prefix(bucket) -> None:
    report = Location(f"{bucket}/report")
    (report / "keep.txt").write_text("kept")
    with local_directory(report) as directory:
        (directory / "figures").mkdir()
        (directory / "figures" / "a.png").write_bytes(b"png")
        (directory / "keep.txt").write_text("replaced")
    assert _files(report) == {"figures/a.png": b"png", "keep.txt": b"replaced"}


# --- safety: what --overwrite replaces, locks, recovery, cleanup ----------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _dead_pid() -> int:
    """The pid of a process of this machine that has exited."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    return int(child.stdout)


def _record(pid: int) -> bytes:
    """A lock record of ``pid`` on this machine."""
    return json.dumps({"pid": pid, "host": socket.gethostname(),
                       "since": "2026-01-01T00:00:00+00:00", "token": "t"}).encode()


def test_ingest_never_writes_over_or_into_its_source(h5ad_path, soma_uri, tmp_path,
                                                     capsys) -> None:
    source = tmp_path / "c60.h5ad"
    shutil.copyfile(h5ad_path, source)
    before = _sha256(source)
    assert main(["ingest", str(source), "--out", str(source), "--overwrite",
                 "--features", "obsm:scvi", "--donor-key", "dataset_id", "donor_id",
                 "--min-cells", "40"]) == 2
    assert f"--out {source} is {source}, which this stage reads" in capsys.readouterr().err
    assert _sha256(source) == before and _names(tmp_path) == ["c60.h5ad"]

    experiment = tmp_path / "exp"
    shutil.copytree(soma_uri, experiment)
    with pytest.raises(InputError, match="lies inside"):
        ingest(ingest_config(str(experiment), experiment / "bags.zarr"))
    assert not (experiment / "bags.zarr").exists()


def test_overwrite_replaces_a_store_never_a_foreign_folder(soma_uri, store_path,
                                                           tmp_path) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"(?s)is a folder holding notes.txt, not a bag "
                                         r"store.*move or delete it yourself"):
        ingest(ingest_config(soma_uri, folder, overwrite=True))
    assert _names(folder) == ["notes.txt"] and (folder / "notes.txt").read_text() == "mine"

    store = tmp_path / "bags.zarr"
    shutil.copytree(store_path, store)
    ingest(ingest_config(soma_uri, store, overwrite=True, seed=11))
    assert BagStore(store).attrs["ingest"]["seed"] == 11
    assert _names(tmp_path) == ["bags.zarr", "results"]


def test_an_empty_folder_is_replaced_and_a_file_never(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with staged_output(tmp_path / "empty", overwrite=True, kind=TEST_OUTPUT) as staging:
        _write_output(staging, "new")
    assert (tmp_path / "empty" / "zarr.json").read_text() == "new"
    (tmp_path / "table.csv").write_text("a,b")
    with pytest.raises(InputError, match="is a file, not a test output"), \
            staged_output(tmp_path / "table.csv", overwrite=True, kind=TEST_OUTPUT):
        pass
    assert (tmp_path / "table.csv").read_text() == "a,b"


_FIRST_RUN = """
import sys, time
from sampleclr_scale.storage.outputs import OutputKind, claim
from sampleclr_scale.storage import staged_output

kind = OutputKind("a test output", "zarr.json", recognise=lambda where: True)
with staged_output(sys.argv[1], overwrite=False, kind=kind) as staging:
    staging.mkdir()
    (staging / "zarr.json").write_text("first")
    print("staged", flush=True)
    time.sleep(600)
"""


def test_a_concurrent_run_is_refused_and_a_killed_one_leaves_nothing(tmp_path) -> None:
    final = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-c", _FIRST_RUN, str(final)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "staged\n"
        with pytest.raises(InputError, match=rf"another run is writing {final}: pid "
                                             rf"{first.pid} on"), \
                staged_output(final, overwrite=True, kind=TEST_OUTPUT):
            pass
        assert [name for name in _names(tmp_path) if ".tmp-" in name]  # its work is kept
    finally:
        first.kill()
        first.wait()
    # the killed run's lock went with it; the next run removes its staging folder
    with staged_output(final, overwrite=False, kind=TEST_OUTPUT) as staging:
        _write_output(staging, "second")
    assert (final / "zarr.json").read_text() == "second" and _names(tmp_path) == ["out"]


def test_an_output_published_meanwhile_is_not_replaced(tmp_path) -> None:
    final = tmp_path / "cohort.h5ad"
    with pytest.raises(InputError, match="created by another run while this one was"), \
            staged_output(final, overwrite=False, kind=TEST_OUTPUT) as staging:
        staging.write_bytes(b"ours")
        final.write_bytes(b"theirs")  # a writer without the lock publishes first
    assert final.read_bytes() == b"theirs" and _names(tmp_path) == ["cohort.h5ad"]


def test_a_killed_ingest_is_cleaned_up_and_a_live_one_kept(soma_uri, tmp_path) -> None:
    out = tmp_path / "bags.zarr"
    (tmp_path / ".bags.zarr.lock").write_bytes(_record(_dead_pid()))
    for leftover in (".bags.zarr.tmp-dead", "..bags.zarr.tmp-dead.spill-x"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "0.x").write_bytes(b"spilled")
    ingest(ingest_config(soma_uri, out))
    assert _names(tmp_path) == ["bags.zarr"] and BagStore(out).n_donors > 0

    with claim(Location(out)):  # a live run of this process holds the lock
        (tmp_path / ".bags.zarr.tmp-live").mkdir()
        with pytest.raises(InputError, match=rf"pid {os.getpid()} on .* holds the lock"):
            ingest(ingest_config(soma_uri, out, overwrite=True))
        assert (tmp_path / ".bags.zarr.tmp-live").is_dir()


def test_a_crash_between_the_renames_of_an_overwrite_is_repaired(store_path, soma_uri,
                                                                tmp_path) -> None:
    out, aside = tmp_path / "bags.zarr", tmp_path / ".bags.zarr.old"
    shutil.copytree(store_path, aside)  # crashed after moving the old store aside
    with pytest.raises(InputError, match="already exists"):
        ingest(ingest_config(soma_uri, out))  # the store is back, so it is not replaced
    assert BagStore(out).fingerprint == BagStore(store_path).fingerprint
    assert _names(tmp_path) == ["bags.zarr"]

    shutil.copytree(store_path, aside)  # crashed after the new store was in
    (out / "new").write_text("the new store")
    with claim(Location(out)):
        pass
    assert _names(tmp_path) == ["bags.zarr"] and (out / "new").is_file()


def test_remote_overwrite_and_locks(bucket) -> None:
    final = Location(f"{bucket}/out")
    (final / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"holding notes\.txt, not a test output"), \
            staged_output(final, overwrite=True, kind=TEST_OUTPUT):
        pass
    assert _files(final) == {"notes.txt": b"mine"}

    final, lock = Location(f"{bucket}/run"), Location(f"{bucket}/.run.lock")
    lock.write_bytes(_record(os.getpid()))  # a live run of this machine
    with pytest.raises(InputError, match=rf"(?s)pid {os.getpid()} .*delete {lock}"), \
            staged_output(final, overwrite=False, kind=TEST_OUTPUT):
        pass
    lock.write_bytes(_record(_dead_pid()))  # a dead one's lock is taken over
    with staged_output(final, overwrite=False, kind=TEST_OUTPUT) as staging:
        _write_output(staging, "run")
    assert (final / "zarr.json").read_text() == "run" and not lock.exists()


# --- a bag store on S3 ----------------------------------------------------------------------


def test_a_store_on_s3_reads_like_the_local_one(store_path, bucket) -> None:
    uri = f"{bucket}/cohort/bags.zarr"
    upload_store(store_path, uri)
    local, remote = BagStore(store_path), BagStore(uri)
    assert remote.attrs == local.attrs and remote.location.uri == uri
    np.testing.assert_array_equal(remote.donor_ptr, local.donor_ptr)
    np.testing.assert_array_equal(remote.donor_rows(3), local.donor_rows(3))
    np.testing.assert_array_equal(remote.source_joinid(5, 50), local.source_joinid(5, 50))
    pd.testing.assert_frame_equal(remote.donors, local.donors)
    pd.testing.assert_frame_equal(remote.cell_table(), local.cell_table())
    np.testing.assert_array_equal(remote.codes("cell_type")[5:50], local.codes("cell_type")[5:50])

    # the S3 store is read by a spawned DataLoader worker: it opens the store itself
    config = LoaderConfig(batch_size=4, cells_per_view=32, seed=5)
    batches = [list(make_loader(DonorBagDataset(where, config.model_copy(
        update={"num_workers": workers}), rank=1, world_size=2)))
        for where, workers in ((store_path, 0), (uri, 1))]
    assert len(batches[0]) == len(batches[1]) > 0
    for ours, theirs in zip(*batches, strict=True):
        np.testing.assert_array_equal(ours.donor.numpy(), theirs.donor.numpy())
        np.testing.assert_array_equal(ours.cells.numpy(), theirs.cells.numpy())
        np.testing.assert_array_equal(ours.mask.numpy(), theirs.mask.numpy())


# --- every stage on S3 ----------------------------------------------------------------------

TRAIN_YAML = """
preset: small
loader: {batch_size: 4, cells_per_view: 32, seed: 1}
epochs: 3
supervised_epochs: 1
supervised_min_steps: 0
tasks: [{column: severity, kind: ordinal}]
loss: {prior: gloscope}
checkpoint_every: 2
log_every: 100
"""
EVALUATE_YAML = """
relevant: {severity: ordinal}
technical: {sex: categorical}
trajectory: null
seeds: 1
"""


@pytest.mark.ray
def test_every_stage_reads_and_writes_s3(soma_uri, bucket, ray_cluster, tmp_path) -> None:
    """ingest -> prior -> train (2 Ray workers) -> embed -> write back -> evaluate, with the
    store, the run, its checkpoints, the embeddings and the report all on S3."""
    store, run, emb, report = (f"{bucket}/{name}" for name in
                               ("cohort/bags.zarr", "runs/s3run", "embeddings/s3run", "report"))
    (tmp_path / "train.yaml").write_text(TRAIN_YAML)
    (tmp_path / "evaluate.yaml").write_text(EVALUATE_YAML)

    ingest(ingest_config(soma_uri, store))  # built locally, published to S3
    assert main(["prior", "--store", store, "--kind", "gloscope", "--cells", "60"]) == 0
    assert main(["train", "--store", store, "--out", run, "--workers", "2",
                 "--config", str(tmp_path / "train.yaml")]) == 0
    ray_files = Location(f"{run}/ray").fs.find(f"{run}/ray".removeprefix("s3://"))
    assert any(f.endswith("state.pt") for f in ray_files)  # Ray Train's checkpoints on S3
    _, artifact = load_model(run)
    assert artifact["store"] == store and len(artifact["history"]) == 4
    assert main(["train", "--store", store, "--out", run, "--workers", "2",
                 "--config", str(tmp_path / "train.yaml")]) == 2  # refused: the run exists
    checkpoints = Location(f"{run}/ray").fs.find(f"{run}/ray".removeprefix("s3://"))
    assert main(["train", "--store", store, "--out", run, "--workers", "2", "--resume",
                 "--config", str(tmp_path / "train.yaml")]) == 0
    # resumed from its last checkpoint on S3, where it had finished: nothing trained again
    assert Location(f"{run}/ray").fs.find(f"{run}/ray".removeprefix("s3://")) == checkpoints
    assert load_model(run)[1]["history"] == artifact["history"]

    results = tmp_path / "results_exp"  # the SOMA write-back target (local)
    assert main(["embed", "--store", store, "--checkpoint", run, "--out", emb,
                 "--cells", "50", "--write-back", str(results)]) == 0
    provenance = json.loads((Location(emb) / "provenance.json").read_text())
    assert provenance["store"] == store and provenance["checkpoint"] == run
    written = (Location(emb) / "donor_embeddings.parquet").read_parquet().to_pandas()
    z = np.stack(written["z"].to_numpy())
    for where in (store, str(results)):  # written back into the S3 store and the experiment
        donors, weights = read_back(where, "s3run")
        np.testing.assert_allclose(donors.filter(like="z_").to_numpy(), z, rtol=1e-6)
        assert weights.nnz > 0

    assert main(["evaluate", "--embeddings", emb, "--store", store, "--out", report,
                 "--config", str(tmp_path / "evaluate.yaml")]) == 0
    metrics = json.loads((Location(report) / "metrics.json").read_text())
    assert metrics["store"] == store and "gloscope" in metrics["methods"]
    assert (Location(report) / "report.md").is_file()
    assert set(metrics["training"]) == {"s3run"}  # curves read from the run on S3
