"""Write embedding results back where the data lives: the SOMA experiment and the store.

Both writers read an embedding output directory (``donor_embeddings.parquet``,
``cell_weights.parquet``, ``provenance.json`` and, for a model with supervised heads,
``predictions.parquet``, see :mod:`~sampleclr_scale.embed.embedder`), so a write-back can
be repeated from the files.

SOMA experiment layout (only ``sampleclr/<run>`` is ever written; obs, ms and every other
member of the experiment are left untouched)::

    EXPERIMENT/sampleclr/            Collection, created if missing
      <run>/                         Collection; metadata complete=True, run, dim,
                                     n_heads, n_obs, provenance (JSON text)
        sample_embeddings            DataFrame indexed by soma_joinid = donor_index:
                                     donor, the donor key columns, split (strings),
                                     z_0 .. z_{D-1} (float32), then the columns of
                                     predictions.parquet if any (<task>_pred as strings
                                     or numbers, <task>_p_<class> float64)
        cell_weights                 SparseNDArray float32 [n_obs, H]: (cell soma_joinid,
                                     head) -> weight; a cell chosen twice is stored once

``z`` is one float32 column per dimension because tiledbsoma (2.3) refuses list-typed
DataFrame columns. ``n_obs`` is the experiment's number of cells (the largest chosen id
plus one when the experiment has no obs, as for a Census write-back target).

A run appears complete or not at all: it is written as member ``<run>.tmp-<id>`` (in
folder ``<run>-<id>``), marked ``complete`` last, then the old ``<run>`` member (if any)
is removed, the new folder added as ``<run>`` and the staging member removed; the old
run's folder is deleted from local storage (left in place, with a warning, on remote
storage). :func:`read_back` refuses members not marked complete. One writer per run at a
time.

**Census is read-only.** For a store ingested from Census (source ``census:...``) the
results go to a separate SOMA experiment named by ``write_back`` (required; created,
empty, if missing), with ``cell_weights`` keyed by Census ``soma_joinid`` — join it with
Census's obs of the same release.

Store layout (a Zarr v3 group per run, published atomically by
:func:`~sampleclr_scale.storage.staged_output`, also into a store behind a URI)::

    STORE/embeddings/<run>/          attrs: run, dim, n_heads, provenance
      z                              float32 [n_donors, D], row i = donor position i
      cell_donor_index               int64 [n]   one entry per chosen cell, repeats kept
      cell_store_row                 int64 [n]
      cell_source_joinid             int64 [n]
      cell_weights                   float32 [n, H]
      predictions.parquet            a copy of the embedding folder's, if it has one (as
                                     the store's own donors.parquet)

:func:`read_back` returns the prediction columns with the donor table from either.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
import zarr

from sampleclr_scale.config import is_census
from sampleclr_scale.embed.config import (
    CELLS_PARQUET,
    DONORS_PARQUET,
    PREDICTIONS_PARQUET,
    PROVENANCE_FILE,
    STAGING_MARK,
    check_run_name,
    check_write_back,
)
from sampleclr_scale.errors import InputError
from sampleclr_scale.storage import Location, staged_output
from sampleclr_scale.storage.outputs import zarr_output
from sampleclr_scale.store.bag_store import BagStore

log = logging.getLogger(__name__)

COLLECTION = "sampleclr"
SAMPLES = "sample_embeddings"
CELLS = "cell_weights"
STORE_FOLDER = "embeddings"
STORE_RESULTS = zarr_output("a run's results", ("run", "provenance"), "z")
"""What replacing a run's results in a store replaces (``STORE/embeddings/<run>``)."""
_READ_ROWS = 1 << 20
"""Cell rows read from the Parquet file per batch."""


class _Results:
    """An embedding output directory: donors with ``z``, provenance, cell weights."""

    def __init__(self, directory: str | Path | Location) -> None:
        self.directory = Location(directory)
        try:
            self.provenance: dict[str, Any] = json.loads(
                (self.directory / PROVENANCE_FILE).read_text())
            donors = (self.directory / DONORS_PARQUET).read_parquet()
            self._cells = (self.directory / CELLS_PARQUET).parquet_file()
            self.predictions = _read_predictions(self.directory / PREDICTIONS_PARQUET)
        except (OSError, ValueError) as err:
            raise InputError(f"{self.directory} is not a complete embedding output: {err}",
                             "run `sampleclr-scale embed` to create it") from None
        self.z = np.asarray(donors["z"].combine_chunks().flatten(), dtype=np.float32
                            ).reshape(donors.num_rows, -1)
        self.donors = donors.drop_columns(["z"]).to_pandas()
        self.heads = [n for n in self._cells.schema_arrow.names if n.startswith("head_")]

    @property
    def n_cells(self) -> int:
        """Rows of the cell table."""
        return self._cells.metadata.num_rows

    @property
    def key_columns(self) -> list[str]:
        """``donor``, the donor key columns and ``split``, without repeats."""
        return list(dict.fromkeys(["donor", *self.provenance["donor_key"], "split"]))

    @property
    def prediction_columns(self) -> list[str]:
        """The columns of ``predictions.parquet`` after ``donor_index`` and ``donor``."""
        if self.predictions is None:
            return []
        return [c for c in self.predictions.columns if c not in ("donor_index", "donor")]

    def cell_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """The cell table in batches of at most a million rows."""
        return self._cells.iter_batches(batch_size=_READ_ROWS, columns=columns)

    def unique_weights(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches of ``(soma_joinid [u], weights [u, H])``, each id once per batch."""
        for batch in self.cell_batches(["source_joinid", *self.heads]):
            ids = batch.column(0).to_numpy()
            ids, first = np.unique(ids, return_index=True)
            weights = np.column_stack([batch.column(h + 1).to_numpy()[first]
                                       for h in range(len(self.heads))])
            yield ids, weights.astype(np.float32)

    def max_joinid(self) -> int:
        """Largest source id among the chosen cells."""
        return max(int(b.column(0).to_numpy().max()) for b in self.cell_batches(["source_joinid"]))


def _read_predictions(path: Location) -> pd.DataFrame | None:
    """An embedding folder's predictions (checked to be one row per donor, in donor order),
    or None without the file."""
    if not path.is_file():
        return None
    predictions = path.read_parquet().to_pandas()
    if predictions["donor_index"].tolist() != list(range(len(predictions))):
        raise InputError(f"{path} is not one row per donor in donor order",
                         "re-run `sampleclr-scale embed`")
    return predictions


def soma_target(store: BagStore, write_back: str | None) -> str | None:
    """The SOMA experiment that receives a store's results, or None.

    Parameters
    ----------
    store
        The embedded bag store.
    write_back
        Explicit target URI, or None for the default: the store's source experiment for a
        SOMA-sourced store, nothing for an h5ad-sourced one.

    Raises
    ------
    InputError
        When the target would be Census (read-only): a Census-sourced store needs an
        explicit ``write_back``, and ``write_back`` cannot name Census; for a
        ``write_back`` that names no experiment (``none``, ``false``, ...:
        :func:`~sampleclr_scale.embed.config.valid_write_back`).
    """
    if write_back is not None:
        check_write_back(write_back)
        if is_census(write_back):
            raise InputError(f"cannot write back to {write_back!r}: Census is read-only",
                             "pass --write-back URI of a local SOMA experiment")
        return write_back
    source = str(store.attrs.get("source", ""))
    if is_census(source):
        raise InputError(
            f"the store {store.location} was built from Census ({source}), which is read-only",
            "pass --write-back URI of a local SOMA experiment to receive the results "
            "(created if missing; cells keyed by Census soma_joinid)",
        )
    return source if store.attrs.get("source_kind") == "soma" else None


def write_back_soma(embeddings: str | Path | Location, uri: str, run: str) -> str:
    """Write results into ``uri``'s ``sampleclr/<run>``, replacing a previous run of that name.

    Parameters
    ----------
    embeddings
        Embedding output directory.
    uri
        SOMA experiment (created, empty, if missing).
    run
        Run name.

    Returns
    -------
    str
        URI of the run's collection.
    """
    check_run_name(run)
    if "://" not in uri:  # tiledbsoma relates member URIs to absolute paths only
        uri = str(Path(uri).resolve())
    results = _Results(embeddings)
    home, n_obs = _prepare(uri, results.max_joinid())
    staging = _stage(home, run, results, n_obs)
    return _publish(home, staging, run)


def check_soma_target(uri: str) -> None:
    """Refuse a write-back target that exists but is no SOMA experiment (a bag store, a
    file, a folder of other files): the write-back would create an experiment inside it.

    Raises
    ------
    InputError
        Saying what is there.
    """
    import tiledbsoma

    try:
        where = Location(uri)
    except InputError:  # a URI scheme only TileDB knows, e.g. tiledb://
        return
    if not where.exists() or tiledbsoma.Experiment.exists(str(uri)):
        return
    what = ("a bag store (a Zarr group)" if where.is_zarr_group() else
            "a file" if where.is_file() else "a folder that is not a SOMA experiment"
            if where.children() else None)
    if what is not None:
        raise InputError(f"--write-back {uri} is {what}: writing back would create a SOMA "
                         "experiment inside it",
                         "write back into the SOMA experiment the store was ingested from, "
                         "or a new path (--no-write-back writes the embedding folder only)")


def _prepare(uri: str, top: int) -> tuple[str, int]:
    """Check (or create) the experiment and its ``sampleclr`` collection.

    Returns the collection's URI and ``n_obs``, the rows of the cell-weight array: the
    experiment's number of cells, or ``top + 1`` (``top``: the largest chosen cell id)
    for an experiment without obs.
    """
    import tiledbsoma

    if not tiledbsoma.Experiment.exists(uri):
        if _exists(uri):
            raise InputError(f"{uri} is not a SOMA Experiment",
                             "write back into a SOMA Experiment (or a new path)")
        log.info("creating SOMA experiment %s to receive the results", uri)
        tiledbsoma.Experiment.create(uri).close()
    with tiledbsoma.Experiment.open(uri) as exp:
        if "obs" in exp and top >= exp.obs.count:
            raise InputError(
                f"the embedded cells have soma_joinids up to {top}, but {uri} has "
                f"{exp.obs.count} cells: it is not the store's source",
                "write back into the experiment the store was ingested from",
            )
        n_obs = exp.obs.count if "obs" in exp else top + 1
        if COLLECTION in exp:
            if exp[COLLECTION].soma_type != "SOMACollection":
                raise InputError(f"{uri} has a member {COLLECTION!r} that is not a collection",
                                 "write back into another experiment")
            return exp[COLLECTION].uri, n_obs
    with tiledbsoma.Experiment.open(uri, "w") as exp:
        return exp.add_new_collection(COLLECTION).uri, n_obs


def _exists(uri: str) -> bool:
    """Whether any SOMA object lives at ``uri``."""
    import tiledbsoma

    try:
        tiledbsoma.open(uri).close()
    except Exception:  # tiledbsoma raises several types for a missing object
        return False
    return True


def _stage(home: str, run: str, results: _Results, n_obs: int) -> str:
    """Write the run as an incomplete staging member; return its key."""
    import tiledbsoma

    token = uuid.uuid4().hex[:8]
    key = f"{run}{STAGING_MARK}{token}"
    n_heads, dim = len(results.heads), results.z.shape[1]
    samples = _sample_table(results)
    with tiledbsoma.Collection.open(home, "w") as collection:
        member = collection.add_new_collection(key, uri=f"{run}-{token}")
        frame = member.add_new_dataframe(SAMPLES, schema=samples.schema,
                                         index_column_names=["soma_joinid"],
                                         domain=[(0, samples.num_rows - 1)])
        frame.write(samples)
        weights = member.add_new_sparse_ndarray(CELLS, type=pa.float32(),
                                                shape=(n_obs, n_heads))
        for ids, values in results.unique_weights():
            weights.write(pa.table({
                "soma_dim_0": np.repeat(ids, n_heads),
                "soma_dim_1": np.tile(np.arange(n_heads, dtype=np.int64), len(ids)),
                "soma_data": values.ravel(),
            }))
        member.metadata.update({"complete": False, "run": run, "dim": dim, "n_heads": n_heads,
                                "n_obs": n_obs,
                                "provenance": json.dumps(results.provenance)})
    return key


def _sample_table(results: _Results) -> pa.Table:
    """soma_joinid = donor_index, the donor's names as strings, z_0 .. z_{D-1}."""
    columns: dict[str, pa.Array] = {
        "soma_joinid": pa.array(results.donors["donor_index"].to_numpy(), pa.int64())}
    for name in results.key_columns:
        columns[name] = pa.array(results.donors[name].astype(str).to_numpy(), pa.large_string())
    for j in range(results.z.shape[1]):
        columns[f"z_{j}"] = pa.array(results.z[:, j], pa.float32())
    for name in results.prediction_columns:
        values = pa.array(results.predictions[name].to_numpy())
        if pa.types.is_string(values.type):
            values = values.cast(pa.large_string())
        columns[name] = values
    return pa.table(columns)


def _publish(home: str, staging: str, run: str) -> str:
    """Mark the staged run complete and swap it in as ``run``; return its URI."""
    import tiledbsoma

    with tiledbsoma.Collection.open(home) as collection:
        member_uri = collection[staging].uri
        stale = {k: collection[k].uri for k in collection
                 if k == run or (k.startswith(f"{run}{STAGING_MARK}") and k != staging)}
    with tiledbsoma.Collection.open(member_uri, "w") as member:
        member.metadata["complete"] = True
    if run in stale:
        with tiledbsoma.Collection.open(home, "d") as collection:
            del collection[run]
    with (tiledbsoma.Collection.open(home, "w") as collection,
          tiledbsoma.open(member_uri) as member):
        collection.set(run, member, use_relative_uri=True)
    with tiledbsoma.Collection.open(home, "d") as collection:
        for key in [staging, *(k for k in stale if k != run)]:
            del collection[key]
    for old in stale.values():
        _remove_folder(old)
    return member_uri


def _remove_folder(uri: str) -> None:
    """Delete a removed member's folder (local storage only)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        shutil.rmtree(parsed.path if parsed.scheme else uri, ignore_errors=True)
    else:
        log.warning("removed %s from its collection; delete its folder by hand", uri)


def write_back_store(embeddings: str | Path | Location, store_path: str | Path | Location,
                     run: str) -> Location:
    """Write results into ``STORE/embeddings/<run>``, replacing a previous run of that name.

    Parameters
    ----------
    embeddings
        Embedding output directory (of this store's donors).
    store_path
        The bag store.
    run
        Run name.

    Returns
    -------
    Location
        The run's Zarr group.
    """
    check_run_name(run)
    results = _Results(embeddings)
    store = BagStore(store_path)
    if results.donors["donor"].astype(str).tolist() != store.donors["donor"].astype(str).tolist():
        raise InputError(f"{results.directory} holds other donors than the store "
                         f"{store.location}", "write back into the store that was embedded")
    parent = store.location / STORE_FOLDER
    parent.open_group("a")
    with staged_output(parent / run, overwrite=True, kind=STORE_RESULTS) as staging:
        group = zarr.open_group(str(staging), mode="w-")
        group.create_array("z", data=results.z)
        n = results.n_cells
        n_heads = len(results.heads)
        chunk = min(max(n, 1), _READ_ROWS)
        arrays = {name: group.create_array(name, shape=(n,), chunks=(chunk,), dtype="int64")
                  for name in ("cell_donor_index", "cell_store_row", "cell_source_joinid")}
        weights = group.create_array(CELLS, shape=(n, n_heads), chunks=(chunk, n_heads),
                                     dtype="float32")
        offset = 0
        for batch in results.cell_batches(["donor_index", "store_row", "source_joinid",
                                           *results.heads]):
            stop = offset + batch.num_rows
            for i, array in enumerate(arrays.values()):
                array[offset:stop] = batch.column(i).to_numpy()
            weights[offset:stop] = np.column_stack(
                [batch.column(3 + h).to_numpy() for h in range(n_heads)])
            offset = stop
        group.attrs.update({"run": run, "dim": int(results.z.shape[1]), "n_heads": n_heads,
                            "provenance": results.provenance})
        if results.predictions is not None:
            (staging / PREDICTIONS_PARQUET).write_bytes(
                (results.directory / PREDICTIONS_PARQUET).read_bytes())
    return parent / run


def has_run(uri: str | Path | Location, run: str) -> bool:
    """Whether ``run`` was written back completely into ``uri``: a bag store's
    ``embeddings/<run>`` group, or a SOMA experiment's ``sampleclr/<run>`` marked
    complete (a staging member left by a killed write-back does not count)."""
    try:
        location = Location(uri)
    except InputError:  # a URI scheme only TileDB knows, e.g. tiledb://
        location = None
    if location is not None and location.is_zarr_group():
        return (location / STORE_FOLDER / run).is_zarr_group()
    import tiledbsoma

    uri = str(uri) if "://" in str(uri) else str(Path(uri).resolve())
    if not tiledbsoma.Experiment.exists(uri):
        return False
    with tiledbsoma.Experiment.open(uri) as exp:
        if COLLECTION not in exp or run not in exp[COLLECTION]:
            return False
        return bool(exp[COLLECTION][run].metadata.get("complete"))


def read_back(uri: str | Path, run: str) -> tuple[pd.DataFrame, sp.coo_array]:
    """Results written back under ``run``, from a SOMA experiment or a bag store.

    Parameters
    ----------
    uri
        SOMA experiment URI or bag store path.
    run
        Run name.

    Returns
    -------
    donors, weights
        The donor table (``donor_index``, ``donor``, the key columns, ``split``,
        ``z_0 .. z_{D-1}``, then any prediction columns), sorted by ``donor_index``, and
        the cell weights as a COO
        array ``[n_obs, H]`` keyed by source ``soma_joinid`` (each cell once; for a store
        ``n_obs`` is the largest chosen id plus one).

    Raises
    ------
    InputError
        If the run does not exist or was not completely written.
    """
    try:
        store = Location(uri)
    except InputError:  # a URI scheme only TileDB knows, e.g. tiledb://
        return _read_soma(str(uri), run)
    return _read_store(store, run) if store.is_zarr_group() else _read_soma(str(uri), run)


def _read_soma(uri: str, run: str) -> tuple[pd.DataFrame, sp.coo_array]:
    import tiledbsoma

    if not tiledbsoma.Experiment.exists(uri):
        raise InputError(f"{uri} is neither a SOMA experiment nor a bag store",
                         "pass the experiment or store the results were written to")
    with tiledbsoma.Experiment.open(uri) as exp:
        runs = sorted(exp[COLLECTION]) if COLLECTION in exp else []
        if run not in runs:
            raise InputError(f"{uri} has no sampleclr results named {run!r}",
                             f"use one of {[r for r in runs if STAGING_MARK not in r]}")
        member = exp[COLLECTION][run]
        if member.metadata.get("complete") is not True:
            raise InputError(
                f"the sampleclr results {run!r} in {uri} are incomplete (the write-back was "
                "interrupted)",
                "re-run `sampleclr-scale embed` with the same run name to replace them",
            )
        donors = member[SAMPLES].read().concat().to_pandas()
        weights = member[CELLS].read().coos().concat().to_scipy()
    donors = donors.rename(columns={"soma_joinid": "donor_index"})
    return donors.sort_values("donor_index", ignore_index=True), sp.coo_array(weights)


def _read_store(location: Location, run: str) -> tuple[pd.DataFrame, sp.coo_array]:
    store = BagStore(location)
    folder = location / STORE_FOLDER / run
    if not folder.is_zarr_group():
        runs = [name for name in (location / STORE_FOLDER).children()
                if not name.startswith(".") and (location / STORE_FOLDER / name).is_zarr_group()]
        raise InputError(f"the store {location} has no embeddings named {run!r}",
                         f"use one of {runs}")
    group = folder.open_group("r")
    z = group["z"][:]
    key_columns = dict.fromkeys(["donor", *group.attrs["provenance"]["donor_key"], "split"])
    donors = pd.DataFrame({"donor_index": np.arange(store.n_donors, dtype=np.int64)})
    for name in key_columns:
        donors[name] = store.donors[name].astype(str).to_numpy()
    for j in range(z.shape[1]):
        donors[f"z_{j}"] = z[:, j]
    predictions = _read_predictions(folder / PREDICTIONS_PARQUET)
    if predictions is not None:
        donors = donors.join(predictions.drop(columns=["donor_index", "donor"]))
    ids, first = np.unique(group["cell_source_joinid"][:], return_index=True)
    values = group[CELLS][:][first]
    n_heads = values.shape[1]
    weights = sp.coo_array(
        (values.ravel(), (np.repeat(ids, n_heads), np.tile(np.arange(n_heads), len(ids)))),
        shape=(int(ids.max()) + 1 if len(ids) else 0, n_heads))
    return donors, weights
