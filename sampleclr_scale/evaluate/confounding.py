"""How strongly each relevant covariate is tied to each technical one (a confounding table).

When a batch holds mostly one disease level, any per-batch correction also removes
biology, and no method can tell the two apart: only a table of the covariates against the
technical batches says so. For each (relevant, technical) pair of donor-table columns this
computes Cramér's V (Cramér 1946) and the adjusted mutual information (Vinh et al. 2010),
each 0 for independent columns and 1 when one determines the other. Continuous columns
are cut into quartiles first; donors missing either value are left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import chi2_contingency
from sklearn.metrics import adjusted_mutual_info_score

__all__ = ["CONFOUNDED", "confounding_sentences", "confounding_table", "cramers_v"]

CONFOUNDED = 0.25
"""Cramér's V from which a pair is called confounded in the report (with a chi-square
p-value below :data:`P_VALUE`); about 0.14 is what chance gives 160 donors in a 4 x 4
table."""
P_VALUE = 0.01
_QUANTILES = 4


def cramers_v(a: np.ndarray, b: np.ndarray) -> float:
    """Cramér's V of two label arrays: ``sqrt(chi2 / (n (min(r, c) - 1)))``.

    Parameters
    ----------
    a, b
        ``[n]`` labels (any hashable values), no missing ones.

    Returns
    -------
    float
        In ``[0, 1]``; 0 when either array has a single value.
    """
    table = pd.crosstab(pd.Series(a), pd.Series(b)).to_numpy().astype(np.float64)
    r, c = table.shape
    if min(r, c) < 2:
        return 0.0
    n = table.sum()
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / n
    chi2 = float(((table - expected) ** 2 / expected).sum())
    return float(np.sqrt(chi2 / (n * (min(r, c) - 1))))


def _p_value(a: np.ndarray, b: np.ndarray) -> float | None:
    """The chi-square test's p-value of independence (None for a single value)."""
    table = pd.crosstab(pd.Series(a), pd.Series(b)).to_numpy()
    if min(table.shape) < 2:
        return None
    return float(f"{chi2_contingency(table, correction=False).pvalue:.3g}")


def _labels(values: pd.Series, kind: str) -> pd.Series:
    """Categorical labels of a column: quartiles of a continuous one."""
    if kind == "continuous":
        return pd.qcut(values.astype(np.float64), _QUANTILES, labels=False, duplicates="drop")
    return values.astype(str).where(values.notna())


def confounding_table(donors: pd.DataFrame, relevant: Mapping[str, str],
                      technical: Mapping[str, str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Cramér's V and adjusted mutual information of every (relevant, technical) pair.

    Parameters
    ----------
    donors
        The scored donors' table.
    relevant, technical
        Column -> kind (``categorical``, ``ordinal``, ``continuous``).

    Returns
    -------
    dict
        ``relevant -> technical -> {"cramers_v", "ami", "p_value", "n"}`` (V and AMI
        rounded to 4 digits, the chi-square test's p-value to 3 significant ones; None
        with fewer than 2 donors having both values).
    """
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for rel, rel_kind in relevant.items():
        for tech, tech_kind in technical.items():
            a, b = _labels(donors[rel], rel_kind), _labels(donors[tech], tech_kind)
            both = (a.notna() & b.notna()).to_numpy()
            entry: dict[str, Any] = {"cramers_v": None, "ami": None, "p_value": None,
                                     "n": int(both.sum())}
            if both.sum() >= 2:
                x, y = a[both].astype(str).to_numpy(), b[both].astype(str).to_numpy()
                entry["cramers_v"] = round(cramers_v(x, y), 4)
                entry["ami"] = round(float(adjusted_mutual_info_score(x, y)), 4)
                entry["p_value"] = _p_value(x, y)
            table.setdefault(rel, {})[tech] = entry
    return table


def confounding_sentences(table: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """What the table means, in words: the confounded pairs, or that there are none."""
    pairs = [(rel, tech, e["cramers_v"]) for rel, row in table.items()
             for tech, e in row.items()
             if e["cramers_v"] is not None and e["cramers_v"] >= CONFOUNDED
             and e["p_value"] is not None and e["p_value"] < P_VALUE]
    if not pairs:
        return [f"No relevant covariate is tied to a technical one (no Cramér's V >= "
                f"{CONFOUNDED} with p < {P_VALUE}): batch mixing and information retention "
                "can both be high."]
    named = ", ".join(f"{rel} with {tech} (V = {v:.2f})" for rel, tech, v in pairs)
    return [f"Confounded: {named}. A representation cannot keep these relevant covariates "
            "while mixing those batches: what tells the batches apart also tells the "
            "covariate apart. Any per-batch correction (batch standardisation, centring per "
            "batch) removes part of the biology too, and a high batch mixing there means "
            "lost signal; compare methods on information retention within batches, or "
            "collect donors of every level in every batch."]
