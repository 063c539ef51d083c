"""The cohort's cells on disk: one fixed-size record per cell, appended as obs blocks stream by.

The record (source id, donor, cell-level columns as codes) travels from this index through
ingest's spill files into the store, so memory holds one block, not the cells.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd


def cell_records(n_columns: int) -> np.dtype:
    """One cell of the index: int64 ``joinid``, int32 ``donor``, int32 ``codes[n_columns]``.

    The same record travels from the on-disk index (:class:`CellIndex`) through ingest's
    spill files into the store.
    """
    return np.dtype([("joinid", "<i8"), ("donor", "<i4"), ("codes", "<i4", (n_columns,))])


class CellIndex:
    """The cohort's cells on disk: one :func:`cell_records` record per cell.

    Written once, in source order, by
    :func:`~sampleclr_scale.ingest.cohort.select_cohort` (``donor`` then holds the
    donor *group* of the obs block), and read back by :meth:`blocks`, which keeps the cells
    of selected donors and gives their donor positions. Cell-level columns are int32 codes
    into per-column value lists (-1 for missing) that stay in memory: they grow with the
    distinct values, not the cells.
    """

    def __init__(self, directory: Path, columns: list[str]) -> None:
        self.path = directory / "cells.bin"
        self.path.touch()
        self.columns = columns
        self.dtype = cell_records(len(columns))
        self.values: dict[str, dict] = {c: {} for c in columns}  # value -> code
        self.n_cells = 0
        self.n_kept = 0
        self._donor_of_group = np.zeros(0, dtype=np.int32)

    def append(self, joinid: np.ndarray, group: np.ndarray, cells: pd.DataFrame) -> None:
        """Add one obs block: int64 source ids, int32 donor groups, the cell columns."""
        records = np.empty(len(joinid), dtype=self.dtype)
        records["joinid"], records["donor"] = joinid, group
        for j, column in enumerate(self.columns):
            categorical = pd.Categorical(cells[column])
            lookup = self.values[column]
            known = np.array([lookup.setdefault(v, len(lookup)) for v in categorical.categories]
                             + [-1], dtype=np.int32)
            records["codes"][:, j] = known[categorical.codes]  # -1 (missing) takes the last
        with open(self.path, "ab") as file:
            file.write(records.tobytes())
        self.n_cells += len(joinid)

    def keep(self, donor_of_group: np.ndarray, n_kept: int) -> None:
        """Cells of group ``g`` belong to donor ``donor_of_group[g]`` (-1: dropped),
        ``n_kept`` cells in all."""
        self._donor_of_group = donor_of_group
        self.n_kept = n_kept

    def blocks(self, size: int) -> Iterator[np.ndarray]:
        """Records of the kept cells, with donor positions, in blocks of about ``size``
        source rows, each sorted by source id."""
        for lo in range(0, self.n_cells, size):
            records = np.fromfile(self.path, self.dtype, min(size, self.n_cells - lo),
                                  offset=lo * self.dtype.itemsize)
            records["donor"] = self._donor_of_group[records["donor"]]
            kept = records[records["donor"] >= 0]
            yield kept[np.argsort(kept["joinid"], kind="stable")]

    def sample(self, n: int, seed: int) -> np.ndarray:
        """Sorted source ids of a uniform random subsample of ``n`` kept cells."""
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(self.n_kept, size=min(n, self.n_kept), replace=False))
        found, seen = [], 0
        for records in self.blocks(1 << 20):
            inside = pick[(pick >= seen) & (pick < seen + len(records))]
            found.append(records["joinid"][inside - seen])
            seen += len(records)
        return np.sort(np.concatenate(found))

    def categories(self, column: str) -> list:
        """The values of cell column ``column`` in code order (code ``i`` is value ``i``):
        every value seen in the obs blocks, in order of first appearance."""
        return list(self.values[column])

    def cell_table(self, codes: np.ndarray) -> pd.DataFrame:
        """The cell columns of rows with ``codes``, as categoricals over all their values."""
        return pd.DataFrame({
            column: pd.Categorical.from_codes(codes[:, j], categories=self.categories(column))
            for j, column in enumerate(self.columns)})
