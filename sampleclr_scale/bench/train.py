"""Training benchmark: throughput per worker, waiting-for-data share, 1 -> N scaling, and
streamed against device-resident bags, on CPUs or GPUs.

Runs the real ``train`` driver (Ray Train, DDP, the bag-store loader or the resident
bags; with ``--in-process``, one worker in this process without Ray) for a few epochs
per worker count and ``loader.resident`` mode, and reads the per-epoch figures the
workers measured: donors/s and cells/s over all workers, the share of step time spent
waiting for the next batch, and on GPUs the peak memory of a worker's tensors. The first
epoch (process start-up, first reads, CUDA's start) is left out of the figures.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from sampleclr_scale.config import LoaderConfig, TrainConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.train.driver import train


def bench_train(store: str, *, workers: list[int], preset: str, batch_size: int,
                cells_per_view: int, epochs: int, use_gpu: bool = False,
                resident: Sequence[str] | None = None, in_process: bool = False) -> dict:
    """Figures for ``sampleclr-scale bench train``.

    Parameters
    ----------
    use_gpu
        One GPU per worker (NCCL, bf16 autocast by the default ``precision``).
    resident
        ``loader.resident`` modes to measure, each with every worker count (default: the
        config's default alone).
    in_process
        Train in this process, without Ray (one worker; ``train(..., in_process=True)``),
        e.g. on a GPU machine without Ray.
    """
    if in_process and workers != [1]:
        raise InputError(f"in-process training has one worker, not {workers}",
                         "pass --workers 1 with --in-process")
    modes = list(resident or [LoaderConfig.model_fields["resident"].default])
    figures: dict = {"store": Path(store).name, "preset": preset, "batch_size": batch_size,
                     "cells_per_view": cells_per_view, "epochs": epochs, "use_gpu": use_gpu,
                     "device": _device_name(use_gpu), "in_process": in_process, "runs": []}
    for mode in modes:
        first = None
        for n in workers:
            config = TrainConfig.from_mapping({
                "preset": preset, "workers": n, "epochs": epochs, "patience": None,
                "use_gpu": use_gpu, "log_every": 10_000,
                "loader": {"batch_size": batch_size, "cells_per_view": cells_per_view,
                           "resident": mode},
            })
            run_figures = {"workers": n, "resident": mode,
                           **_measure(store, config, in_process)}
            first = first or run_figures
            if run_figures is not first:
                run_figures["speedup_vs_first"] = round(
                    run_figures["donors_per_s"] / first["donors_per_s"], 2)
            figures["runs"].append(run_figures)
            print(run_figures, flush=True)
    return figures


def _measure(store: str, config: TrainConfig, in_process: bool) -> dict:
    """Train ``config`` into a scratch directory; the means of its epochs after the first."""
    run = Path(tempfile.mkdtemp(prefix=f"bench-train-{config.workers}-"))
    try:
        history = train(store, str(run / "run"), config, in_process=in_process).history
    finally:
        shutil.rmtree(run, ignore_errors=True)
    steady = history[1:] or history
    mean = {k: sum(h[k] for h in steady) / len(steady)
            for k in ("donors_per_s", "cells_per_s", "wait_fraction")}
    n = config.workers
    figures = {
        "donors_per_s": round(mean["donors_per_s"], 1),
        "cells_per_s": round(mean["cells_per_s"]),
        "donors_per_s_per_worker": round(mean["donors_per_s"] / n, 1),
        "cells_per_s_per_worker": round(mean["cells_per_s"] / n),
        "step_s": round(config.global_batch / mean["donors_per_s"], 4),
        "waiting_for_data": round(mean["wait_fraction"], 3),
        "compute": round(1 - mean["wait_fraction"], 3),
    }
    if "gpu_peak_mb" in history[-1]:
        figures["gpu_peak_mb"] = round(max(h["gpu_peak_mb"] for h in history), 1)
    return figures


def _device_name(use_gpu: bool) -> str:
    """What the workers train on: the GPU's name, or ``cpu``."""
    if not use_gpu:
        return "cpu"
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "gpu"
