"""Ingest: source -> cohort -> features -> donor-sorted bag store, out of core.

The cohort's obs columns are read first, into a per-cell index on disk
(:class:`~sampleclr_scale.ingest.cell_index.CellIndex`). The features are then read once, in
large sequential blocks of cells (sorted source ids). Each block's cell records and
feature rows are appended to spill files, one pair per *bucket* of consecutive donors
holding about ``bucket_bytes`` of them. A second pass loads one bucket at a time, orders
its rows by (donor, a keyed hash of the source id) and writes them to the store in
sequence. With ``--batch-key``, the written rows also update per-batch feature moments
(:mod:`~sampleclr_scale.store.batches`), stored as ``batch_mean`` and ``batch_std``.
With ``--cell-columns``, each bucket also writes its rows' category codes to
``codes/<column>`` and adds them to per-category counts (the ``cell_codes`` attribute).
Peak memory is one read block plus one bucket, whatever the number of cells; disk
traffic is one extra write and read of the features and of the cell index.

The features' spec (:mod:`~sampleclr_scale.store.feature_spec`) is stored with them: a
fitted PCA, or with ``--features-like STORE`` the spec of that store, applied to this
source instead of a fit, so the two stores share one feature space.

The within-donor order is a hash of ``(seed, source id)``, so the store is the same for
any block or bucket size. The last file written is the store's manifest
(:mod:`~sampleclr_scale.store.manifest`), before the store is published.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sampleclr_scale import __version__
from sampleclr_scale.config import IngestConfig
from sampleclr_scale.console import progress
from sampleclr_scale.errors import InputError
from sampleclr_scale.ingest.block_reads import read_blocks
from sampleclr_scale.ingest.cohort import Cohort, select_cohort
from sampleclr_scale.ingest.features import like_features, make_features
from sampleclr_scale.sources.base import CellSource
from sampleclr_scale.sources.registry import open_source
from sampleclr_scale.storage import staged_output
from sampleclr_scale.store.bag_store import (
    BAG_STORE,
    CELLS_FILE,
    CODES_GROUP,
    DONORS_FILE,
    check_array_name,
    create_arrays,
    finish_arrays,
)
from sampleclr_scale.store.batches import CohortBatches
from sampleclr_scale.store.feature_spec import write_spec
from sampleclr_scale.store.manifest import write_manifest
from sampleclr_scale.store.type_batches import PRIOR_CELLS, CellTypeBatches

log = logging.getLogger(__name__)
DEFAULT_CELL_COLUMN = "cell_type"
"""The cell-level column ingest records when ``--cell-columns`` is not given and the
source has it (CELLxGENE Census and the simulated cohorts do)."""


def hash_order_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """A keyed 64-bit hash (splitmix64) of each id: a random but reproducible sort key."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def plan_buckets(n_cells_per_donor: np.ndarray, max_cells: int) -> np.ndarray:
    """Bucket of each donor: consecutive donors holding at most ``max_cells`` cells.

    A donor larger than ``max_cells`` gets a bucket of its own.
    """
    bucket = np.empty(len(n_cells_per_donor), dtype=np.int64)
    current, filled = 0, 0
    for donor, n in enumerate(n_cells_per_donor):
        if filled and filled + n > max_cells:
            current, filled = current + 1, 0
        bucket[donor] = current
        filled += int(n)
    return bucket


@dataclass
class IngestReport:
    """What an ingest did: counts, sizes and time."""

    out: str
    n_cells: int
    n_donors: int
    dim: int
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def cells_per_second(self) -> float:
        """Cells written per second of wall time."""
        return self.n_cells / max(self.seconds, 1e-9)


class _Spill:
    """Append-only spill files, two per bucket: cell records and feature rows."""

    def __init__(self, directory: Path, n_buckets: int, dim: int, records: np.dtype) -> None:
        self._dir = directory
        self._dim = dim
        self._records = records
        self._files = [
            (open(directory / f"{b}.cells", "wb"), open(directory / f"{b}.x", "wb"))  # noqa: SIM115
            for b in range(n_buckets)
        ]

    def append(self, bucket: int, cells: np.ndarray, rows: np.ndarray) -> None:
        cells_file, x_file = self._files[bucket]
        cells_file.write(cells.tobytes())
        x_file.write(np.ascontiguousarray(rows, dtype=np.float32).tobytes())

    def close(self) -> None:
        for cells_file, x_file in self._files:
            cells_file.close()
            x_file.close()

    def load(self, bucket: int) -> tuple[np.ndarray, np.ndarray]:
        """The bucket's cell records and feature rows (its files are deleted)."""
        cells = np.fromfile(self._dir / f"{bucket}.cells", dtype=self._records)
        rows = np.fromfile(self._dir / f"{bucket}.x", dtype=np.float32).reshape(-1, self._dim)
        (self._dir / f"{bucket}.cells").unlink()
        (self._dir / f"{bucket}.x").unlink()
        return cells, rows


STORE_DONOR_COLUMNS = ("donor", "n_cells", "split", "batch")
"""The donor table's own columns, which no obs column may replace."""


def _check_own_columns(config: IngestConfig) -> None:
    """Refuse ``--meta`` and ``--batch-key`` columns named like the donor table's own
    columns (they would be replaced by the store's values without a word), and
    ``--cell-columns`` that cannot name a folder of the store, before the source is read."""
    for column in config.cell_columns or []:  # None: resolved from the source later
        check_array_name(column)
    for option, columns in (("--meta", config.meta), ("--batch-key", config.batch_key)):
        clash = [c for c in columns if c in STORE_DONOR_COLUMNS]
        if clash:
            raise InputError(
                f"{option} names {clash}, which the store's donor table holds itself "
                f"({', '.join(STORE_DONOR_COLUMNS)}): the source's values would be replaced",
                f"leave {clash} out of {option}, or copy the column under another name in "
                "the source")


def ingest(config: IngestConfig, source: CellSource | None = None) -> IngestReport:
    """Build a bag store from ``config.source`` at ``config.out`` (atomically).

    Parameters
    ----------
    config
        The cohort, its features and the store's layout (``sampleclr-scale ingest``'s
        settings).
    source
        An open source to read instead of opening ``config.source`` (e.g. an
        :class:`~sampleclr_scale.sources.anndata.AnnDataSource` of an AnnData object in
        memory); the caller closes it.

    Returns
    -------
    IngestReport
        Where the store is, its counts and the time taken.

    Examples
    --------
    A simulated cohort written as an ``.h5ad`` file (``tmp`` is a scratch folder), into a
    store of its samples' cells:

    >>> import sampleclr_scale as scs
    >>> from sampleclr_scale.stages import ingest
    >>> scs.simulated_anndata(n_donors=24, seed=0).write_h5ad(f"{tmp}/cohort.h5ad")
    >>> report = ingest(scs.IngestConfig(
    ...     source=f"{tmp}/cohort.h5ad", out=f"{tmp}/bags.zarr", features="obsm:scvi",
    ...     donor_key=["sample"], meta=["severity", "disease", "dataset_id"],
    ...     cell_columns=["cell_type"], min_cells=20))
    >>> report.n_donors, report.dim
    (24, 8)
    """
    start = time.perf_counter()
    _check_own_columns(config)
    like = [config.features_like] if config.features_like is not None else []
    reopenable = source is None  # read_workers open it again by config.source
    opened = (contextlib.nullcontext(source) if source is not None
              else open_source(config.source, config.measurement, config.organism))
    with (opened as source,
          staged_output(config.out, config.overwrite, kind=BAG_STORE,
                        inputs=[source.uri, *like]) as staging,
          # named after the staging path, so a killed run's spill files go with it
          tempfile.TemporaryDirectory(dir=staging.parent,
                                      prefix=f".{staging.name}.spill-") as spill):
        config = with_default_cell_columns(config, source.obs_columns)
        # another store's features are checked against the source before the cohort is read
        features = like_features(source, config) if like else None
        cohort = select_cohort(source, config, Path(spill))
        log.info("cohort: %d cells of %d donors (%s)", cohort.counts["cells"],
                 cohort.counts["donors"], source.uri)
        if features is None:
            features = make_features(source, config, cohort.cells)
        cohort.counts.update(features.counts)
        group = create_arrays(staging, n_cells=cohort.cells.n_kept, dim=features.dim,
                              dtype=config.dtype, chunk_rows=config.chunk_rows,
                              code_columns={c: len(cohort.cells.categories(c))
                                            for c in cohort.cells.columns})
        batches = (CohortBatches(cohort.donors, config.batch_key, features.dim)
                   if config.batch_key else None)
        type_batches = _type_batches(cohort, batches, features.dim)
        donor_ptr, donors, cell_codes = _write_sorted(cohort, features, group, staging,
                                                      Path(spill), config, batches,
                                                      type_batches, reopenable)
        attrs = {
            "created_by": f"sampleclr-scale {__version__}",
            "source": source.uri,
            "source_kind": source.kind,
            "features": features.describe(),
            "feature_spec": write_spec(group, features.spec),
            "donor_key": cohort.donor_key,
            "ingest": config.model_dump(mode="json", exclude=_unrecorded(config)),
            "counts": cohort.counts,
            "n_cells": int(donor_ptr[-1]),
            "n_donors": len(donors),
            "dim": features.dim,
        }
        if cell_codes:  # without --cell-columns the attributes are as before codes existed
            attrs["cell_codes"] = cell_codes
        arrays = (_finish_batches(batches, donors, attrs, type_batches)
                  if batches is not None else {})
        finish_arrays(group, donor_ptr, attrs, arrays)
        pq.write_table(pa.Table.from_pandas(donors, preserve_index=False),
                       staging / DONORS_FILE)
        write_manifest(staging)  # last: it lists every file above
    report = IngestReport(config.out, int(donor_ptr[-1]), len(donors), features.dim,
                          time.perf_counter() - start, cohort.counts)
    log.info("wrote %s: %d cells, %d donors, d=%d in %.1f s (%.0f cells/s)", config.out,
             report.n_cells, report.n_donors, report.dim, report.seconds,
             report.cells_per_second)
    return report


def with_default_cell_columns(config: IngestConfig, obs_columns: list[str]) -> IngestConfig:
    """``config`` with ``cell_columns`` resolved: unset (None) means
    :data:`DEFAULT_CELL_COLUMN` when the source has it (logged), else none."""
    if config.cell_columns is not None:
        return config
    found = [DEFAULT_CELL_COLUMN] if DEFAULT_CELL_COLUMN in obs_columns else []
    if found:
        log.info("recording cell-level column %r (views are balanced over it and the "
                 "evaluation scores cell-type baselines; --cell-columns sets others, an "
                 "empty --cell-columns none)", DEFAULT_CELL_COLUMN)
    return config.model_copy(update={"cell_columns": found})


def _unrecorded(config: IngestConfig) -> set[str]:
    """The settings left out of the ``ingest`` attribute: ``overwrite``; unset options, so
    that their stores' attributes are those of stores written before they existed; and
    ``features`` when ``features_like`` chose them instead."""
    unset = {"overwrite"}
    if not config.batch_key:
        unset.add("batch_key")
    if config.features_like is None:
        unset |= {"features_like", "max_missing_genes"}
    else:
        unset |= {"features", "pca_genes", "pca_fit_cells"}
    return unset


def _type_batches(cohort: Cohort, batches: CohortBatches | None,
                  dim: int) -> CellTypeBatches | None:
    """Per-(batch, cell type) moments to fill, with a batch key and cell-type codes."""
    if batches is None or DEFAULT_CELL_COLUMN not in cohort.cells.columns:
        return None
    n_types = len(cohort.cells.categories(DEFAULT_CELL_COLUMN))
    return CellTypeBatches(batches.codes, batches.labels, DEFAULT_CELL_COLUMN, n_types, dim)


def _finish_batches(batches: CohortBatches, donors: pd.DataFrame, attrs: dict[str, Any],
                    type_batches: CellTypeBatches | None = None) -> dict[str, np.ndarray]:
    """Add the ``batch`` code column to ``donors`` and the ``batch`` attribute to ``attrs``;
    return the ``batch_mean`` and ``batch_std`` arrays, and with ``type_batches`` the
    per-(batch, cell type) maps (:mod:`~sampleclr_scale.store.type_batches`)."""
    codes, labels, mean, std = batches.finish(donors)
    donors["batch"] = codes
    attrs["batch"] = {"key": batches.key, "labels": labels}
    log.info("%d batches of %s; per-batch feature mean and std stored", len(labels),
             "+".join(batches.key))
    arrays = {"batch_mean": mean, "batch_std": std}
    if type_batches is not None:
        arrays |= type_batches.finish(labels)
        attrs["batch"]["cell_type"] = {"column": type_batches.column,
                                       "prior_cells": PRIOR_CELLS}
        log.info("per-(batch, %s) location and scale stored", type_batches.column)
    return arrays


def _write_sorted(
    cohort: Cohort, features: Any, group: Any, staging: Path, spill_dir: Path,
    config: IngestConfig, batches: CohortBatches | None = None,
    type_batches: CellTypeBatches | None = None, reopenable: bool = True,
) -> tuple[np.ndarray, pd.DataFrame, dict[str, dict[str, list]]]:
    """The two passes: spill source blocks into donor buckets, then write bucket by bucket.

    Parameters
    ----------
    batches
        Per-batch feature moments, fed every row as it is written (None: no batches).
    reopenable
        Whether ``config.source`` opens the source (for ``read_workers``,
        :func:`~sampleclr_scale.ingest.block_reads.read_blocks`).

    Returns
    -------
    donor_ptr, donors, cell_codes
        The donor pointers and the donor table of the donors that were written, and the
        ``cell_codes`` attribute (:meth:`_BucketWriter.cell_codes`).
    """
    n_cells_per_donor = cohort.donors["n_cells"].to_numpy()
    records = cohort.cells.dtype
    bucket_cells = max(1, config.bucket_bytes // (4 * features.dim + records.itemsize))
    bucket_of_donor = plan_buckets(n_cells_per_donor, bucket_cells)
    n_buckets = int(bucket_of_donor[-1]) + 1
    spill = _Spill(spill_dir, n_buckets, features.dim, records)
    blocks = read_blocks(cohort.cells.blocks(config.read_block), features, config, reopenable)
    _spill_blocks(cohort, blocks, bucket_of_donor, spill)
    writer = _BucketWriter(cohort, group, staging, config, batches, type_batches)
    for bucket in range(n_buckets):
        writer.write(*spill.load(bucket))
    writer.close()
    return (*_written_donors(cohort, writer.written), writer.cell_codes())


def _spill_blocks(cohort: Cohort, blocks: Iterable[tuple[np.ndarray, np.ndarray]],
                  bucket_of_donor: np.ndarray, spill: _Spill) -> None:
    """First pass: take the blocks of cell records and their feature rows as they are
    read, drop non-finite rows (counted in ``cohort.counts``) and append the rest to their
    donors' buckets."""
    non_finite = 0
    bar = progress(cohort.cells.n_kept, "reading features", "cells", unit_scale=True)
    for cells, rows in blocks:
        finite = np.isfinite(rows).all(axis=1)
        non_finite += int((~finite).sum())
        bar.update(len(cells))
        cells, rows = cells[finite], rows[finite]
        buckets = bucket_of_donor[cells["donor"]]
        order = np.argsort(buckets, kind="stable")
        bounds = np.flatnonzero(np.diff(buckets[order])) + 1
        for part in np.split(order, bounds):
            if len(part):
                spill.append(int(buckets[part[0]]), cells[part], rows[part])
    bar.close()
    spill.close()
    cohort.counts["cells_non_finite"] = non_finite
    if non_finite:  # a warning: a cell missing from a damaged source reads as NaN too
        log.warning("dropped %d of %d cells (%.2f %%) whose features are not finite (NaN "
                    "or infinite, or missing from the source: an array of it may be "
                    "incomplete); the store's counts record them as cells_non_finite",
                    non_finite, cohort.cells.n_kept, 100 * non_finite / cohort.cells.n_kept)


class _BucketWriter:
    """Second pass: writes the buckets' rows to the store in sequence.

    Each bucket drops its donors below ``min_cells``, orders its rows by (donor, hash of
    the source id) and is written after the previous one; ``written`` counts the rows of
    each donor, and ``batches`` (when given) gets every row as stored. The cell columns
    go to ``cells.parquet`` and, as codes, to the ``codes/<column>`` arrays, rows
    ``offset:stop`` as the features; ``code_counts`` counts the rows of each code.
    """

    def __init__(self, cohort: Cohort, group: Any, staging: Path, config: IngestConfig,
                 batches: CohortBatches | None,
                 type_batches: CellTypeBatches | None = None) -> None:
        self._cohort = cohort
        self._type_batches = type_batches
        self._group = group
        self._staging = staging
        self._config = config
        self._batches = batches
        self._cell_writer: pq.ParquetWriter | None = None
        self._codes = {c: group[f"{CODES_GROUP}/{c}"] for c in cohort.cells.columns}
        self.offset = 0
        self.written = np.zeros(len(cohort.donors), dtype=np.int64)
        self.code_counts = {c: np.zeros(len(cohort.cells.categories(c)), dtype=np.int64)
                            for c in cohort.cells.columns}

    def write(self, cells: np.ndarray, rows: np.ndarray) -> None:
        """Write one bucket's cell records and feature rows."""
        config, donors = self._config, len(self.written)
        keep = np.bincount(cells["donor"], minlength=donors)[cells["donor"]] >= config.min_cells
        cells, rows = cells[keep], rows[keep]
        order = np.lexsort((hash_order_keys(cells["joinid"], config.seed), cells["donor"]))
        cells, rows = cells[order], rows[order]
        stop = self.offset + len(cells)
        stored = rows.astype(config.dtype, copy=False)
        self._group["features"][self.offset:stop] = stored
        self._group["source_joinid"][self.offset:stop] = cells["joinid"]
        self.written += np.bincount(cells["donor"], minlength=donors)
        if self._batches is not None:
            self._batches.add(stored, cells["donor"])
        if self._type_batches is not None:
            column = self._cohort.cells.columns.index(self._type_batches.column)
            self._type_batches.add(stored, cells["donor"], cells["codes"][:, column])
        if self._cohort.cells.columns:
            self._write_cells(cells["codes"], self.offset, stop)
        self.offset = stop

    def _write_cells(self, codes: np.ndarray, start: int, stop: int) -> None:
        """Write the cell columns of store rows ``start:stop`` (int32 ``codes``, one
        column per cell column): their codes arrays, code counts and cell-table rows."""
        for j, (column, array) in enumerate(self._codes.items()):
            column_codes = codes[:, j]
            array[start:stop] = column_codes.astype(array.dtype)
            counts = self.code_counts[column]
            counts += np.bincount(column_codes[column_codes >= 0], minlength=len(counts))
        table = pa.Table.from_pandas(self._cohort.cells.cell_table(codes),
                                     preserve_index=False)
        if self._cell_writer is None:
            self._cell_writer = pq.ParquetWriter(self._staging / CELLS_FILE, table.schema)
        self._cell_writer.write_table(table)

    def cell_codes(self) -> dict[str, dict[str, list]]:
        """The ``cell_codes`` store attribute: per cell column, its categories as strings
        in code order and the rows written with each code (empty without cell columns)."""
        return {column: {"categories": [str(v) for v in self._cohort.cells.categories(column)],
                         "counts": counts.tolist()}
                for column, counts in self.code_counts.items()}

    def close(self) -> None:
        """Close the cell table."""
        if self._cell_writer is not None:
            self._cell_writer.close()


def _written_donors(cohort: Cohort, written: np.ndarray) -> tuple[np.ndarray, pd.DataFrame]:
    """Donor pointers and table of the donors with rows written (``written`` per donor)."""
    kept = written > 0
    lost = int((~kept).sum())
    cohort.counts["donors_below_min_cells_after_non_finite"] = lost
    if lost:
        log.info("dropped %d donors below --min-cells after removing non-finite cells", lost)
    if not kept.any():
        raise InputError("no donor keeps --min-cells cells with finite features",
                         "check the feature array for NaN (cells without an embedding)")
    donors = cohort.donors[kept].reset_index(drop=True)
    donors["n_cells"] = written[kept]
    donor_ptr = np.concatenate([[0], np.cumsum(written[kept])]).astype(np.int64)
    return donor_ptr, donors
