"""Cohort selection: which cells, grouped into which donors, split how.

Works on obs columns only (a few bytes per cell); features are read later, in blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sampleclr_scale.config import IngestConfig
from sampleclr_scale.data.sources import CellSource, filter_columns
from sampleclr_scale.errors import InputError

log = logging.getLogger(__name__)

DONOR_SEPARATOR = "/"


@dataclass
class Cohort:
    """The cells and donors of a cohort, before features are read.

    Attributes
    ----------
    joinid
        Int64 ``[n]`` sorted source ids of the cohort's cells.
    donor
        Int64 ``[n]`` donor position of each cell.
    donors
        One row per donor: ``donor`` (the key, columns joined by ``/``), the key columns,
        the metadata columns, ``n_cells`` and ``split``.
    cells
        Cell-level columns aligned with ``joinid`` (may have no columns).
    counts
        What the selection dropped and kept, for the log and the store's attributes.
    """

    joinid: np.ndarray
    donor: np.ndarray
    donors: pd.DataFrame
    cells: pd.DataFrame
    counts: dict[str, int] = field(default_factory=dict)


def _effective_filter(config: IngestConfig) -> str | None:
    """The obs filter with ``is_primary_data == True`` added when asked."""
    parts = [f"({config.obs_filter})" if config.obs_filter else None]
    if config.primary_only:
        parts.append("is_primary_data == True")
    joined = " and ".join(p for p in parts if p)
    return joined or None


def select_cohort(source: CellSource, config: IngestConfig) -> Cohort:
    """Read the obs columns a cohort needs, block by block, and group its cells into donors.

    Per cell only a compact index is kept (source id, donor, the cell-level columns as
    categorical codes); donor-level columns are reduced to value counts per donor as the
    blocks stream by.

    Raises
    ------
    InputError
        For a missing column, an empty cohort, or all donors below ``min_cells``.
    """
    source.check_columns(config.donor_key, "--donor-key")
    source.check_columns(config.meta, "--meta")
    source.check_columns(config.cell_columns, "--cell-columns")
    if config.primary_only:
        source.check_columns(["is_primary_data"], "primary-only selection")
    if config.obs_filter:
        source.check_columns(filter_columns(config.obs_filter), "--obs-filter")
    columns = list(dict.fromkeys([*config.donor_key, *config.meta, *config.cell_columns]))
    obs_filter = _effective_filter(config)
    index = _ObsIndex(config)
    for block in source.iter_obs(columns, obs_filter):
        index.add(block)
    if index.n_cells == 0:
        raise InputError(
            f"no cell of {source.uri} passes the obs filter {obs_filter!r}",
            "loosen --obs-filter (check the values with the source's obs table)",
        )
    return index.cohort()


class _ObsIndex:
    """Accumulates obs blocks into a compact per-cell index and per-donor value counts."""

    def __init__(self, config: IngestConfig) -> None:
        self.config = config
        self.keys: dict[tuple, int] = {}  # donor key values -> group id
        self.joinid: list[np.ndarray] = []
        self.group: list[np.ndarray] = []
        self.cells: list[pd.DataFrame] = []
        self.value_counts: dict[str, list[pd.Series]] = {c: [] for c in self._meta_columns}
        self.n_cells = 0

    @property
    def _meta_columns(self) -> list[str]:
        return list(dict.fromkeys([*self.config.donor_key, *self.config.meta]))

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
        self.joinid.append(block["joinid"].to_numpy(np.int64))
        self.group.append(group)
        self.cells.append(block[self.config.cell_columns])
        for column in self._meta_columns:
            pairs = pd.DataFrame({"group": group, "value": block[column].to_numpy()})
            self.value_counts[column].append(
                pairs.groupby(["group", "value"], dropna=True).size())
        self.n_cells += len(block)

    def cohort(self) -> Cohort:
        """Drop special and small donors, order donors by name, split them."""
        config = self.config
        joinid = np.concatenate(self.joinid)
        group = np.concatenate(self.group)
        cells = pd.concat(self.cells, ignore_index=True) if len(self.cells) > 1 else self.cells[0]
        self.joinid = self.group = self.cells = []
        if not np.all(joinid[1:] > joinid[:-1]):
            order = np.argsort(joinid, kind="stable")
            joinid, group, cells = joinid[order], group[order], cells.iloc[order]
        counts = {"cells_matching_filter": len(joinid)}

        key_values = np.array(list(self.keys), dtype=object).reshape(len(self.keys), -1)
        sizes = np.bincount(group, minlength=len(self.keys))
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
        order = np.flatnonzero(kept)[np.argsort(names[kept], kind="stable")]
        position = np.full(len(names), -1, dtype=np.int32)
        position[order] = np.arange(len(order), dtype=np.int32)
        donor = position[group]
        keep = donor >= 0
        if not keep.all():
            joinid, donor = joinid[keep], donor[keep]
            cells = cells[keep]
        counts["cells"] = len(joinid)
        counts["donors"] = len(order)

        donors = self._donor_table(names[order], order, position, sizes[order])
        donors["split"] = split_donors(donors, config.val_fraction, config.stratify,
                                       config.group_by, config.seed)
        return Cohort(joinid=joinid, donor=donor, donors=donors,
                      cells=cells.reset_index(drop=True), counts=counts)

    def _donor_table(self, names: np.ndarray, groups: np.ndarray, position: np.ndarray,
                     sizes: np.ndarray) -> pd.DataFrame:
        """One row per kept donor; a metadata column takes the donor's most frequent value."""
        table = pd.DataFrame({"donor": names})
        mixed = []
        for column in self._meta_columns:
            counts = pd.concat(self.value_counts[column]).groupby(level=[0, 1]).sum()
            counts = counts[position[counts.index.get_level_values(0)] >= 0]
            by_count = counts.sort_values(ascending=False, kind="stable").reset_index()
            top = by_count.drop_duplicates("group").set_index("group")["value"]
            table[column] = top.reindex(groups).to_numpy()
            n_distinct = counts.groupby(level=0).size()
            if (n_distinct > 1).any():
                mixed.append(f"{column} ({int((n_distinct > 1).sum())} donors)")
        if mixed:
            log.warning("donor-level columns vary within donors, most frequent value kept: %s",
                        ", ".join(mixed))
        table["n_cells"] = sizes.astype(np.int64)
        return table


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
