"""Which cell types a model weighs: the mean normalised cell weight per type and head.

An embedding's ``cells.parquet`` holds, for every chosen cell of every donor, its store
row and one weight per importance head (15M rows for 15,000 donors of 1,000 cells). Each
weight is divided by the mean weight of its donor's chosen cells (so a donor of few cells
and one of many count alike), then averaged per cell type. The file is read twice in
record batches (the donors' mean weights, then the per-type sums), so memory is one batch
plus the donors' means, whatever the number of cells.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from sampleclr_scale.errors import InputError
from sampleclr_scale.storage import Location
from sampleclr_scale.store.bag_store import BagStore

BATCH_ROWS = 1 << 20
"""Rows of the cell-weight file read at a time."""
UNANNOTATED = "unannotated"
"""The type of cells without one (code -1)."""


def weight_table(path: Location, bag: BagStore, selected: np.ndarray, codes: np.ndarray,
                 types: list[str], batch_rows: int = BATCH_ROWS
                 ) -> tuple[pd.DataFrame, pd.Series]:
    """Cell types x heads mean of each cell's weight over its donor's mean weight, and the
    cells of each type, over the donors ``selected``.

    Parameters
    ----------
    path
        An embedding's ``cells.parquet`` (``donor_index``, ``store_row``, ``head_0`` ..).
    bag
        The bag store the embedding was made from.
    selected
        Donor positions scored.
    codes, types
        Each store row's cell-type code (-1: none) and the types' names
        (:func:`~sampleclr_scale.evaluate.baselines.cell_types`).

    Raises
    ------
    InputError
        For a file without those columns, without rows of the selected donors, or whose
        rows are not rows of their donors in ``bag``.
    """
    file = path.parquet_file()
    heads = sorted((c for c in file.schema_arrow.names if re.fullmatch(r"head_\d+", c)),
                   key=lambda c: int(c.split("_")[1]))
    if not heads or not {"donor_index", "store_row"} <= set(file.schema_arrow.names):
        raise InputError(f"{path} needs columns donor_index, store_row, head_0 ..",
                         "re-run `sampleclr-scale embed`")
    keep = np.zeros(bag.n_donors, dtype=bool)
    keep[selected] = True
    sums = np.zeros((bag.n_donors, len(heads)))
    cells = np.zeros(bag.n_donors)
    for donor, _, weights in _batches(file, heads, keep, batch_rows, path, bag):
        np.add.at(sums, donor, weights)
        cells += np.bincount(donor, minlength=bag.n_donors)
    if not cells.any():
        raise InputError(f"{path} has no cell weights of the scored donors",
                         "re-run `sampleclr-scale embed` on this store")
    means = np.divide(sums, cells[:, None], out=np.ones_like(sums), where=cells[:, None] > 0)
    names = np.asarray([*types, UNANNOTATED], dtype=object)
    by_type = np.zeros((len(names), len(heads)))
    per_type = np.zeros(len(names))
    for donor, rows, weights in _batches(file, heads, keep, batch_rows, path, bag):
        kind = codes[rows]
        kind = np.where(kind < 0, len(types), kind)  # no type: "unannotated"
        np.add.at(by_type, kind, weights / means[donor])
        per_type += np.bincount(kind, minlength=len(names))
    present = np.flatnonzero(per_type > 0)
    present = present[np.argsort(names[present].astype(str), kind="stable")]
    index = pd.Index(names[present], dtype=object)
    table = pd.DataFrame(by_type[present] / per_type[present, None], index=index,
                         columns=heads)
    return table, pd.Series(per_type[present].astype(np.int64), index=index, name="count")


def _batches(file: pq.ParquetFile, heads: list[str], keep: np.ndarray, batch_rows: int,
             path: Location, bag: BagStore
             ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The file's rows of kept donors, a record batch at a time: donor, store row and
    float64 ``[n, heads]`` weights, each row checked to lie within its donor."""
    for batch in file.iter_batches(batch_size=batch_rows,
                                   columns=["donor_index", "store_row", *heads]):
        donor = batch.column("donor_index").to_numpy().astype(np.int64)
        rows = batch.column("store_row").to_numpy().astype(np.int64)
        inside = (donor >= 0) & (donor < bag.n_donors)
        owner = np.searchsorted(bag.donor_ptr, rows, side="right") - 1
        if len(rows) and (rows.min() < 0 or rows.max() >= bag.n_cells
                          or not inside.all() or not np.array_equal(owner, donor)):
            raise InputError(f"store_row of {path} points outside the rows of its donors "
                             f"in {bag.location}", "embed with the same bag store")
        wanted = keep[donor]
        weights = np.stack([batch.column(h).to_numpy() for h in heads], axis=1)
        yield donor[wanted], rows[wanted], weights[wanted].astype(np.float64)
