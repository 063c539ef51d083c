"""Cohort selection: which cells, grouped into which donors, split how.

Works on obs columns only; features are read later, in blocks. The per-cell index (source
id, donor, cell-level columns as codes) is appended to files on disk as the obs blocks
stream by, and read back in blocks, so memory holds per-donor tables and one block, not
the cells: the same at 1M and 100M cells.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sampleclr_scale.config import IngestConfig
from sampleclr_scale.data.sources import CellSource, filter_columns
from sampleclr_scale.errors import InputError

log = logging.getLogger(__name__)

DONOR_SEPARATOR = "/"


def cell_records(n_columns: int) -> np.dtype:
    """One cell of the index: int64 ``joinid``, int32 ``donor``, int32 ``codes[n_columns]``.

    The same record travels from the on-disk index (:class:`CellIndex`) through ingest's
    spill files into the store.
    """
    return np.dtype([("joinid", "<i8"), ("donor", "<i4"), ("codes", "<i4", (n_columns,))])


class CellIndex:
    """The cohort's cells on disk: one :func:`cell_records` record per cell.

    Written once, in source order, by :func:`select_cohort` (``donor`` then holds the
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


@dataclass
class Cohort:
    """The cells and donors of a cohort, before features are read.

    Attributes
    ----------
    cells
        The per-cell index on disk (source ids, donors, cell-level columns).
    donors
        One row per donor: ``donor`` (the key, columns joined by ``/``), the key columns,
        the metadata columns, ``n_cells`` and ``split``.
    counts
        What the selection dropped and kept, for the log and the store's attributes.
    """

    cells: CellIndex
    donors: pd.DataFrame
    counts: dict[str, int] = field(default_factory=dict)


def _effective_filter(config: IngestConfig) -> str | None:
    """The obs filter with ``is_primary_data == True`` added when asked."""
    parts = [f"({config.obs_filter})" if config.obs_filter else None]
    if config.primary_only:
        parts.append("is_primary_data == True")
    joined = " and ".join(p for p in parts if p)
    return joined or None


def select_cohort(source: CellSource, config: IngestConfig, workdir: Path) -> Cohort:
    """Read the obs columns a cohort needs, block by block, and group its cells into donors.

    The per-cell index goes to files in ``workdir`` (which must outlive the cohort);
    donor-level columns are reduced to value counts per donor as the blocks stream by.

    Raises
    ------
    InputError
        For a missing column, an empty cohort, or all donors below ``min_cells``.
    """
    source.check_columns(config.donor_key, "--donor-key")
    source.check_columns(config.meta, "--meta")
    source.check_columns(config.cell_columns, "--cell-columns")
    source.check_columns(config.batch_key, "--batch-key")
    if config.primary_only:
        source.check_columns(["is_primary_data"], "primary-only selection")
    if config.obs_filter:
        source.check_columns(filter_columns(config.obs_filter), "--obs-filter")
    columns = list(dict.fromkeys([*config.donor_key, *config.meta, *config.batch_key,
                                  *config.cell_columns]))
    obs_filter = _effective_filter(config)
    index = _ObsIndex(config, CellIndex(workdir, config.cell_columns))
    for block in source.iter_obs(columns, obs_filter):
        index.add(block)
    if index.cells.n_cells == 0:
        raise InputError(
            f"no cell of {source.uri} passes the obs filter {obs_filter!r}",
            "loosen --obs-filter (check the values with the source's obs table)",
        )
    return index.cohort()


class _ObsIndex:
    """Streams obs blocks into the on-disk cell index, per-donor sizes and value counts."""

    def __init__(self, config: IngestConfig, cells: CellIndex) -> None:
        self.config = config
        self.cells = cells
        self.keys: dict[tuple, int] = {}  # donor key values -> group id
        self.sizes = np.zeros(0, dtype=np.int64)  # cells per group
        self.value_counts: dict[str, list[pd.Series]] = {c: [] for c in self._meta_columns}
        self.missing = {c: np.zeros(0, dtype=np.int64) for c in config.batch_key}  # per group

    @property
    def _meta_columns(self) -> list[str]:
        return list(dict.fromkeys([*self.config.donor_key, *self.config.meta,
                                   *self.config.batch_key]))

    def add(self, block: pd.DataFrame) -> None:
        """Index one block of obs rows (with a ``joinid`` column)."""
        if block.empty:
            return
        groups = block.groupby(self.config.donor_key, observed=True, sort=False, dropna=False)
        local = groups.ngroup().to_numpy()
        first = groups.size().index  # key tuples in local group order
        first = first if isinstance(first, pd.MultiIndex) else [(k,) for k in first]
        ids = np.array([self.keys.setdefault(tuple(k), len(self.keys)) for k in first],
                       dtype=np.int32)
        group = ids[local]
        self.cells.append(block["joinid"].to_numpy(np.int64), group,
                          block[self.config.cell_columns])
        self.sizes = _add_counts(self.sizes, group, len(self.keys))
        for column, missing in self.missing.items():
            self.missing[column] = _add_counts(
                missing, group[block[column].isna().to_numpy()], len(self.keys))
        for column in self._meta_columns:
            pairs = pd.DataFrame({"group": group, "value": block[column].to_numpy()})
            self.value_counts[column].append(
                pairs.groupby(["group", "value"], dropna=True).size())

    def cohort(self) -> Cohort:
        """Drop special and small donors, order donors by name, split them."""
        config, sizes = self.config, self.sizes
        counts = {"cells_matching_filter": self.cells.n_cells}

        key_values = np.array(list(self.keys), dtype=object).reshape(len(self.keys), -1)
        names = np.array([DONOR_SEPARATOR.join(map(str, k)) for k in key_values])
        special = np.isin(key_values.astype(str), config.drop_donors).any(axis=1)
        small = ~special & (sizes < config.min_cells)
        counts["cells_of_special_donors"] = int(sizes[special].sum())
        counts["donors_below_min_cells"] = int(small.sum())
        counts["cells_of_donors_below_min_cells"] = int(sizes[small].sum())
        if small.any():
            log.info("dropped %d donors with fewer than %d cells (%d cells)",
                     int(small.sum()), config.min_cells,
                     counts["cells_of_donors_below_min_cells"])
        kept = ~special & ~small
        if not kept.any():
            largest = int(sizes[~special].max()) if (~special).any() else 0
            raise InputError(
                f"all {int((~special).sum())} donors have fewer than --min-cells "
                f"{config.min_cells} cells (largest: {largest})",
                "lower --min-cells or widen the cohort",
            )
        self._check_missing_batches(kept)
        order = np.flatnonzero(kept)[np.argsort(names[kept], kind="stable")]
        position = np.full(len(names), -1, dtype=np.int32)
        position[order] = np.arange(len(order), dtype=np.int32)
        self.cells.keep(position, int(sizes[kept].sum()))
        counts["cells"] = self.cells.n_kept
        counts["donors"] = len(order)

        donors = self._donor_table(names[order], order, position, sizes[order])
        donors["split"] = split_donors(donors, config.val_fraction, config.stratify,
                                       config.group_by, config.seed)
        return Cohort(cells=self.cells, donors=donors, counts=counts)

    def _check_missing_batches(self, kept: np.ndarray) -> None:
        """Refuse kept cells without a value in a batch-key column."""
        for column, missing in self.missing.items():
            n_cells = int(missing[kept].sum())
            if not n_cells:
                continue
            known = pd.concat(self.value_counts[column]).index.get_level_values(1).unique()
            known = sorted(known.tolist(), key=str)
            example = (f'--obs-filter "{column} in {known!r}"' if len(known) <= 5
                       else f"an --obs-filter on the known values of {column}")
            n_donors = int((missing[kept] > 0).sum())
            raise InputError(
                f"--batch-key column {column!r} has no value (None/NaN) for {n_cells} cells "
                f"of {n_donors} donor{'s' * (n_donors != 1)}",
                f"filter them out with --obs-filter, e.g. {example}",
            )

    def _donor_table(self, names: np.ndarray, groups: np.ndarray, position: np.ndarray,
                     sizes: np.ndarray) -> pd.DataFrame:
        """One row per kept donor; a metadata column takes the donor's most frequent value.

        Raises
        ------
        InputError
            For a batch-key column with more than one value among a donor's cells.
        """
        table = pd.DataFrame({"donor": names})
        mixed = []
        for column in self._meta_columns:
            counts = pd.concat(self.value_counts[column]).groupby(level=[0, 1]).sum()
            counts = counts[position[counts.index.get_level_values(0)] >= 0]
            by_count = counts.sort_values(ascending=False, kind="stable").reset_index()
            top = by_count.drop_duplicates("group").set_index("group")["value"]
            table[column] = top.reindex(groups).to_numpy()
            n_distinct = counts.groupby(level=0).size()
            if column in self.config.batch_key and (n_distinct > 1).any():
                raise _varying_batch(column, counts, n_distinct, names, position)
            if (n_distinct > 1).any():
                mixed.append(f"{column} ({int((n_distinct > 1).sum())} donors)")
        if mixed:
            log.warning("donor-level columns vary within donors, most frequent value kept: %s",
                        ", ".join(mixed))
        table["n_cells"] = sizes.astype(np.int64)
        return table


def _add_counts(total: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """``total`` (cells per group so far) plus the cells of ``group``, for ``n_groups``."""
    counts = np.bincount(group, minlength=n_groups).astype(np.int64)
    counts[: len(total)] += total
    return counts


def _varying_batch(column: str, counts: pd.Series, n_distinct: pd.Series, names: np.ndarray,
                   position: np.ndarray) -> InputError:
    """The error for a batch-key column that varies within donors (``counts``: cells per
    (group, value) of kept groups; ``names``: kept donor names by position)."""
    varying = n_distinct.index[n_distinct > 1]
    group = varying[0]
    values = [str(v) for v in counts.xs(group, level=0).index]
    return InputError(
        f"--batch-key column {column!r} is not donor-level: the cells of {len(varying)} "
        f"donors have more than one value, e.g. donor {str(names[position[group]])!r} has "
        f"{values}",
        f"add {column} to --donor-key (each of its values becomes a separate sample), or "
        "choose a batch column that is constant within each donor",
    )


def split_donors(
    donors: pd.DataFrame,
    val_fraction: float,
    stratify: str | None,
    group_by: str | None,
    seed: int,
) -> np.ndarray:
    """Assign each donor to ``train`` or ``validation``.

    Stratified on ``stratify`` (class balance kept) and grouped by ``group_by`` (a group,
    e.g. a site, never straddles the split) when given; deterministic in ``seed``.
    """
    from sklearn.model_selection import (
        GroupShuffleSplit,
        StratifiedGroupKFold,
        train_test_split,
    )

    n = len(donors)
    split = np.full(n, "train", dtype=object)
    if val_fraction == 0 or n < 2:
        return split
    for column in (stratify, group_by):
        if column is not None and column not in donors.columns:
            raise InputError(f"split column {column!r} is not a donor-table column",
                             f"add it with --meta {column}, or use one of {list(donors.columns)}")
    y = donors[stratify].astype(str).to_numpy() if stratify else None
    index = np.arange(n)
    try:
        if group_by:
            groups = donors[group_by].astype(str).to_numpy()
            if stratify:
                folds = max(2, round(1 / val_fraction))
                splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
                _, val = next(splitter.split(index, y, groups))
            else:
                splitter = GroupShuffleSplit(1, test_size=val_fraction, random_state=seed)
                _, val = next(splitter.split(index, groups=groups))
        else:
            _, val = train_test_split(index, test_size=val_fraction, stratify=y,
                                      random_state=seed)
    except ValueError as err:
        raise InputError(
            f"cannot split {n} donors with val_fraction={val_fraction}, "
            f"stratify={stratify!r}, group_by={group_by!r}: {err}",
            "use fewer constraints (drop --stratify or --group-by) or a larger cohort",
        ) from None
    split[val] = "validation"
    return split
