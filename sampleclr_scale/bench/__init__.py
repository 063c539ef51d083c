"""Benchmarks behind ``sampleclr-scale bench`` (throughput, memory, quality): each prints
and saves its figures."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB.

    Read from ``VmHWM`` rather than ``getrusage``: Linux carries ``ru_maxrss`` across
    ``execve``, so a spawned child would report at least its parent's size at the fork.
    """
    from sampleclr_scale.bench.memory import peak_rss_kb

    return (peak_rss_kb(os.getpid()) or 0) / 1024


def _child(fn: Callable[..., Any], args: tuple, env: dict[str, str], results: Any) -> None:
    os.environ.update(env)
    results.put(fn(*args))


def run_in_child(fn: Callable[..., Any], *args: Any, env: dict[str, str] | None = None) -> Any:
    """``fn(*args)`` in a fresh spawned process, so its memory is its own; its result.

    ``env`` is added to the child's environment (e.g. ``RAY_ADDRESS`` to join a cluster).
    ``fn`` and its result must pickle.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_child, args=(fn, args, env or {}, results))
    child.start()
    while True:  # read before joining: a large result would keep the child from exiting
        try:
            result = results.get(timeout=1)
            break
        except queue.Empty:
            if not child.is_alive():
                raise RuntimeError(f"{fn.__name__} failed in its own process "
                                   f"(exit code {child.exitcode})") from None
    child.join()
    return result


def save_figures(figures: dict[str, Any], path: str | Path) -> None:
    """Print the figures and write them as JSON."""
    text = json.dumps(figures, indent=2)
    print(text)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text + "\n")


def run_benchmark(kind: str, args: argparse.Namespace) -> None:
    """Run benchmark ``kind`` with the parsed command-line options."""
    if kind == "loader":
        from sampleclr_scale.bench.loader import bench_loader, loader_table

        figures = bench_loader(args.store, source=args.source, batch_size=args.batch_size,
                               cells_per_view=args.cells_per_view, seconds=args.seconds,
                               read_threads=args.read_threads, views=tuple(args.views),
                               readers=tuple(args.readers), workers=tuple(args.workers))
        save_figures(figures, args.json)
        print(loader_table(figures))
        return
    elif kind == "ingest":
        from sampleclr_scale.bench.ingest import bench_ingest

        figures = bench_ingest(args.cells, dim=args.dim, workdir=Path(args.workdir))
    elif kind == "prior":
        from sampleclr_scale.bench.prior import bench_prior

        figures = bench_prior(tuple(args.donors), cells_per_donor=args.cells,
                              workdir=Path(args.workdir))
    elif kind == "embed":
        from sampleclr_scale.bench.embed import bench_embed
        from sampleclr_scale.embed.config import EmbedConfig

        settings = {name: getattr(args, name) for name in ("cells", "mode", "batch_donors",
                                                           "graph_cells")}
        config = EmbedConfig.from_mapping({k: v for k, v in settings.items() if v is not None},
                                          where="bench embed")
        figures = bench_embed(args.store, args.checkpoint, config,
                              workers=[int(w) for w in args.workers.split(",")])
    elif kind == "scale":
        from sampleclr_scale.bench.scale import bench_scale

        figures = bench_scale(args.cells, dim=args.dim, workers=args.workers,
                              workdir=Path(args.workdir), n_donors=args.donors)
    elif kind == "train":
        from sampleclr_scale.bench.train import bench_train

        figures = bench_train(args.store, workers=[int(w) for w in args.workers.split(",")],
                              preset=args.preset, batch_size=args.batch_size,
                              cells_per_view=args.cells_per_view, epochs=args.epochs,
                              use_gpu=args.use_gpu, resident=args.resident,
                              in_process=args.in_process)
    elif kind == "quality":
        from sampleclr_scale.bench.quality import bench_quality

        figures = bench_quality(scenarios=args.scenarios, variants=args.variants,
                                seeds=args.seeds, epochs=args.epochs, workers=args.workers,
                                workdir=Path(args.workdir), cohorts=tuple(args.cohorts))
    elif kind == "search":
        from sampleclr_scale.bench.search import bench_search, search_table

        figures = bench_search(args.donors, dim=args.dim, queries=args.queries, k=10,
                               workdir=Path(args.workdir), compare_max=args.compare_max)
        save_figures(figures, args.json)
        print(search_table(figures))
        return
    else:
        raise ValueError(f"unknown benchmark {kind!r}")
    save_figures(figures, args.json)
