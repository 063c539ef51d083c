"""Loader benchmark: two-view bag throughput of a bag store, against an in-memory gather of
the same rows and against naive SOMA point reads.

Each setting (views balanced over cell types or uniform; the Zarr or the memory-map
reader, ``LoaderConfig.reader``; 0 or 2 spawned DataLoader workers) is timed for at least
``seconds`` of steady state: the clock starts once every worker has delivered a batch and
a further :data:`WARMUP_S` has passed, and stops at the first batch after ``seconds``. So
that no setting runs out of batches or restarts its workers within that time, the epoch's
batches are read over and over (:class:`_Repeating`): the same donors, views and rows,
read like any epoch's.

The reference is the same work done from memory: the store's features are read once into
a numpy array, the rows of every batch of the epoch are computed with the loader's own
sampler (:func:`~sampleclr_scale.loading.loader.view_rows`), and each batch is one
``numpy.take`` of its rows into a preallocated ``[B, 2, m, d]`` float32 buffer, timed the
same way in the same run. ``slowdown_vs_in_memory`` is the in-memory cells/s over a
setting's. The sampling (the views' draws) is the loader's cost only; ``<reader>_read_only``
times a reader alone on the same drawn views, to tell the two apart.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from sampleclr_scale.bench import peak_rss_mb
from sampleclr_scale.config import LoaderConfig
from sampleclr_scale.loading.loader import DonorBagDataset, make_loader
from sampleclr_scale.loading.readers import mmap_problem, open_reader
from sampleclr_scale.loading.schedule import worker_steps
from sampleclr_scale.loading.views import UniformViews, open_view_draw, view_rows
from sampleclr_scale.store.bag_store import BagStore

WARMUP_S = 0.5
"""Seconds after every worker's first batch before the clock starts."""
REPEATS = 100_000
"""Times the epoch's batches are offered (more than any measurement reads)."""
VIEWS = ("balanced", "uniform")
READERS = ("zarr", "mmap")


class _Cycle:
    """``batches`` offered ``total`` times over: ``cycle[i] = batches[i % len(batches)]``."""

    def __init__(self, batches: np.ndarray, total: int) -> None:
        self.batches, self.total = batches, total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, step: int) -> np.ndarray:
        return self.batches[step % len(self.batches)]


class _Repeating(DonorBagDataset):
    """A dataset whose epoch is its batches read :data:`REPEATS` times over, in one pass
    (one store open, one set of workers)."""

    def schedule(self) -> tuple[Any, range]:
        batches, _ = super().schedule()
        total = len(batches) * REPEATS
        return _Cycle(batches, total), worker_steps(total, self._shard(), 0)


def _timed(batches: Iterator, seconds: float, first: int) -> dict[str, float]:
    """Cells/s and donors/s of ``batches`` once ``first`` batches have arrived and
    :data:`WARMUP_S` more has passed, over at least ``seconds``."""
    cells = donors = count = 0
    arrived = start = None
    for i, batch in enumerate(batches):
        now = time.perf_counter()
        if i + 1 < first:
            continue
        if arrived is None:
            arrived = now
            continue
        if start is None:
            if now - arrived >= WARMUP_S:
                start = now
            continue
        cells += int(batch.mask.sum())
        donors += len(batch.donor)
        count += 1
        if now - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    return {"cells_per_s": round(cells / elapsed), "donors_per_s": round(donors / elapsed, 1),
            "batches": count, "seconds": round(elapsed, 3)}


def _loader(store_path: str, config: LoaderConfig, seconds: float) -> dict[str, float]:
    """Steady-state throughput of ``make_loader`` over a :class:`_Repeating` dataset."""
    loader = iter(make_loader(_Repeating(store_path, config)))
    try:
        return _timed(loader, seconds, first=max(1, config.num_workers))
    finally:
        del loader  # stops the workers


def _plans(store: BagStore, config: LoaderConfig) -> list[list[np.ndarray]]:
    """The rows of every donor (view A's, then view B's) of every batch of the dataset's
    epoch, as the loader draws them."""
    dataset = DonorBagDataset(store.location.uri, config)
    batches, steps = dataset.schedule()
    draw = open_view_draw(store, dataset.balance, strength=config.balance_strength)
    return [[view_rows(store, int(donor), seed=config.seed, epoch=dataset.epoch,
                       view_range=config.view_range, draw=draw)[2]
             for donor in batches[step]] for step in steps]


def _in_memory(features: np.ndarray, batches: list[list[np.ndarray]], config: LoaderConfig,
               seconds: float) -> dict[str, float]:
    """The same batches gathered from ``features`` in memory: one ``take`` per batch."""
    plans = [np.concatenate(rows) for rows in batches]
    m = config.view_range[1]
    out = np.zeros((config.batch_size * 2 * m, features.shape[1]), dtype=np.float32)
    staging = None if features.dtype == out.dtype else np.empty(out.shape, features.dtype)
    cells = count = 0
    start = time.perf_counter()
    deadline = start + WARMUP_S
    for i in range(REPEATS * len(plans)):
        rows = plans[i % len(plans)]
        if staging is None:
            np.take(features, rows, axis=0, out=out[: len(rows)], mode="clip")
        else:
            np.take(features, rows, axis=0, out=staging[: len(rows)], mode="clip")
            out[: len(rows)] = staging[: len(rows)]
        now = time.perf_counter()
        if now < deadline:  # warm-up
            start = now
            continue
        cells += len(rows)
        count += 1
        if now - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    return {"cells_per_s": round(cells / elapsed), "batches": count,
            "seconds": round(elapsed, 3)}


def _read_only(store: BagStore, reader: str, plans: list[list[np.ndarray]],
               config: LoaderConfig, seconds: float) -> dict[str, float]:
    """The rows of the same batches read by ``reader`` into a ``[B, 2, m, d]`` buffer,
    the views drawn beforehand: what reading costs without the sampler."""
    rows = open_reader(store, store.features, reader)
    m = config.view_range[1]
    views = [[(m, m, donor) for donor in batch] for batch in plans]
    cells = np.zeros((config.batch_size, 2, m, store.dim), dtype=np.float32)
    count = 0
    start = time.perf_counter()
    deadline = start + WARMUP_S
    while True:
        batch = views[count % len(views)]
        rows.read_views(batch, cells[: len(batch)])
        now = time.perf_counter()
        if now < deadline:
            start = now
            continue
        count += 1
        if now - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    cells_read = sum(2 * m * len(views[i % len(views)]) for i in range(count))
    return {"cells_per_s": round(cells_read / elapsed), "batches": count,
            "seconds": round(elapsed, 3)}


@contextlib.contextmanager
def _zarrs() -> Iterator[None]:
    """zarr-python with the zarrs (Rust) codec pipeline, while inside."""
    import zarr

    with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
        yield


def _pipelines(store: BagStore, plans: list[list[np.ndarray]], seconds: float) -> dict:
    """Per-donor range reads of the same rows (:func:`~sampleclr_scale.loading.readers.read_rows`)
    from the features array opened directly (a plain ``LocalStore``, no manifest checks),
    with zarr-python's default codec pipeline and with zarrs' (when installed), in
    cells/s: what the Zarr reader's codec pipeline costs. Through the store's
    :class:`~sampleclr_scale.store.manifest.CheckedStore` zarr-python keeps its own
    pipeline (zarrs reads only stores it opens itself), which ``codec_pipeline`` of each
    loader setting records."""
    import zarr

    from sampleclr_scale.loading.rows import read_rows

    figures: dict[str, Any] = {}
    for name, pipeline in (("zarr_python", None), ("zarrs", "zarrs.ZarrsCodecPipeline")):
        if pipeline is not None and not _zarrs_installed():
            figures[name] = "not installed"
            continue
        settings = {} if pipeline is None else {"codec_pipeline.path": pipeline}
        with zarr.config.set(settings):
            array = zarr.open_array(store=zarr.storage.LocalStore(
                store.location.path, read_only=True), path="features", mode="r")
            cells = count = 0
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                for rows in plans[count % len(plans)]:
                    read_rows(array, rows)
                    cells += len(rows)
                count += 1
            elapsed = time.perf_counter() - start
        figures[name] = {"cells_per_s": round(cells / elapsed), "batches": count,
                         "seconds": round(elapsed, 3),
                         "codec_pipeline": type(array._async_array.codec_pipeline).__name__}
    return figures


def _peer_annbatch(store: BagStore, config: LoaderConfig, seconds: float) -> Any:
    """annbatch's ``Loader`` on the features array (windows of ``m`` rows, the batch's cells
    at a time), if annbatch is importable (Python 3.12+): cells/s, or what went wrong."""
    try:
        import annbatch
    except ImportError:
        return "not installed"
    m = config.view_range[1]
    try:
        loader = annbatch.Loader(batch_size=config.batch_size * 2 * m, chunk_size=m,
                                 preload_nchunks=config.batch_size * 2, shuffle=True,
                                 rng=np.random.default_rng(0), preload_to_gpu=False,
                                 to_torch=True)
        loader.add_dataset(store.features)
        cells = count = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            for batch in loader:
                x = batch["X"] if isinstance(batch, dict) else batch[0]
                cells += int(x.shape[0])
                count += 1
                if time.perf_counter() - start >= seconds:
                    break
        elapsed = time.perf_counter() - start
        return {"cells_per_s": round(cells / elapsed), "batches": count,
                "seconds": round(elapsed, 3), "version": getattr(annbatch, "__version__", "?")}
    except Exception as err:  # a peer's API changes: record, do not fail the benchmark
        return f"failed: {type(err).__name__}: {err}"


def _naive_soma(store: BagStore, source: str, m: int, n_donors: int) -> dict[str, dict]:
    """The same bags read from the SOMA source without a bag store.

    ``obs_query_and_point_reads``: what a loader without a donor-sorted store does per
    bag: find the donor's cells with an obs query, choose two views of ``m`` cells, read
    each view with a coordinate-list query of the embedding array. ``point_reads_only``:
    the same with the donor's cell ids already known (taken from the store), so only the
    embedding point reads are timed.
    """
    import tiledbsoma

    name = store.attrs["features"]["name"]
    keys = store.attrs["donor_key"]
    rng = np.random.default_rng(0)
    donors = rng.choice(store.n_donors, size=min(n_donors, store.n_donors), replace=False)
    figures = {}
    with tiledbsoma.Experiment.open(source) as exp:
        array = exp.ms["RNA"].obsm[name]
        for mode in ("obs_query_and_point_reads", "point_reads_only"):
            cells = 0
            start = time.perf_counter()
            for donor in donors:
                if mode == "point_reads_only":
                    ids = store.source_joinid(int(store.donor_ptr[donor]),
                                              int(store.donor_ptr[donor + 1]))
                else:
                    row = store.donors.iloc[donor]
                    query = " and ".join(f"{k} == '{row[k]}'" for k in keys)
                    ids = exp.obs.read(column_names=["soma_joinid"], value_filter=query
                                       ).concat()["soma_joinid"].to_numpy()
                n_a, _, rows = view_rows(store, int(donor), seed=0, epoch=0,
                                         view_range=(m, m), draw=UniformViews())
                offsets = rows - store.donor_ptr[donor]
                for view in (offsets[:n_a], offsets[n_a:]):
                    table = array.read(coords=(np.sort(ids[view]),)).tables().concat()
                    cells += len(np.unique(table["soma_dim_0"].to_numpy()))
            seconds = time.perf_counter() - start
            figures[mode] = {"cells_per_s": round(cells / seconds), "donors": len(donors),
                             "seconds": round(seconds, 3)}
    return figures


def _zarrs_installed() -> bool:
    try:
        import zarrs  # noqa: F401
    except ImportError:
        return False
    return True


def bench_loader(store_path: str, *, source: str | None, batch_size: int,
                 cells_per_view: int, seconds: float = 2.0,
                 read_threads: list[int] | None = None,
                 views: tuple[str, ...] = VIEWS, readers: tuple[str, ...] = READERS,
                 workers: tuple[int, ...] = (0, 2), in_memory: bool = True) -> dict:
    """Figures for ``sampleclr-scale bench loader``.

    Parameters
    ----------
    store_path
        The bag store; local or behind a URI (the memory-map reader only runs locally).
    seconds
        Steady-state seconds per setting.
    read_threads
        Also measure, in-process with the default reader, with that many donors read at
        once (``LoaderConfig.read_threads``).
    views
        ``balanced`` (over ``cell_type``, the default for a store that has it) and/or
        ``uniform``.
    readers, workers
        The settings: ``LoaderConfig.reader`` and ``num_workers``.
    in_memory
        Also time the in-memory gather of the same rows (reads the whole features array
        into memory once).
    """
    store = BagStore(store_path)
    base = LoaderConfig(batch_size=batch_size, cells_per_view=cells_per_view)
    figures: dict = {
        "store": store.location.name, "remote": not store.location.is_local,
        "n_cells": store.n_cells, "n_donors": store.n_donors, "dim": store.dim,
        "dtype": str(store.features.dtype), "chunk_rows": int(store.features.chunks[0]),
        "batch_size": batch_size, "cells_per_view": cells_per_view,
        "seconds_per_setting": seconds, "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "zarrs": "installed" if _zarrs_installed() else "not installed",
    }
    mappable = mmap_problem(store, store.features)
    if mappable is not None:
        figures["mmap"] = f"not used: {mappable}"
    features = store.features[:] if in_memory else None
    usable = [r for r in readers if r != "mmap" or mappable is None]
    settings = [(r, w) for r in usable for w in workers]
    if figures["zarrs"] == "installed" and "zarr" in readers:
        settings.append(("zarrs", 0))
    for kind in views:
        balance = "cell_type" if kind == "balanced" else None
        if balance is not None and balance not in store.code_columns:
            figures[kind] = "the store has no cell_type codes"
            continue
        figures[kind] = _view_figures(
            store_path, store, base.model_copy(update={"balance": balance}), features=features,
            settings=settings, readers=usable, seconds=seconds, label=kind)
    for threads in read_threads or []:
        figures[f"store_{threads}_read_threads"] = _loader(
            store_path, base.model_copy(update={"read_threads": threads}), seconds)
    figures["annbatch"] = _peer_annbatch(store, base, seconds)
    if source:
        naive = _naive_soma(store, source, cells_per_view, n_donors=batch_size)
        figures["naive_soma"] = naive
        ours = _default_setting(figures, mappable is None)["cells_per_s"]
        figures["speedup_vs_naive"] = {k: round(ours / v["cells_per_s"], 1)
                                       for k, v in naive.items()}
    figures["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return figures


def _view_figures(store_path: str, store: BagStore, config: LoaderConfig, *,
                  features: np.ndarray | None,
                  settings: list[tuple[str, int]], readers: list[str], seconds: float,
                  label: str) -> dict[str, Any]:
    """One kind of views (``config.balance``): the in-memory gather (when ``features``
    are given), the loader in each ``(reader, workers)`` setting, each reader's reads
    alone and, locally, Zarr's direct reads; each with its ratio to the gather."""
    results: dict[str, Any] = {}
    plans = _plans(store, config)
    memory = None if features is None else _in_memory(features, plans, config, seconds)
    if memory is not None:
        results["in_memory_gather"] = memory

    def add(name: str, result: dict) -> None:
        if memory is not None:
            result["slowdown_vs_in_memory"] = round(
                memory["cells_per_s"] / result["cells_per_s"], 2)
        results[name] = result

    for reader, n_workers in settings:
        name = f"{reader}_{n_workers}_workers"
        setting = config.model_copy(update={"reader": "zarr" if reader == "zarrs"
                                            else reader, "num_workers": n_workers})
        with _zarrs() if reader == "zarrs" else contextlib.nullcontext():
            result = _loader(store_path, setting, seconds)
            if reader != "mmap":
                result["codec_pipeline"] = type(
                    BagStore(store_path).features._async_array.codec_pipeline).__name__
        add(name, result)
        print(f"{label:>8} {name:>16}: {result['cells_per_s']:>12,} cells/s", flush=True)
    for reader in readers:
        add(f"{reader}_read_only", _read_only(store, reader, plans, config, seconds / 2))
    if store.location.is_local and "zarr" in readers:
        results["zarr_direct_reads"] = _pipelines(store, plans, seconds / 2)
    return results


def _default_setting(figures: dict, mappable: bool) -> dict:
    """The figures of the loader's defaults (``balance: auto``, ``reader: auto``, no
    workers), or of the first setting measured."""
    default = "mmap_0_workers" if mappable else "zarr_0_workers"
    measured = [figures[kind] for kind in VIEWS if isinstance(figures.get(kind), dict)]
    for results in measured:
        if isinstance(results.get(default), dict):
            return results[default]
    return next(v for results in measured for k, v in results.items()
                if k.endswith("_workers") and isinstance(v, dict))


def loader_table(figures: dict) -> str:
    """The figures of :func:`bench_loader` as a text table."""
    lines = [f"{'views':<9} {'setting':<30} {'cells/s':>12} {'donors/s':>9} "
             f"{'in-memory / this':>16}"]

    def row(kind: str, name: str, result: Any) -> None:
        if not isinstance(result, dict):
            lines.append(f"{kind:<9} {name:<30} {result}")
        elif "cells_per_s" not in result:
            for part, value in result.items():
                row(kind, f"{name}: {part}", value)
        else:
            slowdown = result.get("slowdown_vs_in_memory")
            lines.append(f"{kind:<9} {name:<30} {result['cells_per_s']:>12,} "
                         f"{result.get('donors_per_s', ''):>9} "
                         f"{'' if slowdown is None else f'{slowdown:.2f}x':>16}")

    for kind in VIEWS:
        results = figures.get(kind)
        if isinstance(results, dict):
            for name, result in results.items():
                row(kind, name, result)
        elif results is not None:
            row(kind, "-", results)
    lines.append(f"annbatch: {figures.get('annbatch')}")
    return "\n".join(lines)
