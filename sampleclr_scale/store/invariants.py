"""The bag store's own invariants: what its arrays and tables must say about each other.

The manifest (:mod:`~sampleclr_scale.store.manifest`) proves that the files are the ones
ingest wrote; these checks prove that what they hold is consistent, so that a store edited
by hand with a manifest rewritten to match fails with a message rather than with a
traceback deep in training, or silently:

- on open (:func:`check_layout`, cheap: ``donor_ptr``, array shapes from their metadata,
  the manifest's chunk list and the Parquet footer of ``donors.parquet``): ``donor_ptr``
  starts at 0, increases strictly and ends at the rows of ``features``; the attributes'
  ``n_cells`` and ``n_donors`` agree with it; every per-cell array has a row per cell;
  every chunk of ``features`` and ``source_joinid`` is listed (Zarr would read a missing
  one as its fill value); ``donors.parquet`` has a row per donor; batch statistics have
  a row per batch, and every batch standard deviation is finite and positive.
- in ``sampleclr-scale check`` (:func:`check_contents`, reads the arrays): every cell's
  category code lies within its column's categories and every feature is finite.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import numpy as np

from sampleclr_scale.errors import InputError
from sampleclr_scale.store.layout import DONORS_FILE

if TYPE_CHECKING:
    from sampleclr_scale.store.bag_store import BagStore

_FIX = ("ingest the store again (`sampleclr-scale ingest SOURCE --out STORE --overwrite`): "
        "a store is never edited in place")


def _refuse(store: BagStore, problems: list[str]) -> None:
    if problems:
        raise InputError(f"bag store {store.location} is inconsistent: {'; '.join(problems)}",
                         _FIX)


def check_layout(store: BagStore) -> None:
    """The cheap invariants, checked on open (see the module docstring).

    Raises
    ------
    InputError
        Naming every broken invariant.
    """
    ptr, rows = store.donor_ptr, store.features.shape[0]
    problems = _pointer_problems(ptr, rows)
    if problems:  # the rest is measured against donor_ptr
        _refuse(store, problems)
    n_cells, n_donors = int(ptr[-1]), len(ptr) - 1
    for name, expected in (("n_cells", n_cells), ("n_donors", n_donors)):
        if store.attrs.get(name) != expected:
            problems.append(f"attribute {name} is {store.attrs.get(name)}, donor_ptr says "
                            f"{expected}")
    group = store._group
    cell_arrays = ["source_joinid", *(f"codes/{c}" for c in store.code_columns)]
    for name in cell_arrays:
        if name in group and group[name].shape[0] != n_cells:
            problems.append(f"{name} has {group[name].shape[0]} rows, not {n_cells}")
    for name in ("features", "source_joinid"):
        missing = _missing_chunks(store, name)
        if missing:
            problems.append(f"{len(missing)} chunk(s) of {name} are not in the manifest "
                            f"(e.g. {missing[0]}): Zarr would read them as zeros")
    rows_listed = _donor_rows(store)
    if rows_listed != n_donors:
        problems.append(f"donors.parquet has {rows_listed} rows, donor_ptr {n_donors} donors")
    problems += _batch_problems(store)
    _refuse(store, problems)


def _pointer_problems(ptr: np.ndarray, rows: int) -> list[str]:
    """What is wrong with ``donor_ptr`` against a ``features`` array of ``rows`` rows."""
    if ptr.ndim != 1 or len(ptr) < 2:
        return [f"donor_ptr has shape {ptr.shape}, not [n_donors + 1]"]
    if ptr[0] != 0:
        return [f"donor_ptr starts at {ptr[0]}, not 0"]
    steps = np.diff(ptr)
    if (steps <= 0).any():
        i = int(np.flatnonzero(steps <= 0)[0])
        return [f"donor_ptr does not increase at donor {i} ({ptr[i]} then {ptr[i + 1]})"]
    if ptr[-1] != rows:
        return [f"donor_ptr ends at {ptr[-1]}, features has {rows} rows"]
    return []


def _missing_chunks(store: BagStore, name: str) -> list[str]:
    """The chunk files of array ``name`` that the manifest does not list."""
    array = store._group[name]
    listed = store.manifest.sizes
    keys = (f"{name}/{array.metadata.encode_chunk_key(coords)}"
            for coords in itertools.product(*(range(n) for n in array.cdata_shape)))
    return [key for key in keys if key not in listed]


def _donor_rows(store: BagStore) -> int:
    """Rows of ``donors.parquet``, from its footer."""
    return (store.location / DONORS_FILE).parquet_file().metadata.num_rows


def _batch_problems(store: BagStore) -> list[str]:
    """Batch statistics of another shape than ``[n_batches, d]``."""
    group = store._group
    if "batch_std" not in group:
        return []
    expected = (len(store.batch_labels), store.dim)
    problems = [f"{name} has shape {group[name].shape}, not {list(expected)}"
                for name in ("batch_mean", "batch_std") if group[name].shape != expected]
    std = group["batch_std"][:]
    if not (np.isfinite(std) & (std > 0)).all():
        problems.append("batch_std holds zeros or non-finite values: standardising would "
                        "divide by them")
    return problems


def check_contents(store: BagStore) -> dict[str, Any]:
    """The invariants that read the arrays (``sampleclr-scale check``).

    Returns
    -------
    dict
        ``consistent`` (True), ``rows_checked``.

    Raises
    ------
    InputError
        For a category code outside its column's categories or a NaN or infinite
        feature.
    """
    problems = []
    for column in store.code_columns:
        n = len(store.categories(column))
        codes = store.codes(column)[:]
        bad = np.flatnonzero((codes < -1) | (codes >= n))
        if len(bad):
            problems.append(f"{len(bad)} codes of cell column {column!r} lie outside its "
                            f"{n} categories (e.g. row {bad[0]}: {codes[bad[0]]})")
    step = store.features.chunks[0]
    for start in range(0, store.n_cells, step):
        block = store.features[start:start + step]
        if not np.isfinite(block).all():
            row = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            problems.append(f"features hold NaN or infinite values (e.g. row {row})")
            break
    _refuse(store, problems)
    return {"consistent": True, "rows_checked": store.n_cells}
