"""The bag store: a donor-sorted Zarr v3 group that training streams from.

Layout (the contract in DESIGN.md)::

    STORE/                      Zarr v3 group; attributes below
      features                  float32|float16 [n_cells, d], rows sorted by donor,
                                random order inside each donor, chunked along rows
      donor_ptr                 int64 [n_donors + 1]; donor i owns rows ptr[i]:ptr[i+1]
      source_joinid             int64 [n_cells]; the row's id in the source
      donors.parquet            one row per donor: key, metadata, n_cells, split
      cells.parquet             cell-level columns, one row per store row (optional)

Attributes: ``schema_version``, ``source``, ``features``, ``donor_key``, ``n_cells``,
``n_donors``, ``dim`` and the ingest parameters and counts.

Because the order inside a donor is random, any contiguous window of a donor's rows is a
uniform random subset of its cells: one range read instead of hundreds of point reads.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import zarr

from sampleclr_scale.errors import InputError

SCHEMA_VERSION = 1
DONORS_FILE = "donors.parquet"
CELLS_FILE = "cells.parquet"
SPLITS = ("train", "validation")


class BagStore:
    """Read access to a bag store.

    Parameters
    ----------
    path
        Location of the store (a local path).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise InputError(
                f"{self.path} is not a bag store (no zarr.json)",
                "build one with `sampleclr-scale ingest SOURCE --out STORE`",
            )
        self._group = zarr.open_group(str(self.path), mode="r")
        self.attrs: dict[str, Any] = dict(self._group.attrs)
        version = self.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(
                f"bag store {self.path} has schema version {version}, this sampleclr-scale "
                f"reads version {SCHEMA_VERSION}",
                "re-run `sampleclr-scale ingest` with this version to rebuild the store",
            )
        self.features: zarr.Array = self._group["features"]
        self.donor_ptr: np.ndarray = self._group["donor_ptr"][:]

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

    @cached_property
    def donors(self) -> pd.DataFrame:
        """The donor table, indexed by donor position 0..n_donors-1."""
        return pq.read_table(self.path / DONORS_FILE).to_pandas()

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
        path = self.path / CELLS_FILE
        if not path.exists():
            raise InputError(f"bag store {self.path} has no cell table",
                             "re-ingest with --cell-columns COL ...")
        return pq.read_table(path, columns=columns).to_pandas()

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
                f"bag store {self.path} has no donor column {column!r} for a {kind} task",
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


def create_arrays(
    path: Path, *, n_cells: int, dim: int, dtype: str, chunk_rows: int
) -> zarr.Group:
    """Create an empty store group with its arrays sized for ``n_cells`` rows (an upper bound)."""
    group = zarr.open_group(str(path), mode="w-")
    rows = max(n_cells, 1)
    chunk = min(chunk_rows, rows)
    group.create_array("features", shape=(rows, dim), chunks=(chunk, dim), dtype=dtype,
                       compressors=None, fill_value=0)
    group.create_array("source_joinid", shape=(rows,), chunks=(max(chunk, 65_536),),
                       dtype="int64", fill_value=-1)
    return group


def finish_arrays(group: zarr.Group, donor_ptr: np.ndarray, attrs: dict[str, Any]) -> None:
    """Trim the arrays to the cells actually written and record pointers and attributes."""
    n_cells = int(donor_ptr[-1])
    group["features"].resize((n_cells, group["features"].shape[1]))
    group["source_joinid"].resize((n_cells,))
    group.create_array("donor_ptr", data=donor_ptr.astype(np.int64))
    group.attrs.update({"schema_version": SCHEMA_VERSION, **attrs})


@contextmanager
def staged_directory(final: Path, overwrite: bool) -> Iterator[Path]:
    """Build a directory (or a file) in a temporary sibling and publish it atomically.

    An existing ``final`` is only replaced when ``overwrite`` is set, and only after the
    new one is complete: it is renamed aside, the new one renamed in, the old one
    deleted. On any error the temporary path is removed and ``final`` is untouched.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise InputError(f"{final} already exists",
                         "pass --overwrite to replace it, or choose another --out")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield staging
        if final.exists():
            aside = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(final, aside)
            os.rename(staging, final)
            _remove(aside)
        else:
            os.rename(staging, final)
    finally:
        if staging.exists():
            _remove(staging)


def _remove(path: Path) -> None:
    """Delete a file or a directory tree."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
