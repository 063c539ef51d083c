"""Cohort selection: which cells, grouped into which donors, split how.

Works on obs columns only; features are read later, in blocks. The obs blocks stream once
into the on-disk cell index (:mod:`~sampleclr_scale.ingest.cell_index`) and the per-donor
counts of the donor table (:mod:`~sampleclr_scale.ingest.donors`); then cells without a
donor, small and special donors are dropped and the rest split
(:mod:`~sampleclr_scale.ingest.split`). Memory holds per-donor tables and one block, not the
cells: the same at 1M and 100M cells.

Donor ids that repeat across datasets (CELLxGENE's ``donor_id`` is unique only within a
``dataset_id``) must not merge different people into one donor. When the source has a
``dataset_id`` column that the donor key lacks, the stream groups cells by ``dataset_id``
and the key together, which costs one more obs column and no second pass. Afterwards, if
no donor is found in more than one dataset, the groups are merged back to the key as
configured; if some are, the default key becomes ``dataset_id`` + ``donor_id`` (with a
warning), an explicit key with ``donor_id`` is refused, and another explicit key is kept
as asked (with a warning).
"""

from __future__ import annotations

import functools
import logging
import operator
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sampleclr_scale.config import IngestConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.ingest.cell_index import CellIndex
from sampleclr_scale.ingest.donors import DonorCounts
from sampleclr_scale.ingest.split import split_donors
from sampleclr_scale.sources.base import CellSource
from sampleclr_scale.sources.obs_filter import Filter, parse_filter

log = logging.getLogger(__name__)

DONOR_SEPARATOR = "/"
DATASET_COLUMN = "dataset_id"
"""The obs column naming a cell's dataset, within which donor ids are unique."""


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
    donor_key
        The obs columns that name a donor: the configured key, or ``dataset_id`` and the
        default key when donor ids repeat across datasets.
    counts
        What the selection dropped and kept, for the log and the store's attributes.
    """

    cells: CellIndex
    donors: pd.DataFrame
    donor_key: list[str]
    counts: dict[str, int] = field(default_factory=dict)


def _effective_filter(config: IngestConfig, source: CellSource) -> Filter | None:
    """The parsed ``--obs-filter``, its columns checked against ``source``, and
    ``is_primary_data == True`` when asked."""
    parts = []
    if config.obs_filter:
        parts.append(parse_filter(config.obs_filter))
        source.check_columns(parts[0].columns, "--obs-filter")
    if config.primary_only:
        source.check_columns(["is_primary_data"], "primary-only selection")
        parts.append(parse_filter("is_primary_data == True"))
    return functools.reduce(operator.and_, parts) if parts else None


def _stream_key(config: IngestConfig, source: CellSource) -> list[str]:
    """The columns the obs stream groups cells by: the donor key, after ``dataset_id``
    when the source has that column and the key lacks it."""
    if DATASET_COLUMN in source.obs_columns and DATASET_COLUMN not in config.donor_key:
        return [DATASET_COLUMN, *config.donor_key]
    return list(config.donor_key)


def _donor_columns(key: list[str], config: IngestConfig) -> list[str]:
    """The donor-level columns: ``key``, the metadata and the batch columns."""
    return list(dict.fromkeys([*key, *config.meta, *config.batch_key]))


def select_cohort(source: CellSource, config: IngestConfig, workdir: Path) -> Cohort:
    """Read the obs columns a cohort needs, block by block, and group its cells into donors.

    The per-cell index goes to files in ``workdir`` (which must outlive the cohort);
    donor-level columns are reduced to value counts per donor as the blocks stream by.

    Raises
    ------
    InputError
        For a missing column, a bad obs filter, an empty cohort, all donors below
        ``min_cells``, or an explicit ``donor_id`` key whose ids repeat across datasets.
    """
    source.check_columns(config.donor_key, "--donor-key")
    source.check_columns(config.meta, "--meta")
    source.check_columns(config.cell_columns, "--cell-columns")
    source.check_columns(config.batch_key, "--batch-key")
    obs_filter = _effective_filter(config, source)
    key = _stream_key(config, source)
    columns = list(dict.fromkeys([*_donor_columns(key, config), *config.cell_columns]))
    index = _ObsIndex(config, CellIndex(workdir, config.cell_columns), key)
    for block in source.iter_obs(columns, obs_filter):
        index.add(block)
    if index.cells.n_cells == 0:
        expression = obs_filter.expression if obs_filter is not None else None
        raise InputError(
            f"no cell of {source.uri} passes the obs filter {expression!r}",
            "loosen --obs-filter (check the values with the source's obs table)",
        )
    return index.cohort()


class _ObsIndex:
    """Streams obs blocks into the on-disk cell index and the per-donor counts.

    Cells are grouped by the values of ``key`` (:func:`_stream_key`); :meth:`cohort`
    settles the donor key and merges groups that it does not tell apart.
    """

    def __init__(self, config: IngestConfig, cells: CellIndex, key: list[str]) -> None:
        self.config = config
        self.cells = cells
        self.key = key
        self.keys: dict[tuple, int] = {}  # key values -> group id
        self.donors = DonorCounts(_donor_columns(key, config), config.batch_key)

    def add(self, block: pd.DataFrame) -> None:
        """Index one block of obs rows (with a ``joinid`` column)."""
        if block.empty:
            return
        groups = block.groupby(self.key, observed=True, sort=False, dropna=False)
        local = groups.ngroup().to_numpy()
        first = groups.size().index  # key tuples in local group order
        first = first if isinstance(first, pd.MultiIndex) else [(k,) for k in first]
        ids = np.array([self.keys.setdefault(tuple(k), len(self.keys)) for k in first],
                       dtype=np.int32)
        group = ids[local]
        self.cells.append(block["joinid"].to_numpy(np.int64), group,
                          block[self.config.cell_columns])
        self.donors.add(group, block, len(self.keys))

    def cohort(self) -> Cohort:
        """Settle the donor key; drop cells without a donor, special and small donors;
        order donors by name, split them."""
        donor_key, group_of = self._settle_key()
        config, sizes = self.config, self.donors.sizes
        counts = {"cells_matching_filter": self.cells.n_cells}

        key_values = np.array(list(self.keys), dtype=object).reshape(len(self.keys), -1)
        names = np.array([DONOR_SEPARATOR.join(map(str, k)) for k in key_values])
        unnamed = _unnamed(key_values, sizes, donor_key, counts)
        special = ~unnamed & np.isin(key_values.astype(str), config.drop_donors).any(axis=1)
        counts["cells_of_special_donors"] = int(sizes[special].sum())
        dropped = unnamed | special
        small = ~dropped & (sizes < config.min_cells)
        counts["donors_below_min_cells"] = int(small.sum())
        counts["cells_of_donors_below_min_cells"] = int(sizes[small].sum())
        if small.any():
            log.info("dropped %d donors with fewer than %d cells (%d cells)",
                     int(small.sum()), config.min_cells,
                     counts["cells_of_donors_below_min_cells"])
        kept = ~dropped & ~small
        if not kept.any():
            largest = int(sizes[~dropped].max()) if (~dropped).any() else 0
            raise InputError(
                f"all {int((~dropped).sum())} donors have fewer than --min-cells "
                f"{config.min_cells} cells (largest: {largest})",
                "lower --min-cells or widen the cohort",
            )
        self.donors.check_missing_batches(kept)
        order = np.flatnonzero(kept)[np.argsort(names[kept], kind="stable")]
        position = np.full(len(names), -1, dtype=np.int32)
        position[order] = np.arange(len(order), dtype=np.int32)
        self.cells.keep(position[group_of], int(sizes[kept].sum()))
        counts["cells"] = self.cells.n_kept
        counts["donors"] = len(order)

        donors = self.donors.table(names[order], order, position)
        donors["split"] = split_donors(donors, config.val_fraction, config.stratify,
                                       config.group_by, config.seed)
        return Cohort(cells=self.cells, donors=donors, donor_key=donor_key, counts=counts)

    def _settle_key(self) -> tuple[list[str], np.ndarray]:
        """The donor key, and the donor group of each group of the stream.

        Without ``dataset_id`` streamed before the configured key, that key and the
        stream's groups. With it: if some donor's id occurs in more than one dataset, the
        default key becomes ``dataset_id`` + the key (with a warning) and an explicit key
        with ``donor_id`` is refused; otherwise, and for any other explicit key (with a
        warning), the groups are merged back to the configured key.

        Raises
        ------
        InputError
            For an explicit ``donor_id`` key whose ids occur in more than one dataset.
        """
        config = self.config
        if self.key == config.donor_key:
            return config.donor_key, np.arange(len(self.keys))
        spanning = _spanning_donors(self.keys, config.drop_donors)
        if spanning and "donor_key" not in config.model_fields_set:
            log.warning("%s: donors are told apart by %s (pass --donor-key %s to say so)",
                        _describe_spanning(spanning), " + ".join(self.key), " ".join(self.key))
            return self.key, np.arange(len(self.keys))
        if spanning and "donor_id" in config.donor_key:
            raise InputError(
                f"--donor-key {' '.join(config.donor_key)} would merge different donors: "
                f"{_describe_spanning(spanning)}, and donor_id is unique only within a "
                f"{DATASET_COLUMN} (as in CELLxGENE Census)",
                f"use --donor-key {' '.join(self.key)}",
            )
        if spanning:
            log.warning("%s: their cells are merged into one donor each, as --donor-key %s "
                        "asks (add %s to it to tell them apart)", _describe_spanning(spanning),
                        " ".join(config.donor_key), DATASET_COLUMN)
        return config.donor_key, self._regroup()

    def _regroup(self) -> np.ndarray:
        """Merge the stream's groups that share the values after ``dataset_id``; returns
        the new group of each old one."""
        merged: dict[tuple, int] = {}
        groups = np.array([merged.setdefault(k[1:], len(merged)) for k in self.keys],
                          dtype=np.int32)
        self.keys = merged
        self.donors.regroup(groups, len(merged), _donor_columns(self.config.donor_key,
                                                               self.config))
        return groups


def _unnamed(key_values: np.ndarray, sizes: np.ndarray, donor_key: list[str],
             counts: dict[str, int]) -> np.ndarray:
    """Groups without a value (None/NaN) in a donor-key column: counted in ``counts``
    (``cells_without_donor``) and logged, since their cells name no donor."""
    unnamed = pd.isna(key_values).any(axis=1)
    counts["cells_without_donor"] = int(sizes[unnamed].sum())
    if unnamed.any():
        log.warning("dropped %d cells without a value (None/NaN) in --donor-key %s",
                    counts["cells_without_donor"], " ".join(donor_key))
    return unnamed


def _spanning_donors(keys: Iterable[tuple], drop_donors: list[str]) -> dict[tuple, set]:
    """The donors found in more than one dataset, with those datasets.

    ``keys`` are ``(dataset_id, *donor)`` tuples; donors with a missing value or a
    ``drop_donors`` name are left out (they are dropped anyway), as are missing datasets.
    """
    datasets: defaultdict[tuple, set] = defaultdict(set)
    for dataset, *donor in keys:
        if not pd.isna(dataset) and not any(pd.isna(v) or str(v) in drop_donors
                                            for v in donor):
            datasets[tuple(donor)].add(dataset)
    return {donor: found for donor, found in datasets.items() if len(found) > 1}


def _describe_spanning(spanning: dict[tuple, set]) -> str:
    """``N donor ids occur in more than one dataset_id, e.g. 'donor-0' in [...]``."""
    donor, found = next(iter(spanning.items()))
    n = len(spanning)
    return (f"{n} donor id{'s' * (n != 1)} occur{'s' * (n == 1)} in more than one "
            f"{DATASET_COLUMN}, e.g. {DONOR_SEPARATOR.join(map(str, donor))!r} in "
            f"{sorted(map(str, found))}")
