"""Training benchmark: throughput per worker, waiting-for-data share, 1 -> N scaling.

Runs the real ``train`` driver (Ray Train, DDP, the bag-store loader) for a few epochs
per worker count and reads the per-epoch figures the workers measured: donors/s and
cells/s over all workers, and the share of step time spent waiting for the next batch.
The first epoch (process start-up, first reads) is left out of the figures.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from sampleclr_scale.config import TrainConfig
from sampleclr_scale.train.driver import train


def bench_train(store: str, *, workers: list[int], preset: str, batch_size: int,
                cells_per_view: int, epochs: int) -> dict:
    """Figures for ``sampleclr-scale bench train``."""
    figures: dict = {"store": Path(store).name, "preset": preset, "batch_size": batch_size,
                     "cells_per_view": cells_per_view, "epochs": epochs, "runs": []}
    for n in workers:
        config = TrainConfig.from_mapping({
            "preset": preset, "workers": n, "epochs": epochs, "patience": None,
            "loader": {"batch_size": batch_size, "cells_per_view": cells_per_view},
            "log_every": 10_000,
        })
        run = Path(tempfile.mkdtemp(prefix=f"bench-train-{n}-"))
        try:
            history = train(store, str(run / "run"), config).history
        finally:
            shutil.rmtree(run, ignore_errors=True)
        steady = history[1:] or history
        mean = {k: sum(h[k] for h in steady) / len(steady)
                for k in ("donors_per_s", "cells_per_s", "wait_fraction")}
        figures["runs"].append({
            "workers": n,
            "donors_per_s": round(mean["donors_per_s"], 1),
            "cells_per_s": round(mean["cells_per_s"]),
            "donors_per_s_per_worker": round(mean["donors_per_s"] / n, 1),
            "cells_per_s_per_worker": round(mean["cells_per_s"] / n),
            "waiting_for_data": round(mean["wait_fraction"], 3),
            "compute": round(1 - mean["wait_fraction"], 3),
        })
        print(figures["runs"][-1], flush=True)
    base = figures["runs"][0]
    for run_figures in figures["runs"][1:]:
        run_figures["speedup_vs_first"] = round(
            run_figures["donors_per_s"] / base["donors_per_s"], 2)
    return figures
