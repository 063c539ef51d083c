"""Throughput benchmarks behind ``sampleclr-scale bench``: each prints and saves figures."""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path
from typing import Any


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_figures(figures: dict[str, Any], path: str | Path) -> None:
    """Print the figures and write them as JSON."""
    text = json.dumps(figures, indent=2)
    print(text)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text + "\n")


def run_benchmark(kind: str, args: argparse.Namespace) -> None:
    """Run benchmark ``kind`` with the parsed command-line options."""
    if kind == "loader":
        from sampleclr_scale.bench.loader import bench_loader

        figures = bench_loader(args.store, source=args.source, batch_size=args.batch_size,
                               cells_per_view=args.cells_per_view, n_batches=args.batches,
                               read_threads=args.read_threads)
    elif kind == "ingest":
        from sampleclr_scale.bench.ingest import bench_ingest

        figures = bench_ingest(args.cells, dim=args.dim, workdir=Path(args.workdir))
    elif kind == "prior":
        from sampleclr_scale.bench.prior import bench_prior

        figures = bench_prior(tuple(args.donors), cells_per_donor=args.cells,
                              workdir=Path(args.workdir))
    elif kind == "embed":
        from sampleclr_scale.bench.embed import bench_embed

        figures = bench_embed(args.store, args.checkpoint,
                              workers=[int(w) for w in args.workers.split(",")],
                              cells=args.cells, mode=args.mode,
                              batch_donors=args.batch_donors, graph_cells=args.graph_cells)
    elif kind == "scale":
        from sampleclr_scale.bench.scale import bench_scale

        figures = bench_scale(args.cells, dim=args.dim, workers=args.workers,
                              workdir=Path(args.workdir))
    elif kind == "train":
        from sampleclr_scale.bench.train import bench_train

        figures = bench_train(args.store, workers=[int(w) for w in args.workers.split(",")],
                              preset=args.preset, batch_size=args.batch_size,
                              cells_per_view=args.cells_per_view, epochs=args.epochs)
    else:
        raise ValueError(f"unknown benchmark {kind!r}")
    save_figures(figures, args.json)
