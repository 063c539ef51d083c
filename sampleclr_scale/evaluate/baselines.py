"""Baseline donor representations computed from a bag store, for comparison with SampleCLR.

- Pseudobulk: each donor's mean cell features
  (:func:`~sampleclr_scale.store.pseudobulk.donor_means`).
- Cell-type composition: each donor's fractions of cell types, from the cell table.
- Random vectors: the floor every method should clear.
- GloScope (Wang et al. 2024): the divergences behind the store's ``gloscope`` prior,
  when one was built with all pairs.
- The cell-type-aware baselines of :mod:`~sampleclr_scale.evaluate.celltype_baselines`.

Every baseline is registered in :data:`BASELINES`: a :class:`Baseline` names the methods
it yields and computes their runs from :class:`BaselineInputs`, or says why it cannot
(:class:`UnavailableError`). The evaluation stage scores every registered baseline; a new one
is a function here (or in a module of its own) and one entry in :data:`BASELINES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from sampleclr_scale.errors import InputError
from sampleclr_scale.evaluate.celltype_baselines import celltype_representations
from sampleclr_scale.prior.storage import available_priors, load_prior
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.composition import donor_type_counts


def composition(store: BagStore, column: str = "cell_type") -> np.ndarray:
    """Cell-type fractions of every donor, from the store's cell table.

    Parameters
    ----------
    store : BagStore
        The bag store (with a cell table).
    column : str
        Cell-table column holding the cell type.

    Returns
    -------
    np.ndarray
        ``[n_donors, n_types]`` fractions over the donor's annotated cells (rows sum to
        1; zeros for a donor without annotated cells); columns are the sorted distinct
        types, as :func:`cell_types` returns them.
    """
    if column in store.code_columns:  # the stored codes, read in blocks
        counts = donor_type_counts(store, column)[:, _sorted_codes(store, column)[0]]
        counts = counts.astype(np.float64)
    else:  # an older store: the cell table, whole
        codes, types = cell_types(store, column)
        donor = np.repeat(np.arange(store.n_donors), store.cells_per_donor)
        annotated = codes >= 0
        counts = np.bincount(donor[annotated] * len(types) + codes[annotated],
                             minlength=store.n_donors * len(types))
        counts = counts.reshape(store.n_donors, len(types)).astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def cell_types(store: BagStore, column: str = "cell_type") -> tuple[np.ndarray, list[str]]:
    """Cell-type code of every store row (-1 where missing) and the sorted type names.

    Raises
    ------
    InputError
        If the store has no cell table or the table lacks ``column``.
    """
    if column in store.code_columns:  # the stored codes: no cell table in memory
        sorted_codes, names = _sorted_codes(store, column)
        rank = np.full(len(store.categories(column)), -1, dtype=np.int32)
        rank[sorted_codes] = np.arange(len(sorted_codes), dtype=np.int32)
        codes = np.asarray(store.codes(column)[:])
        return np.where(codes >= 0, rank[np.maximum(codes, 0)], -1), names
    codes, uniques = _table_codes(store, column)
    order = np.argsort(uniques, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return np.where(codes >= 0, rank[codes], -1), uniques[order].tolist()


def _sorted_codes(store: BagStore, column: str) -> tuple[np.ndarray, list[str]]:
    """The codes of ``column``'s categories that the store's rows hold, in the order of
    their names, and those names (the cell table's distinct values, sorted)."""
    names = np.array(store.categories(column), dtype=object)
    held = np.flatnonzero(store.category_counts(column) > 0)
    held = held[np.argsort(names[held], kind="stable")]
    return held, names[held].tolist()


def _table_codes(store: BagStore, column: str) -> tuple[np.ndarray, np.ndarray]:
    """Codes of ``column`` from the cell table, and their names (in code order)."""
    try:
        values = store.cell_table([column])[column]
    except pa.ArrowInvalid:
        raise InputError(f"the cell table of bag store {store.location} has no column {column!r}",
                         f"re-ingest with --cell-columns {column}") from None
    codes, uniques = pd.factorize(values)  # fast on the categorical column
    return codes, np.array([str(u) for u in uniques], dtype=object)


def random_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """Standard normal ``[n, dim]`` vectors from ``seed``: the chance-level representation."""
    return np.random.default_rng(seed).standard_normal((n, dim))


def gloscope_distances(store_path: str) -> np.ndarray | None:
    """GloScope divergences between all donors, from the store's ``gloscope`` prior.

    The prior stores similarities ``S = exp(-D / scale)`` (Wang et al. 2024, as SampleCLR
    uses them); this inverts them to ``D = -scale * log(S)``. Pairs whose similarity
    underflowed to 0 get twice the largest finite divergence.

    Parameters
    ----------
    store_path : str
        The bag store.

    Returns
    -------
    np.ndarray or None
        ``[n_donors, n_donors]`` float64 divergences; None when no gloscope prior is
        stored or the prior holds only nearest pairs (sparse mode).
    """
    if "gloscope" not in available_priors(store_path):
        return None
    prior = load_prior(store_path, "gloscope")
    if prior.params.get("mode", "dense") != "dense":
        return None
    similarity = prior.to_dense().astype(np.float64)
    with np.errstate(divide="ignore"):
        D = -float(prior.params["scale"]) * np.log(similarity)
    finite = np.isfinite(D)
    D[~finite] = 2.0 * D[finite].max() if finite.any() else 1.0
    D = np.maximum(D, 0.0)
    np.fill_diagonal(D, 0.0)
    return D


# --- the registry -------------------------------------------------------------------------


class UnavailableError(Exception):
    """A baseline that the store cannot give (the reason is shown in the report)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class BaselineInputs:
    """What every baseline may use, computed once per evaluation."""

    store: BagStore
    """The bag store the embeddings were computed from."""
    selected: np.ndarray
    """Store positions of the scored donors (every run is over these, in this order)."""
    means: np.ndarray
    """``[n_donors, d]`` each donor's mean features over the whole store (the
    pseudobulk)."""
    dim: int
    """Width of the evaluated embeddings (the random vectors' width)."""
    seeds: int
    """How many random baselines (``EvaluateConfig.seeds``)."""
    cell_type_column: str = "cell_type"
    """The cell-level column of the cell-type-aware baselines."""


@dataclass(frozen=True)
class BaselineRun:
    """One baseline representation of the scored donors: vectors or distances."""

    method: str
    name: str
    Z: np.ndarray | None = None
    """``[n_selected, D]`` vectors (cosine distances between them are scored)."""
    D: np.ndarray | None = None
    """``[n_selected, n_selected]`` distances, for a baseline without vectors."""


@dataclass(frozen=True)
class Baseline:
    """A registered baseline: the methods it yields and how to compute their runs."""

    methods: tuple[str, ...]
    compute: Callable[[BaselineInputs], list[BaselineRun]]


def _pseudobulk(inputs: BaselineInputs) -> list[BaselineRun]:
    return [BaselineRun("pseudobulk", "pseudobulk", inputs.means[inputs.selected])]


def _composition(inputs: BaselineInputs) -> list[BaselineRun]:
    try:
        Z = composition(inputs.store, inputs.cell_type_column)
    except InputError as err:
        raise UnavailableError(err.problem) from None
    return [BaselineRun("composition", "composition", Z[inputs.selected])]


def _celltype(inputs: BaselineInputs) -> list[BaselineRun]:
    column = inputs.cell_type_column
    if column not in inputs.store.code_columns:
        raise UnavailableError(f"the store has no codes/{column} (ingest with --cell-columns "
                          f"{column})")
    reps = celltype_representations(inputs.store, column, inputs.means)
    return [BaselineRun(name, name, Z[inputs.selected]) for name, Z in reps.items()]


def _gloscope(inputs: BaselineInputs) -> list[BaselineRun]:
    D = gloscope_distances(inputs.store.location.uri)
    if D is None:
        raise UnavailableError("no dense gloscope prior in the store (`sampleclr-scale prior`)")
    return [BaselineRun("gloscope", "gloscope", D=D[np.ix_(inputs.selected, inputs.selected)])]


def _random(inputs: BaselineInputs) -> list[BaselineRun]:
    return [BaselineRun("random", f"random_seed{seed}",
                        random_vectors(len(inputs.selected), inputs.dim, seed))
            for seed in range(inputs.seeds)]


BASELINES: dict[str, Baseline] = {
    "pseudobulk": Baseline(("pseudobulk",), _pseudobulk),
    "composition": Baseline(("composition",), _composition),
    "celltype": Baseline(("composition_clr", "celltype_pseudobulk", "composition_clr_centred",
                          "celltype_pseudobulk_centred", "celltype_standardized",
                          "pseudobulk_centred"), _celltype),
    "gloscope": Baseline(("gloscope",), _gloscope),
    "random": Baseline(("random",), _random),
}
"""Every baseline the evaluation scores, by name (the name a skipped one is reported
under), in the report's order."""
BASELINE_METHODS: tuple[str, ...] = tuple(m for b in BASELINES.values() for m in b.methods)
"""The method names baselines take (an embedding may not be named like one)."""
