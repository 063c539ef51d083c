"""Ingest benchmark: cells/s and peak memory of ``ingest`` for growing cohorts.

Each cohort is simulated once into ``workdir`` (a SOMA experiment with a 50-dim obsm
embedding and few genes) and ingested in a fresh spawned process, which reports its own
peak RSS, so the figure is the ingest's alone.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from sampleclr_scale.bench import peak_rss_mb, run_in_child
from sampleclr_scale.config import IngestConfig
from sampleclr_scale.simulate import cohorts as synthetic

CELLS_PER_DONOR = (200, 4000)  # log-uniform range of the simulated cohorts


def simulated_source(n_cells: int, dim: int, workdir: Path,
                     cells_per_donor: tuple[int, int] = CELLS_PER_DONOR) -> str:
    """A SOMA experiment of about ``n_cells`` cells, written once and reused.

    Donors' sizes are log-uniform over ``cells_per_donor``; the number of donors is
    ``n_cells`` over the mean size.
    """
    lo, hi = cells_per_donor
    mean = (hi - lo) / math.log(hi / lo)  # mean of the log-uniform distribution
    uri = workdir / f"cohort_{n_cells}_{dim}_{lo}-{hi}.soma"
    if not uri.exists():
        spec = synthetic.CohortSpec(n_donors=max(1, round(n_cells / mean)), min_cells=lo,
                                    max_cells=hi, n_genes=8, embedding_dim=dim, seed=1)
        start = time.perf_counter()
        synthetic.write_soma(spec, uri)
        print(f"simulated {uri} in {time.perf_counter() - start:.0f} s", flush=True)
    return str(uri)


def cells_per_donor_range(n_cells: int, n_donors: int, ratio: float = 10.0) -> tuple[int, int]:
    """A log-uniform range of donor sizes, ``hi = ratio * lo``, whose mean puts
    ``n_cells`` cells in about ``n_donors`` donors."""
    lo = n_cells / n_donors * math.log(ratio) / (ratio - 1)
    return round(lo), round(ratio * lo)


def bench_config(source: str, out: Path) -> IngestConfig:
    """The ingest of a simulated cohort: its obsm embedding, donors, metadata, cell type."""
    return IngestConfig(source=source, out=str(out), features="obsm:scvi",
                        donor_key=["dataset_id", "donor_id"],
                        meta=["disease", "severity", "age", "sex"],
                        cell_columns=["cell_type"], overwrite=True)


def ingest_figures(config: IngestConfig) -> dict:
    """Run ``config`` in this process; its counts, time and this process's peak RSS."""
    from sampleclr_scale.ingest.stage import ingest

    report = ingest(config)
    return {"cells": report.n_cells, "donors": report.n_donors,
            "seconds": round(report.seconds, 2),
            "cells_per_s": round(report.cells_per_second),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def bench_ingest(sizes: list[int], *, dim: int, workdir: Path) -> dict:
    """Figures for ``sampleclr-scale bench ingest``."""
    workdir.mkdir(parents=True, exist_ok=True)
    figures: dict = {"dim": dim, "features": "obsm (SOMA sparse array)", "runs": []}
    for n_cells in sizes:
        source = simulated_source(n_cells, dim, workdir)
        run = run_in_child(ingest_figures, bench_config(source, workdir / f"store_{n_cells}.zarr"))
        figures["runs"].append(run)
        print(f"ingest {run['cells']:,} cells: {run['cells_per_s']:,} cells/s, "
              f"peak RSS {run['peak_rss_mb']:,} MB", flush=True)
    return figures
