"""A donor prior as a symmetric similarity graph in COO form."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch



@dataclass
class PriorGraph:
    """A symmetric donor x donor similarity graph in COO form.

    Attributes
    ----------
    n_donors : int
        Donors of the bag store, in store order.
    rows, cols : np.ndarray
        Int64 coordinates of the stored entries: both triangles and the diagonal.
    values : np.ndarray
        Float32 similarities of the entries (1 on the diagonal).
    kind : str
        ``pseudobulk`` or ``gloscope``.
    params : dict
        How it was built (JSON-serialisable).
    timings : dict
        Seconds spent per stage and ``total``.
    """

    n_donors: int
    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dense(self) -> np.ndarray:
        """Float32 ``[n_donors, n_donors]`` similarities; pairs not stored are 0."""
        dense = np.zeros((self.n_donors, self.n_donors), dtype=np.float32)
        dense[self.rows, self.cols] = self.values
        return dense

    def values_at(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Float64 similarities of the pairs ``(a[p], b[p])`` of donors; NaN where the
        graph does not store the pair."""
        keys = self.rows * self.n_donors + self.cols
        order = np.argsort(keys, kind="stable")
        query = np.asarray(a, dtype=np.int64) * self.n_donors + np.asarray(b, dtype=np.int64)
        at = np.minimum(np.searchsorted(keys, query, sorter=order), len(keys) - 1)
        found = keys[order[at]] == query
        return np.where(found, self.values[order[at]].astype(np.float64), np.nan)

    def to_torch_dense(self) -> torch.Tensor:
        """:meth:`to_dense` as a float32 torch tensor."""
        import torch

        return torch.from_numpy(self.to_dense())


def symmetric_graph(n: int, a: np.ndarray, b: np.ndarray, values: np.ndarray, kind: str,
                    params: dict[str, Any], timings: dict[str, float]) -> PriorGraph:
    """COO graph of both triangles of the pair values plus a unit diagonal, row-major.

    Parameters
    ----------
    n
        Donors.
    a, b
        The computed pairs ``a[p] < b[p]``.
    values
        Their similarities.
    kind, params, timings
        As in :class:`PriorGraph`.
    """
    diagonal = np.arange(n, dtype=np.int64)
    rows = np.concatenate([a, b, diagonal])
    cols = np.concatenate([b, a, diagonal])
    vals = np.concatenate([values, values, np.ones(n)]).astype(np.float32)
    order = np.lexsort((cols, rows))
    return PriorGraph(n_donors=n, rows=rows[order], cols=cols[order], values=vals[order],
                      kind=kind, params=params, timings=timings)


def prior_summary(prior: PriorGraph) -> dict[str, Any]:
    """Figures about a prior for the command line to print.

    Returns
    -------
    dict
        ``kind``, ``mode``, ``n_donors``, ``edges`` (donor pairs with a similarity),
        ``density`` (their share of all pairs), mean, min and max off-diagonal
        similarity and ``seconds`` (build time).
    """
    off = prior.rows != prior.cols
    values = prior.values[off].astype(np.float64)
    all_pairs = prior.n_donors * (prior.n_donors - 1) // 2
    edges = int(off.sum()) // 2
    return {
        "kind": prior.kind,
        "mode": prior.params.get("mode"),
        "n_donors": prior.n_donors,
        "edges": edges,
        "density": round(edges / all_pairs, 6) if all_pairs else 0.0,
        "mean_similarity": float(values.mean()) if len(values) else math.nan,
        "min_similarity": float(values.min()) if len(values) else math.nan,
        "max_similarity": float(values.max()) if len(values) else math.nan,
        "seconds": round(prior.timings.get("total", math.nan), 3),
    }
