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
    """Read the obs columns a cohort needs and group its cells into donors.

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
    obs = source.read_obs(columns, obs_filter)
    counts = {"cells_matching_filter": len(obs)}
    if obs.empty:
        raise InputError(
            f"no cell of {source.uri} passes the obs filter {obs_filter!r}",
            "loosen --obs-filter (check the values with the source's obs table)",
        )
    obs = obs.sort_values("joinid", kind="stable").reset_index(drop=True)

    groups = obs.groupby(config.donor_key, observed=True, sort=True, dropna=False)
    group = groups.ngroup().to_numpy()
    keys = groups.size().reset_index(name="n_cells")  # one row per group, in group order
    names = keys[config.donor_key].astype(str).agg(DONOR_SEPARATOR.join, axis=1).to_numpy()
    special = keys[config.donor_key].astype(str).isin(config.drop_donors).any(axis=1).to_numpy()
    counts["cells_of_special_donors"] = int(keys["n_cells"][special].sum())
    small = ~special & (keys["n_cells"].to_numpy() < config.min_cells)
    counts["donors_below_min_cells"] = int(small.sum())
    counts["cells_of_donors_below_min_cells"] = int(keys["n_cells"][small].sum())
    if small.any():
        log.info("dropped %d donors with fewer than %d cells (%d cells)",
                 int(small.sum()), config.min_cells, counts["cells_of_donors_below_min_cells"])
    kept = ~special & ~small
    if not kept.any():
        largest = int(keys["n_cells"][~special].max()) if (~special).any() else 0
        raise InputError(
            f"all {int((~special).sum())} donors have fewer than --min-cells "
            f"{config.min_cells} cells (largest: {largest})",
            "lower --min-cells or widen the cohort",
        )
    order = np.flatnonzero(kept)[np.argsort(names[kept], kind="stable")]
    position = np.full(len(keys), -1, dtype=np.int64)
    position[order] = np.arange(len(order))
    kept_names = names[order]
    code = position[group]
    keep = code >= 0
    obs, code = obs[keep].reset_index(drop=True), code[keep]
    counts["cells"] = len(obs)
    counts["donors"] = len(kept_names)

    donors = _donor_table(obs, code, kept_names, config)
    donors["split"] = split_donors(donors, config.val_fraction, config.stratify,
                                   config.group_by, config.seed)
    return Cohort(
        joinid=obs["joinid"].to_numpy(np.int64),
        donor=code,
        donors=donors,
        cells=obs[config.cell_columns].reset_index(drop=True),
        counts=counts,
    )


def _donor_table(
    obs: pd.DataFrame, code: np.ndarray, names: np.ndarray, config: IngestConfig
) -> pd.DataFrame:
    """One row per donor; a metadata column takes the donor's most frequent value."""
    columns = list(dict.fromkeys([*config.donor_key, *config.meta]))
    table = pd.DataFrame({"donor": names})
    mixed = []
    for column in columns:
        pairs = pd.DataFrame({"donor": code, "value": obs[column]})
        sizes = pairs.groupby(["donor", "value"], observed=True, dropna=True).size()
        by_count = sizes.sort_values(ascending=False, kind="stable").reset_index()
        top = by_count.drop_duplicates("donor").set_index("donor")["value"]
        values = top.reindex(np.arange(len(names)))
        if isinstance(obs[column].dtype, pd.CategoricalDtype):
            values = pd.Categorical(values, categories=obs[column].cat.categories)
        table[column] = values
        n_distinct = sizes.groupby(level="donor").size()
        if (n_distinct > 1).any():
            mixed.append(f"{column} ({int((n_distinct > 1).sum())} donors)")
    if mixed:
        log.warning("donor-level columns vary within donors, most frequent value kept: %s",
                    ", ".join(mixed))
    table["n_cells"] = np.bincount(code, minlength=len(names)).astype(np.int64)
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
