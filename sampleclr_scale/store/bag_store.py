"""The bag store: a donor-sorted Zarr v3 group that training streams from.

Layout (a contract between stages; ARCHITECTURE.md lists them all)::

    STORE/                      Zarr v3 group; attributes below
      features                  float32|float16 [n_cells, d], rows sorted by donor,
                                random order inside each donor, chunked along rows
      donor_ptr                 int64 [n_donors + 1]; donor i owns rows ptr[i]:ptr[i+1]
      source_joinid             int64 [n_cells]; the row's id in the source
      codes/<column>            int16|int32 [n_cells]; per --cell-columns column, the row's
                                category code (-1: missing), chunked like features
      batch_type_scale, batch_type_offset   float32 [n_batches, K + 1, d]; the
                                per-(batch, cell type) correction (with --batch-key and
                                cell_type codes; store/type_batches.py)
      batch_mean, batch_std     float32 [n_batches, d]; per-batch feature mean and
                                population std (with --batch-key only)
      feature_spec/             the PCA of pca:N features: mean float32 [n_genes],
                                components float32 [N, n_genes]; attributes genes (ids,
                                in column order) and normalisation (target_sum, log1p)
                                (:mod:`~sampleclr_scale.store.feature_spec`)
      donors.parquet            one row per donor: key, metadata, n_cells, split
                                (and the int32 batch code with --batch-key)
      cells.parquet             cell-level columns, one row per store row (optional)
      manifest.json             every file above with its size and CRC32, written last
                                (:mod:`~sampleclr_scale.store.manifest`)

Attributes: ``schema_version``, ``source``, ``features``, ``feature_spec`` (``kind``:
``obsm`` with ``name``, or ``pca`` with ``n_components`` and ``n_genes``; ``dim``;
``fingerprint``, equal for stores in one feature space, such as a store and one ingested
``--features-like`` it), ``donor_key``, ``n_cells``, ``n_donors``, ``dim``, the ingest
parameters and counts, and with ``--batch-key`` also
``batch``: ``{"key": [columns], "labels": [one label per batch code]}``, and with
``--cell-columns`` also ``cell_codes``: ``{column: {"categories": [one string per code],
"counts": [cells per code]}}``.

Because the order inside a donor is random, any contiguous window of a donor's rows is a
uniform random subset of its cells: one range read instead of hundreds of point reads.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from sampleclr_scale.errors import InputError
from sampleclr_scale.storage import Location
from sampleclr_scale.storage.outputs import zarr_output
from sampleclr_scale.store.batches import standardize
from sampleclr_scale.store.feature_spec import FeatureSpec, read_spec
from sampleclr_scale.store.invariants import check_layout
from sampleclr_scale.store.layout import (
    CELLS_FILE,
    CODES_GROUP,
    DONORS_FILE,
    SCHEMA_VERSION,
    SPLITS,
)
from sampleclr_scale.store.manifest import (
    Manifest,
    open_checked_group,
    read_manifest,
    require_complete,
)
from sampleclr_scale.store.type_batches import apply_affine

MAX_INT16_CATEGORIES = 32_767
MAX_NAME_BYTES = 200
"""The longest cell column name, in UTF-8 bytes: it names a folder of the store."""
ZARR_JSON = "zarr.json"
BAG_STORE = zarr_output("a bag store", ("schema_version", "n_donors"), "features")
"""What ``--overwrite`` of a store replaces: a group with the store's attributes (any
schema version), or the ``features`` array of an interrupted upload."""


class BagStore:
    """Read access to a bag store.

    Parameters
    ----------
    location
        Where the store is: a local path or a URI (``s3://``, ``gs://`` ...).
    check
        Check on open that every file of the manifest is there at its size (a stat per
        file locally, one listing remotely). A re-open of a store this process (or its
        parent) has checked, e.g. once per epoch, skips it; every read still checks the
        files it reads.

    Raises
    ------
    InputError
        For no store, one of another schema version, one without a manifest or one
        missing files or holding truncated ones (checked against the manifest on open,
        and again for each Zarr file when it is read), or one whose arrays and tables
        disagree (:func:`~sampleclr_scale.store.invariants.check_layout`, with ``check``).
    """

    def __init__(self, location: str | Path | Location, *, check: bool = True) -> None:
        self.location = Location(location)
        if not self.location.is_zarr_group():
            raise InputError(
                f"{self.location} is not a bag store (no zarr.json)",
                "build one with `sampleclr-scale ingest SOURCE --out STORE`",
            )
        self.manifest: Manifest = read_manifest(self.location)
        if check:
            require_complete(self.location, self.manifest)
        self._group = open_checked_group(self.location, self.manifest)
        self.attrs: dict[str, Any] = dict(self._group.attrs)
        version = self.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(
                f"bag store {self.location} has schema version {version}, this sampleclr-scale "
                f"reads version {SCHEMA_VERSION}",
                "re-run `sampleclr-scale ingest` with this version to rebuild the store",
            )
        self.features: zarr.Array = self._group["features"]
        self.donor_ptr: np.ndarray = self._group["donor_ptr"][:]
        if check:
            check_layout(self)

    @property
    def fingerprint(self) -> str:
        """The store's content fingerprint: SHA-256 of its manifest (the size and CRC32 of
        every file ingest wrote), so a copy has the same one and a re-ingest another."""
        return self.manifest.fingerprint

    @cached_property
    def feature_spec(self) -> FeatureSpec | None:
        """What defines the store's features (:mod:`~sampleclr_scale.store.feature_spec`);
        None for PCA features ingested before the PCA was stored."""
        return read_spec(self.attrs, self._group)

    @property
    def n_cells(self) -> int:
        """Number of cells (rows)."""
        return int(self.donor_ptr[-1])

    @property
    def n_donors(self) -> int:
        """Number of donors."""
        return len(self.donor_ptr) - 1

    @property
    def dim(self) -> int:
        """Width ``d`` of the cell features."""
        return int(self.features.shape[1])

    @property
    def cells_per_donor(self) -> np.ndarray:
        """Int64 ``[n_donors]`` number of cells of each donor."""
        return np.diff(self.donor_ptr)

    def row_donors(self, start: int, stop: int) -> np.ndarray:
        """Int64 donor position of each store row ``start..stop - 1`` (memory of the
        range, not of the store: for passes over the rows in blocks)."""
        ptr = self.donor_ptr
        if stop <= start:
            return np.empty(0, dtype=np.int64)
        first = int(np.searchsorted(ptr, start, side="right")) - 1
        last = int(np.searchsorted(ptr, stop - 1, side="right")) - 1
        counts = (np.minimum(ptr[first + 1:last + 2], stop)
                  - np.maximum(ptr[first:last + 1], start))
        return np.repeat(np.arange(first, last + 1, dtype=np.int64), counts)

    @cached_property
    def donors(self) -> pd.DataFrame:
        """The donor table, indexed by donor position 0..n_donors-1."""
        return (self.location / DONORS_FILE).read_parquet().to_pandas()

    def split_donors(self, split: str) -> np.ndarray:
        """Sorted positions of the donors in ``split`` (``train`` or ``validation``)."""
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}", f"use one of {SPLITS}")
        return np.flatnonzero(self.donors["split"].to_numpy() == split)

    def source_joinid(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Source ids of rows ``start:stop``."""
        return self._group["source_joinid"][start:stop]

    def cell_table(self, columns: list[str] | None = None) -> pd.DataFrame:
        """Cell-level columns, one row per store row."""
        cells = self.location / CELLS_FILE
        if not cells.is_file():
            raise InputError(f"bag store {self.location} has no cell table",
                             "re-ingest with --cell-columns COL ...")
        return cells.read_parquet(columns).to_pandas()

    @property
    def code_columns(self) -> list[str]:
        """The cell columns stored as per-row category codes (``codes/<column>``)."""
        return list(self.attrs.get("cell_codes") or {})

    def categories(self, column: str) -> list[str]:
        """The category of each code of cell column ``column``, as strings (code ``i`` is
        ``categories(column)[i]``; the order of the cell table's categories)."""
        return list(self._cell_codes(column)["categories"])

    def category_counts(self, column: str) -> np.ndarray:
        """Int64 ``[n_categories]`` number of store rows with each code of ``column``
        (rows with a missing value are not counted)."""
        return np.asarray(self._cell_codes(column)["counts"], dtype=np.int64)

    def codes(self, column: str) -> zarr.Array:
        """The int16|int32 ``[n_cells]`` array of the category code of each row of
        ``column`` (-1: missing), to read in row ranges like :attr:`features`.

        Raises
        ------
        InputError
            If the store has no codes for ``column`` (as :meth:`categories` and
            :meth:`category_counts`): the message names the columns it has.
        """
        self._cell_codes(column)
        return self._group[f"{CODES_GROUP}/{column}"]

    def _cell_codes(self, column: str) -> dict[str, list]:
        """The ``cell_codes`` attribute of ``column``.

        Raises
        ------
        InputError
            If the store has no codes for ``column``.
        """
        entry = (self.attrs.get("cell_codes") or {}).get(column)
        if entry is None:
            have = self.code_columns
            raise InputError(
                f"bag store {self.location} has no per-cell codes for column {column!r} "
                f"(it has codes for {have or 'no column'})",
                f"re-ingest with --cell-columns {' '.join([*have, column])}",
            )
        return entry

    @property
    def batch_key(self) -> list[str]:
        """The obs columns that name a donor's technical batch (empty: no batches)."""
        return list((self.attrs.get("batch") or {}).get("key", []))

    @property
    def batch_labels(self) -> list[str]:
        """Label of each batch code: the batch-key values joined by ``|``."""
        return list((self.attrs.get("batch") or {}).get("labels", []))

    @property
    def donor_batch(self) -> np.ndarray | None:
        """Int32 ``[n_donors]`` batch code of each donor (None without a batch key)."""
        if not self.batch_key:
            return None
        return self.donors["batch"].to_numpy(np.int32)

    @cached_property
    def batch_stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Float32 ``[n_batches, d]`` mean and population std of the features of each
        batch (a constant feature has std 1.0); None without a batch key."""
        if not self.batch_key:
            return None
        return (self._group["batch_mean"][:].astype(np.float32),
                self._group["batch_std"][:].astype(np.float32))

    @cached_property
    def batch_type_maps(self) -> tuple[np.ndarray, np.ndarray, str] | None:
        """Float32 ``[n_batches, K + 1, d]`` scale and offset of the per-(batch, cell
        type) correction (:mod:`~sampleclr_scale.store.type_batches`) and the cell-type
        column whose codes index them; None when ingest had no batch key or no
        ``cell_type`` codes."""
        record = (self.attrs.get("batch") or {}).get("cell_type")
        if not self.batch_key or record is None:
            return None
        return (self._group["batch_type_scale"][:].astype(np.float32),
                self._group["batch_type_offset"][:].astype(np.float32), record["column"])

    def standardize(self, rows: np.ndarray, donor_batch: np.ndarray | int) -> np.ndarray:
        """Feature rows standardised with their batch's statistics, in float32.

        Parameters
        ----------
        rows
            ``[..., d]`` feature rows (e.g. ``[m, d]`` of one donor, ``[B, m, d]`` bags).
        donor_batch
            Batch code(s) from :attr:`donor_batch`: an int, or an int array over the
            leading axes of ``rows``, aligned to the first axes (``[B]`` for ``[B, m, d]``).

        Returns
        -------
        np.ndarray
            ``(rows - mean[b]) / std[b]``.

        Raises
        ------
        InputError
            If the store has no batch statistics, or for invalid codes.
        """
        stats = self.batch_stats
        if stats is None:
            raise InputError(f"bag store {self.location} has no per-batch statistics",
                             "re-ingest with --batch-key COL ... (e.g. --batch-key dataset_id)")
        return standardize(rows, *stats, donor_batch)

    def type_corrected_rows(self, start: int, stop: int) -> np.ndarray:
        """Float32 feature rows ``start..stop - 1`` with the per-(batch, cell type)
        correction applied (:attr:`batch_type_maps`), as training sees them with
        ``standardize: batch_cell_type``.

        Raises
        ------
        InputError
            If the store has no per-(batch, cell type) statistics.
        """
        maps = self.batch_type_maps
        if maps is None:
            raise InputError(f"bag store {self.location} has no per-(batch, cell type) "
                             "statistics", "re-ingest with --batch-key COL ... from a source "
                             "with a cell_type column")
        scale, offset, column = maps
        batch = self.donor_batch[self.row_donors(start, stop)]
        return apply_affine(self.features[start:stop], scale, offset, batch,
                            self.codes(column)[start:stop])

    def donor_rows(self, donor: int) -> np.ndarray:
        """All feature rows of one donor."""
        return self.features[int(self.donor_ptr[donor]) : int(self.donor_ptr[donor + 1])]

    def labels(self, column: str, kind: str) -> tuple[np.ndarray, list]:
        """Per-donor label codes for a supervised task, with missing values marked.

        Parameters
        ----------
        column
            Donor-table column.
        kind
            ``classification`` (codes of the sorted distinct values), ``ordinal`` (codes of
            the sorted distinct values, so the order of the values is kept) or
            ``regression`` (float values).

        Returns
        -------
        codes, classes
            Int64 codes with -1 for missing (classification, ordinal) or float32 values
            with NaN for missing (regression); the class values (empty for regression).
        """
        if column not in self.donors.columns:
            raise InputError(
                f"bag store {self.location} has no donor column {column!r} for a {kind} task",
                f"use one of {sorted(self.donors.columns)} or re-ingest with --meta {column}",
            )
        values = self.donors[column]
        if kind == "regression":
            return pd.to_numeric(values, errors="coerce").to_numpy(np.float32), []
        if kind not in ("classification", "ordinal"):
            raise InputError(f"unknown task kind {kind!r}",
                             "use classification, ordinal or regression")
        classes = sorted(values.dropna().unique().tolist())
        lookup = {v: i for i, v in enumerate(classes)}
        codes = np.array([lookup.get(v, -1) if pd.notna(v) else -1 for v in values], np.int64)
        return codes, classes


def code_dtype(n_categories: int) -> np.dtype:
    """The dtype of a codes array: int16 for at most 32,767 categories, else int32."""
    return np.dtype(np.int16 if n_categories <= MAX_INT16_CATEGORIES else np.int32)


def create_arrays(
    path: Path, *, n_cells: int, dim: int, dtype: str, chunk_rows: int,
    code_columns: dict[str, int] | None = None,
) -> zarr.Group:
    """Create an empty store group with its arrays sized for ``n_cells`` rows (an upper bound).

    Parameters
    ----------
    code_columns
        Number of categories of each cell column, by name: one ``codes/<column>`` array
        each, chunked like ``features`` (None or empty: no ``codes`` group).

    Raises
    ------
    InputError
        For a cell column whose name cannot name a Zarr array.
    """
    group = zarr.open_group(str(path), mode="w-")
    rows = max(n_cells, 1)
    chunk = min(chunk_rows, rows)
    group.create_array("features", shape=(rows, dim), chunks=(chunk, dim), dtype=dtype,
                       compressors=None, fill_value=0)
    group.create_array("source_joinid", shape=(rows,), chunks=(max(chunk, 65_536),),
                       dtype="int64", fill_value=-1)
    for column, n_categories in (code_columns or {}).items():
        check_array_name(column)
        group.create_array(f"{CODES_GROUP}/{column}", shape=(rows,), chunks=(chunk,),
                           dtype=code_dtype(n_categories), fill_value=-1)
    return group


def check_array_name(column: str) -> None:
    """Refuse a cell column name that is not a single Zarr node name, or no file name.

    The name becomes a folder (``codes/<column>``) locally and a key prefix remotely:
    empty, ``.``, ``..``, ``/`` or ``\\`` in it, a leading ``__`` (Zarr's), the name of
    Zarr's metadata file, control characters or more than :data:`MAX_NAME_BYTES` bytes
    (file systems allow 255) are refused.
    """
    if (not column or "/" in column or "\\" in column or column in (".", "..", ZARR_JSON)
            or column.startswith("__") or any(ord(c) < 32 for c in column)
            or len(column.encode()) > MAX_NAME_BYTES):
        raise InputError(
            f"--cell-columns column {column[:80]!r} cannot name the Zarr array "
            f"{CODES_GROUP}/<column> (empty, '.', '..', {ZARR_JSON!r}, containing '/', "
            f"'\\' or control characters, starting with '__', or over {MAX_NAME_BYTES} "
            "bytes)", "rename the column in the source, or leave it out of --cell-columns",
        )


def finish_arrays(group: zarr.Group, donor_ptr: np.ndarray, attrs: dict[str, Any],
                  arrays: dict[str, np.ndarray] | None = None) -> None:
    """Trim the arrays to the cells actually written and record pointers and attributes.

    Parameters
    ----------
    group
        The store group from :func:`create_arrays`.
    donor_ptr
        Int64 ``[n_donors + 1]`` donor pointers.
    attrs
        Store attributes (``schema_version`` is added).
    arrays
        Further small arrays to write whole, by name (e.g. ``batch_mean``).
    """
    n_cells = int(donor_ptr[-1])
    group["features"].resize((n_cells, group["features"].shape[1]))
    group["source_joinid"].resize((n_cells,))
    if CODES_GROUP in group:
        for _, codes in group[CODES_GROUP].arrays():
            codes.resize((n_cells,))
    group.create_array("donor_ptr", data=donor_ptr.astype(np.int64))
    for name, data in (arrays or {}).items():
        group.create_array(name, data=data)
    group.attrs.update({"schema_version": SCHEMA_VERSION, **attrs})
