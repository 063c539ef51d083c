"""The train / validation split of a cohort's donors."""

from __future__ import annotations

import numpy as np
import pandas as pd

from sampleclr_scale.errors import InputError


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
