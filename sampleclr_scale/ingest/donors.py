"""The donor table of a cohort, built from obs blocks as they stream by.

Donor-level columns (the donor key, metadata, technical batches) are reduced to value
counts per donor group; the table keeps each donor's most frequent value, refuses batch
columns that vary within a donor or miss values, and logs other columns that vary.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from sampleclr_scale.errors import InputError

log = logging.getLogger(__name__)


class DonorCounts:
    """Cells per donor group and, per donor-level column, cells per (group, value).

    Parameters
    ----------
    columns
        The donor-level columns (donor key, metadata and batch columns).
    batch_key
        The technical-batch columns among them: these must be constant within a donor
        and never missing.
    """

    def __init__(self, columns: list[str], batch_key: list[str]) -> None:
        self.columns = columns
        self.batch_key = batch_key
        self.sizes = np.zeros(0, dtype=np.int64)
        self.value_counts: dict[str, list[pd.Series]] = {c: [] for c in columns}
        self.missing = {c: np.zeros(0, dtype=np.int64) for c in batch_key}

    def add(self, group: np.ndarray, block: pd.DataFrame, n_groups: int) -> None:
        """Count one obs block whose rows belong to donor groups ``group``."""
        self.sizes = _add_counts(self.sizes, group, n_groups)
        for column, missing in self.missing.items():
            self.missing[column] = _add_counts(
                missing, group[block[column].isna().to_numpy()], n_groups)
        for column in self.columns:
            pairs = pd.DataFrame({"group": group, "value": block[column].to_numpy()})
            self.value_counts[column].append(
                pairs.groupby(["group", "value"], dropna=True).size())

    def regroup(self, new_group: np.ndarray, n_groups: int, columns: list[str]) -> None:
        """Merge donor groups: group ``g`` becomes ``new_group[g]`` (of ``n_groups``).

        Parameters
        ----------
        new_group
            Per current group, its merged group.
        n_groups
            Number of merged groups.
        columns
            The donor-level columns kept (a subset of the current ones).
        """
        self.sizes = _merge_counts(self.sizes, new_group, n_groups)
        self.missing = {column: _merge_counts(missing, new_group, n_groups)
                        for column, missing in self.missing.items()}
        self.value_counts = {column: [_relabel(counts, new_group)
                                      for counts in self.value_counts[column]]
                             for column in columns}
        self.columns = columns

    def check_missing_batches(self, kept: np.ndarray) -> None:
        """Refuse kept cells without a value in a batch-key column.

        Parameters
        ----------
        kept
            Boolean per donor group: the groups that stay in the cohort.
        """
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

    def table(self, names: np.ndarray, groups: np.ndarray, position: np.ndarray) -> pd.DataFrame:
        """One row per kept donor; a donor-level column takes the donor's most frequent value.

        Parameters
        ----------
        names
            Kept donor names, in table order.
        groups
            The donor group of each of those donors.
        position
            Per donor group, its row in the table (-1: dropped).

        Raises
        ------
        InputError
            For a batch-key column with more than one value among a donor's cells.
        """
        table = pd.DataFrame({"donor": names})
        mixed = []
        for column in self.columns:
            counts = pd.concat(self.value_counts[column]).groupby(level=[0, 1]).sum()
            counts = counts[position[counts.index.get_level_values(0)] >= 0]
            by_count = counts.sort_values(ascending=False, kind="stable").reset_index()
            top = by_count.drop_duplicates("group").set_index("group")["value"]
            table[column] = top.reindex(groups).to_numpy()
            n_distinct = counts.groupby(level=0).size()
            if column in self.batch_key and (n_distinct > 1).any():
                raise _varying_batch(column, counts, n_distinct, names, position)
            if (n_distinct > 1).any():
                mixed.append(f"{column} ({int((n_distinct > 1).sum())} donors)")
        if mixed:
            log.warning("donor-level columns vary within donors, most frequent value kept: %s",
                        ", ".join(mixed))
        table["n_cells"] = self.sizes[groups].astype(np.int64)
        return table


def _add_counts(total: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """``total`` (cells per group so far) plus the cells of ``group``, for ``n_groups``."""
    counts = np.bincount(group, minlength=n_groups).astype(np.int64)
    counts[: len(total)] += total
    return counts


def _merge_counts(total: np.ndarray, new_group: np.ndarray, n_groups: int) -> np.ndarray:
    """Cells per merged group, from cells per group ``total`` and ``new_group``."""
    return np.bincount(new_group, weights=total, minlength=n_groups).astype(np.int64)


def _relabel(counts: pd.Series, new_group: np.ndarray) -> pd.Series:
    """Cells per (group, value) with each group replaced by ``new_group[group]``
    (duplicate pairs are summed later, when the counts are concatenated)."""
    index = counts.index
    groups = new_group[index.get_level_values(0).to_numpy(np.int64)]
    return pd.Series(counts.to_numpy(), index=pd.MultiIndex.from_arrays(
        [groups, index.get_level_values(1)], names=index.names))


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
