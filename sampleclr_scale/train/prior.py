"""Donor x donor prior similarities for X-CLR, built from a bag store and stored in it.

Two kinds (the math is in :mod:`sampleclr_scale.losses.priors`):

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

Stored layout, one Zarr group per kind inside the bag store::

    STORE/priors/<kind>/        attributes: kind, params, n_donors, created, timings
      rows, cols                int64 [n_entries], COO coordinates (both triangles and
                                the diagonal)
      values                    float32 [n_entries], similarities

A prior is written into a temporary sibling directory and renamed into place, so readers
see the old prior or the complete new one, never a partial one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import ray
import torch
import zarr

from sampleclr_scale import __version__
from sampleclr_scale.data.store import BagStore
from sampleclr_scale.errors import InputError
from sampleclr_scale.losses.priors import (
    kth_neighbour_distances,
    nearest_donors,
    pseudobulk_similarity,
    similarity_from_divergence,
    symmetric_kl,
)
from sampleclr_scale.storage import Location, staged_output
from sampleclr_scale.train.cluster import ensure_ray

KINDS = ("pseudobulk", "gloscope")
PRIORS_GROUP = "priors"
DEFAULT_NEIGHBOURS = 30
_READ_BLOCK_ROWS = 1 << 18  # rows per block when averaging a whole store
_MAX_TASKS = 256  # Ray tasks per stage, at most
_MIN_ITEMS_PER_TASK = 32  # donors or pairs per Ray task, at least


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

    def to_torch_dense(self) -> torch.Tensor:
        """:meth:`to_dense` as a float32 torch tensor."""
        return torch.from_numpy(self.to_dense())


def build_prior(
    store_path: str,
    kind: Literal["pseudobulk", "gloscope"],
    *,
    k: int = 25,
    cells_per_donor: int = 300,
    n_pcs: int = 10,
    scale: float = 5.0,
    neighbours: int | None = None,
    dense_limit: int = 500,
    seed: int = 0,
) -> PriorGraph:
    """Build a donor prior from a bag store (GloScope pairs run as Ray tasks).

    Parameters
    ----------
    store_path : str
        Bag store.
    kind : {"pseudobulk", "gloscope"}
        Cosine of mean features, or GloScope's kNN symmetrised KL as ``exp(-D / scale)``.
    k : int
        GloScope: neighbour rank of the KL estimator; must be below the smallest
        subsample.
    cells_per_donor : int
        GloScope: cells per donor (all of a donor's cells if it has fewer).
    n_pcs : int
        GloScope: principal components, fitted on the pooled subsample (at most the
        feature width).
    scale : float
        GloScope: divergence scale of the similarity.
    neighbours : int, optional
        Above ``dense_limit`` donors: nearest donors by pseudobulk cosine paired with
        each donor (default 30). GloScope ranks donors by the means of their subsampled
        cells, so no extra pass over the store is needed.
    dense_limit : int
        Largest number of donors for which all pairs are computed.
    seed : int
        GloScope: which window of each donor's rows is used. Seed ``s`` reads the
        ``cells_per_donor`` rows starting at row ``s * cells_per_donor`` of the donor
        (cyclically), so seed 0 reads the first rows and different seeds read disjoint
        subsamples while a donor has enough cells.

    Returns
    -------
    PriorGraph
        Float32 similarities, diagonal 1.
    """
    _check_build_args(kind, k, cells_per_donor, n_pcs, scale, neighbours, dense_limit, seed)
    start = time.perf_counter()
    store = BagStore(store_path)
    n = store.n_donors
    n_neighbours = DEFAULT_NEIGHBOURS if neighbours is None else neighbours
    dense = n <= dense_limit
    params: dict[str, Any] = {"mode": "dense" if dense else "sparse",
                              "neighbours": None if dense else n_neighbours,
                              "dense_limit": dense_limit}
    timings: dict[str, float] = {}
    if kind == "pseudobulk":
        means = _donor_means(store)
        timings["read"] = time.perf_counter() - start
        if dense:
            a, b = _all_pairs(n)
            values = pseudobulk_similarity(means)[a, b]
        else:
            a, b = _neighbour_pairs(means, n_neighbours)
            values = _pair_cosines(means, a, b)
    else:
        smallest = min(cells_per_donor, int(store.cells_per_donor.min()))
        if k >= smallest:
            raise InputError(
                f"GloScope's k = {k} neighbours needs more cells than the smallest "
                f"subsample, {smallest} (donors' cells, at most cells_per_donor = "
                f"{cells_per_donor})",
                f"use k below {smallest}, or a larger cells_per_donor, or re-ingest "
                f"with a larger --min-cells",
            )
        cells, offsets = _read_subsamples(store, cells_per_donor, seed)
        timings["read"] = time.perf_counter() - start
        a, b = _all_pairs(n) if dense else _neighbour_pairs(
            _segment_means(cells, offsets), n_neighbours)
        mark = time.perf_counter()
        projected = _principal_components(cells, min(n_pcs, store.dim))
        del cells  # the pairs need only the projection: memory is cells' or pairs', not both
        timings["pca"] = time.perf_counter() - mark
        mark = time.perf_counter()
        values = similarity_from_divergence(_pair_divergences(projected, offsets, a, b, k),
                                            scale)
        timings["pairs"] = time.perf_counter() - mark
        params.update(k=k, cells_per_donor=cells_per_donor, n_pcs=projected.shape[1],
                      scale=scale, seed=seed, smallest_subsample=smallest,
                      estimator="symmetrised kNN KL (Wang, Kulkarni & Verdu 2009), "
                                "clipped at 0, similarity exp(-D / scale)")
    params["pairs"] = len(a)
    timings["total"] = time.perf_counter() - start
    return _symmetric_graph(n, a, b, values, kind, params, timings)


def save_prior(store_path: str, prior: PriorGraph) -> Location:
    """Store ``prior`` in the bag store under ``priors/<kind>/``, replacing one atomically.

    Parameters
    ----------
    store_path : str
        Bag store the prior was built from.
    prior : PriorGraph
        The prior.

    Returns
    -------
    Location
        The prior's Zarr group.
    """
    store = BagStore(store_path)
    _check_kind(prior.kind)
    if prior.n_donors != store.n_donors:
        raise InputError(
            f"a prior of {prior.n_donors} donors does not fit bag store {store.location} "
            f"of {store.n_donors} donors",
            f"build it from this store: `sampleclr-scale prior --store {store.location} "
            f"--kind {prior.kind}`",
        )
    priors_dir = store.location / PRIORS_GROUP
    priors_dir.open_group("a")  # a Zarr group, so the store lists it
    final = priors_dir / prior.kind
    with staged_output(final, overwrite=True) as staging:
        group = zarr.open_group(str(staging), mode="w-")
        group.create_array("rows", data=np.asarray(prior.rows, dtype=np.int64))
        group.create_array("cols", data=np.asarray(prior.cols, dtype=np.int64))
        group.create_array("values", data=np.asarray(prior.values, dtype=np.float32))
        group.attrs.update({
            "kind": prior.kind,
            "params": prior.params,
            "n_donors": prior.n_donors,
            "timings": prior.timings,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "created_by": f"sampleclr-scale {__version__}",
        })
    return final


def load_prior(store_path: str, kind: str) -> PriorGraph:
    """Read the ``kind`` prior stored in a bag store.

    Parameters
    ----------
    store_path : str
        Bag store.
    kind : str
        ``pseudobulk`` or ``gloscope``.

    Returns
    -------
    PriorGraph
        The stored prior.
    """
    store = BagStore(store_path)
    _check_kind(kind)
    location = store.location / PRIORS_GROUP / kind
    rebuild = f"`sampleclr-scale prior --store {store.location} --kind {kind}`"
    if not location.is_zarr_group():
        raise InputError(f"bag store {store.location} has no {kind} prior",
                         f"build it with {rebuild}")
    group = location.open_group("r")
    attrs = dict(group.attrs)
    if attrs["n_donors"] != store.n_donors:
        raise InputError(
            f"the {kind} prior in {store.location} has {attrs['n_donors']} donors, the store "
            f"{store.n_donors} (the store was rebuilt after the prior)",
            f"rebuild the prior with {rebuild}",
        )
    return PriorGraph(n_donors=int(attrs["n_donors"]), rows=group["rows"][:],
                      cols=group["cols"][:], values=group["values"][:], kind=attrs["kind"],
                      params=dict(attrs["params"]), timings=dict(attrs["timings"]))


def available_priors(store_path: str) -> list[str]:
    """Kinds of the priors stored in a bag store, sorted."""
    priors_dir = BagStore(store_path).location / PRIORS_GROUP
    return [kind for kind in sorted(KINDS) if (priors_dir / kind).is_zarr_group()]


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


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InputError(f"unknown prior kind {kind!r}", f"use one of {', '.join(KINDS)}")


def _check_build_args(kind: str, k: int, cells_per_donor: int, n_pcs: int, scale: float,
                      neighbours: int | None, dense_limit: int, seed: int) -> None:
    _check_kind(kind)
    rules = (
        ("k", k, k >= 1, "at least 1"),
        ("cells_per_donor", cells_per_donor, cells_per_donor >= 2, "at least 2"),
        ("n_pcs", n_pcs, n_pcs >= 1, "at least 1"),
        ("scale", scale, scale > 0, "positive"),
        ("neighbours", neighbours, neighbours is None or neighbours >= 1, "at least 1"),
        ("dense_limit", dense_limit, dense_limit >= 0, "at least 0"),
        ("seed", seed, seed >= 0, "at least 0"),
    )
    for name, value, ok, rule in rules:
        if not ok:
            raise InputError(f"prior {name} = {value!r} is invalid", f"make {name} {rule}")


def _donor_means(store: BagStore) -> np.ndarray:
    """Float64 ``[n_donors, d]`` mean features, reading blocks of ``_READ_BLOCK_ROWS`` rows."""
    ptr = store.donor_ptr
    sums = np.zeros((store.n_donors, store.dim))
    for lo in range(0, store.n_cells, _READ_BLOCK_ROWS):
        hi = min(lo + _READ_BLOCK_ROWS, store.n_cells)
        block = np.asarray(store.features[lo:hi], dtype=np.float64)
        first = int(np.searchsorted(ptr, lo, side="right")) - 1
        last = int(np.searchsorted(ptr, hi - 1, side="right")) - 1
        donors = np.arange(first, last + 1)
        donors = donors[ptr[donors + 1] > ptr[donors]]  # reduceat needs non-empty segments
        sums[donors] += np.add.reduceat(block, np.maximum(ptr[donors], lo) - lo, axis=0)
    return sums / np.maximum(store.cells_per_donor, 1)[:, None]


def _read_subsamples(store: BagStore, cells_per_donor: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each donor's window of rows (see :func:`build_prior`'s ``seed``), stacked.

    Returns
    -------
    cells, offsets
        Float32 ``[sum of window sizes, d]`` and int64 ``[n_donors + 1]``: donor ``i``'s
        cells are ``cells[offsets[i]:offsets[i + 1]]``.
    """
    sizes = np.minimum(store.cells_per_donor, cells_per_donor)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    cells = np.empty((int(offsets[-1]), store.dim), dtype=np.float32)
    for donor in range(store.n_donors):
        first, n_cells = int(store.donor_ptr[donor]), int(store.cells_per_donor[donor])
        size = int(sizes[donor])
        start = seed * cells_per_donor % n_cells if size < n_cells else 0
        head = min(size, n_cells - start)
        out = cells[offsets[donor] : offsets[donor + 1]]
        out[:head] = store.features[first + start : first + start + head]
        if head < size:  # the window wraps around to the donor's first rows
            out[head:] = store.features[first : first + size - head]
    return cells, offsets


def _segment_means(cells: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Float64 mean of each donor's subsample."""
    sums = np.add.reduceat(cells, offsets[:-1], axis=0, dtype=np.float64)
    return sums / np.diff(offsets)[:, None]


def _principal_components(cells: np.ndarray, n_pcs: int) -> np.ndarray:
    """Float64 scores of ``cells`` on their top ``n_pcs`` principal components."""
    mean = cells.mean(axis=0, dtype=np.float64)
    cov = np.zeros((cells.shape[1], cells.shape[1]))
    for lo in range(0, len(cells), _READ_BLOCK_ROWS):
        centred = cells[lo : lo + _READ_BLOCK_ROWS] - mean
        cov += centred.T @ centred
    _, vectors = np.linalg.eigh(cov)  # ascending eigenvalues
    top = vectors[:, ::-1][:, :n_pcs]
    scores = np.empty((len(cells), n_pcs))
    for lo in range(0, len(cells), _READ_BLOCK_ROWS):
        scores[lo : lo + _READ_BLOCK_ROWS] = (cells[lo : lo + _READ_BLOCK_ROWS] - mean) @ top
    return scores


def _all_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.triu_indices(n, k=1)
    return a.astype(np.int64), b.astype(np.int64)


def _neighbour_pairs(means: np.ndarray, n_neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """Unordered pairs ``a < b`` of each donor with its nearest donors, either direction."""
    n = len(means)
    near = nearest_donors(means, n_neighbours)
    i = np.repeat(np.arange(n, dtype=np.int64), near.shape[1])
    j = near.ravel()
    keys = np.unique(np.minimum(i, j) * n + np.maximum(i, j))
    return keys // n, keys % n


def _pair_cosines(means: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(means, axis=1)
    norms[norms == 0] = np.inf  # a zero mean has cosine 0 with every donor
    return (means[a] * means[b]).sum(axis=1) / (norms[a] * norms[b])


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
    donors = np.arange(len(offsets) - 1)
    rho = np.concatenate(ray.get([
        _rho_task.remote(cells_ref, offsets_ref, int(chunk[0]), int(chunk[-1]) + 1, k)
        for chunk in _batches(donors)
    ]))
    rho_ref = ray.put(rho)
    return np.concatenate(ray.get([
        _pairs_task.remote(cells_ref, offsets_ref, rho_ref, a[batch], b[batch], k)
        for batch in _batches(np.arange(len(a)))
    ]))


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


def _symmetric_graph(n: int, a: np.ndarray, b: np.ndarray, values: np.ndarray, kind: str,
                     params: dict[str, Any], timings: dict[str, float]) -> PriorGraph:
    """COO graph of both triangles of the pair values plus a unit diagonal, row-major."""
    diagonal = np.arange(n, dtype=np.int64)
    rows = np.concatenate([a, b, diagonal])
    cols = np.concatenate([b, a, diagonal])
    vals = np.concatenate([values, values, np.ones(n)]).astype(np.float32)
    order = np.lexsort((cols, rows))
    return PriorGraph(n_donors=n, rows=rows[order], cols=cols[order], values=vals[order],
                      kind=kind, params=params, timings=timings)
