"""Building a donor prior from a bag store (the math is in
:mod:`sampleclr_scale.prior.similarity`).

- ``pseudobulk``: cosine similarity of the donors' mean cell features, the means read
  from the store in blocks of rows.
- ``gloscope``: GloScope's symmetrised kNN KL divergence (Wang et al. 2024) between the
  donors' cells on ``n_pcs`` principal components, as similarity ``exp(-D / scale)``
  (SampleCLR's prior graph). Each donor contributes a window of ``cells_per_donor`` of its
  rows: the store keeps a donor's rows in random order, so any window is a uniform random
  subsample, read in one range. The pairs run as Ray tasks.

All pairs are computed up to ``dense_limit`` donors. Beyond that each donor is paired
only with its ``neighbours`` most similar donors by pseudobulk cosine (for GloScope, of
the subsampled cells' means), both directions united into a sparse symmetric graph, so
the cost grows as donors x neighbours, not donors squared. Pairs not computed have
similarity 0 in :meth:`PriorGraph.to_dense`. (Ranking all donors by cosine is still one
blocked matrix product, quadratic but cheap.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from sampleclr_scale._linalg import unit_rows
from sampleclr_scale.cluster import ensure_ray
from sampleclr_scale.console import progress
from sampleclr_scale.errors import InputError
from sampleclr_scale.prior.config import PriorConfig
from sampleclr_scale.prior.graph import PriorGraph, symmetric_graph
from sampleclr_scale.prior.similarity import (
    kth_neighbour_distances,
    nearest_donors,
    similarity_from_divergence,
    symmetric_kl,
)
from sampleclr_scale.prior.storage import available_priors, save_prior
from sampleclr_scale.storage import Location, check_writable
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.pseudobulk import BLOCK_ROWS, donor_means

_MAX_TASKS = 256  # Ray tasks per stage, at most
_MIN_ITEMS_PER_TASK = 32  # donors or pairs per Ray task, at least

Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]  # a, b (a < b) and their similarities


def build_prior(store_path: str, config: PriorConfig) -> PriorGraph:
    """Build a donor prior from a bag store (GloScope pairs run as Ray tasks).

    Parameters
    ----------
    store_path : str
        Bag store.
    config : PriorConfig
        Which prior, and how.

    Returns
    -------
    PriorGraph
        Float32 similarities, diagonal 1; ``params`` records the settings used and
        ``timings`` the seconds per stage.

    Raises
    ------
    InputError
        For a GloScope ``k`` not below the smallest subsample.
    """
    start = time.perf_counter()
    store = BagStore(store_path)
    dense = store.n_donors <= config.dense_limit
    params: dict[str, Any] = {"mode": "dense" if dense else "sparse",
                              "neighbours": None if dense else config.neighbours,
                              "dense_limit": config.dense_limit}
    timings: dict[str, float] = {}
    params["correct"] = correction(store, config)
    a, b, values = PRIOR_BUILDERS[config.kind](store, config, dense, params, timings)
    params["pairs"] = len(a)
    timings["total"] = time.perf_counter() - start
    return symmetric_graph(store.n_donors, a, b, values, config.kind, params, timings)


def ensure_prior(store_path: str, config: PriorConfig) -> bool:
    """Build ``config``'s prior into the store and save it, unless the store has a prior
    of that kind (kept as it is, whatever its settings); whether it was built.

    What the pipeline's prior stage does, and what ``train`` does for a loss whose prior
    the store lacks (the default X-CLR loss uses the GloScope prior).
    """
    if config.kind in available_priors(store_path):
        return False
    build_and_save_prior(store_path, config)
    return True


def build_and_save_prior(store_path: str, config: PriorConfig) -> tuple[PriorGraph, Location]:
    """:func:`build_prior`, then :func:`~sampleclr_scale.prior.storage.save_prior`; the
    prior and where it was saved. The store is checked for writing first
    (:func:`~sampleclr_scale.storage.check_writable`), so a store that cannot be written
    (read-only, someone else's) is refused before the build, not after it.

    Raises
    ------
    OSError
        For a store that cannot be written.
    """
    check_writable(Location(store_path))
    prior = build_prior(store_path, config)
    return prior, save_prior(store_path, prior)


def correction(store: BagStore, config: PriorConfig) -> str:
    """How the prior's cells are corrected (``PriorConfig.correct``, ``auto`` resolved):
    ``"batch_cell_type"`` or ``"none"``.

    Raises
    ------
    InputError
        For ``batch_cell_type`` on a store without those statistics.
    """
    has_maps = store.batch_type_maps is not None
    if config.correct == "batch_cell_type" and not has_maps:
        raise InputError(f"the prior's correct: batch_cell_type needs the per-(batch, cell "
                         f"type) statistics, which {store.location} does not have",
                         "re-ingest with --batch-key COL from a source with a cell_type "
                         "column, or build the prior with correct: none")
    return "batch_cell_type" if config.correct != "none" and has_maps else "none"


def _rows(store: BagStore, params: dict[str, Any]) -> Callable[[int, int], np.ndarray]:
    """The prior's reader of feature rows ``start..stop - 1``, corrected or as stored."""
    if params["correct"] == "batch_cell_type":
        return store.type_corrected_rows
    return lambda start, stop: store.features[start:stop]


def _pseudobulk(store: BagStore, config: PriorConfig, dense: bool, params: dict[str, Any],
                timings: dict[str, float]) -> Pairs:
    """Cosine similarities of the donors' mean features."""
    start = time.perf_counter()
    unit = unit_rows(donor_means(store, read=_rows(store, params)))
    timings["read"] = time.perf_counter() - start
    a, b = _all_pairs(store.n_donors) if dense else _neighbour_pairs(unit, config.neighbours)
    return a, b, (unit[a] * unit[b]).sum(axis=1)


def _gloscope(store: BagStore, config: PriorConfig, dense: bool, params: dict[str, Any],
              timings: dict[str, float]) -> Pairs:
    """GloScope similarities of the donors' subsamples on principal components."""
    start = time.perf_counter()
    smallest = min(config.cells_per_donor, int(store.cells_per_donor.min()))
    if config.k >= smallest:
        raise InputError(
            f"GloScope's k = {config.k} neighbours needs more cells than the smallest "
            f"subsample, {smallest} (donors' cells, at most cells_per_donor = "
            f"{config.cells_per_donor})",
            f"use k below {smallest}, or a larger cells_per_donor, or re-ingest "
            f"with a larger --min-cells",
        )
    cells, offsets = _read_subsamples(store, config.cells_per_donor, config.seed,
                                      _rows(store, params))
    timings["read"] = time.perf_counter() - start
    a, b = _all_pairs(store.n_donors) if dense else _neighbour_pairs(
        _segment_means(cells, offsets), config.neighbours)
    mark = time.perf_counter()
    projected = _principal_components(cells, min(config.n_pcs, store.dim))
    del cells  # the pairs need only the projection: memory is cells' or pairs', not both
    timings["pca"] = time.perf_counter() - mark
    mark = time.perf_counter()
    values = similarity_from_divergence(
        _pair_divergences(projected, offsets, a, b, config.k), config.scale)
    timings["pairs"] = time.perf_counter() - mark
    params.update(k=config.k, cells_per_donor=config.cells_per_donor,
                  n_pcs=projected.shape[1], scale=config.scale, seed=config.seed,
                  smallest_subsample=smallest,
                  estimator="symmetrised kNN KL (Wang, Kulkarni & Verdu 2009), "
                            "clipped at 0, similarity exp(-D / scale)")
    return a, b, values


def _read_subsamples(store: BagStore, cells_per_donor: int, seed: int,
                     read: Callable[[int, int], np.ndarray],
                     donors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each donor's window of rows (see :attr:`PriorConfig.seed`), read by ``read(start,
    stop)``, stacked; of ``donors`` (store positions) or of every donor.

    Returns
    -------
    cells, offsets
        Float32 ``[sum of window sizes, d]`` and int64 ``[len(donors) + 1]``: the ``i``-th
        donor's cells are ``cells[offsets[i]:offsets[i + 1]]``.
    """
    donors = np.arange(store.n_donors) if donors is None else np.asarray(donors)
    sizes = np.minimum(store.cells_per_donor[donors], cells_per_donor)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    cells = np.empty((int(offsets[-1]), store.dim), dtype=np.float32)
    for i, donor in enumerate(donors):
        first, n_cells = int(store.donor_ptr[donor]), int(store.cells_per_donor[donor])
        size = int(sizes[i])
        start = seed * cells_per_donor % n_cells if size < n_cells else 0
        head = min(size, n_cells - start)
        out = cells[offsets[i] : offsets[i + 1]]
        out[:head] = read(first + start, first + start + head)
        if head < size:  # the window wraps around to the donor's first rows
            out[head:] = read(first, first + size - head)
    return cells, offsets


def _segment_means(cells: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Float64 mean of each donor's subsample."""
    sums = np.add.reduceat(cells, offsets[:-1], axis=0, dtype=np.float64)
    return sums / np.diff(offsets)[:, None]


def _principal_components(cells: np.ndarray, n_pcs: int) -> np.ndarray:
    """Float64 scores of ``cells`` on their top ``n_pcs`` principal components."""
    mean = cells.mean(axis=0, dtype=np.float64)
    cov = np.zeros((cells.shape[1], cells.shape[1]))
    for lo in range(0, len(cells), BLOCK_ROWS):
        centred = cells[lo : lo + BLOCK_ROWS] - mean
        cov += centred.T @ centred
    _, vectors = np.linalg.eigh(cov)  # ascending eigenvalues
    top = vectors[:, ::-1][:, :n_pcs]
    scores = np.empty((len(cells), n_pcs))
    for lo in range(0, len(cells), BLOCK_ROWS):
        scores[lo : lo + BLOCK_ROWS] = (cells[lo : lo + BLOCK_ROWS] - mean) @ top
    return scores


PairsBuilder = Callable[[BagStore, PriorConfig, bool, dict[str, Any], dict[str, float]], Pairs]
"""A prior's pairs ``(store, config, dense, params, timings)``: it records its settings in
``params`` and its seconds per stage in ``timings``."""
PRIOR_BUILDERS: dict[str, PairsBuilder] = {"pseudobulk": _pseudobulk, "gloscope": _gloscope}
"""The builder of each prior kind (every one of :data:`~sampleclr_scale._types.PRIOR_KINDS`):
a new prior is its math (pure numpy, e.g. in :mod:`~sampleclr_scale.prior.similarity`), its
name in ``PriorKind`` and its builder here."""


def _all_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.triu_indices(n, k=1)
    return a.astype(np.int64), b.astype(np.int64)


def neighbour_pairs(store: BagStore, prior: PriorGraph, donors: np.ndarray,
                    n_neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """Unordered pairs ``a < b`` (positions in ``donors``) of each of ``donors`` with its
    ``n_neighbours`` nearest among them, by the cosine of the means the prior ranks donors
    by beyond ``dense_limit`` (GloScope: of each donor's window of cells; pseudobulk: of
    all its cells), read as the prior read them (corrected or as stored)."""
    params = {"correct": "none", **prior.params}
    donors = np.asarray(donors, dtype=np.int64)
    if prior.kind == "gloscope":
        cells, offsets = _read_subsamples(store, int(params["cells_per_donor"]),
                                          int(params["seed"]), _rows(store, params), donors)
        means = _segment_means(cells, offsets)
    else:
        means = donor_means(store, read=_rows(store, params))[donors]
    return _neighbour_pairs(means, n_neighbours)


def _neighbour_pairs(means: np.ndarray, n_neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """Unordered pairs ``a < b`` of each donor with its nearest donors, either direction."""
    n = len(means)
    near = nearest_donors(means, n_neighbours)
    i = np.repeat(np.arange(n, dtype=np.int64), near.shape[1])
    j = near.ravel()
    keys = np.unique(np.minimum(i, j) * n + np.maximum(i, j))
    return keys // n, keys % n


def _pair_divergences(projected: np.ndarray, offsets: np.ndarray, a: np.ndarray,
                      b: np.ndarray, k: int) -> np.ndarray:
    """Symmetrised KL divergence of each pair ``(a[p], b[p])``, computed in Ray tasks.

    The projected cells and offsets are put in the object store once; a first stage
    computes every donor's within-donor k-th neighbour distances once, a second stage
    the pairs, in at most ``_MAX_TASKS`` tasks each.
    """
    if not len(a):
        return np.zeros(0)
    ensure_ray()
    cells_ref, offsets_ref = ray.put(projected), ray.put(offsets)
    chunks = _batches(np.arange(len(offsets) - 1))
    rho = _gather([_rho_task.remote(cells_ref, offsets_ref, int(c[0]), int(c[-1]) + 1, k)
                   for c in chunks], [len(c) for c in chunks], "GloScope kNN radii", "donors")
    rho_ref = ray.put(rho)
    batches = _batches(np.arange(len(a)))
    return _gather([_pairs_task.remote(cells_ref, offsets_ref, rho_ref, a[p], b[p], k)
                    for p in batches], [len(p) for p in batches], "GloScope pairs", "pairs")


def _gather(refs: list[ray.ObjectRef], sizes: list[int], desc: str, unit: str) -> np.ndarray:
    """The tasks' arrays concatenated in order, a progress bar advancing by ``sizes[i]``
    as task ``i`` finishes."""
    index = {ref: i for i, ref in enumerate(refs)}
    with progress(sum(sizes), desc, unit) as bar:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(sizes[index[done[0]]])
    return np.concatenate(ray.get(refs))


def _batches(items: np.ndarray) -> list[np.ndarray]:
    n_tasks = min(_MAX_TASKS, max(1, len(items) // _MIN_ITEMS_PER_TASK))
    return [batch for batch in np.array_split(items, n_tasks) if len(batch)]


@ray.remote
def _rho_task(cells: np.ndarray, offsets: np.ndarray, first: int, stop: int,
              k: int) -> np.ndarray:
    """Within-donor k-th neighbour distances of donors ``first:stop``, concatenated."""
    return np.concatenate([
        kth_neighbour_distances(cells[offsets[d] : offsets[d + 1]], k) for d in range(first, stop)
    ])


@ray.remote
def _pairs_task(cells: np.ndarray, offsets: np.ndarray, rho: np.ndarray, a: np.ndarray,
                b: np.ndarray, k: int) -> np.ndarray:
    """Symmetrised KL divergences of the pairs ``(a[p], b[p])``."""
    out = np.empty(len(a))
    for p, (i, j) in enumerate(zip(a, b, strict=True)):
        xi, xj = slice(offsets[i], offsets[i + 1]), slice(offsets[j], offsets[j + 1])
        out[p] = symmetric_kl(cells[xi], cells[xj], k, rho_x=rho[xi], rho_y=rho[xj])
    return out
