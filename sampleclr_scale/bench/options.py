"""The options of ``sampleclr-scale bench``: one subcommand per benchmark.

Each benchmark's defaults are read from the stage configs (:func:`~sampleclr_scale.config
.default_help`), so the help states what a run without the option does; the benchmarks
themselves run through :func:`~sampleclr_scale.bench.run_benchmark`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from sampleclr_scale.config import default_help


def add_bench(sub: argparse._SubParsersAction) -> None:
    from sampleclr_scale.config import LoaderConfig
    from sampleclr_scale.embed.config import EmbedConfig

    p = sub.add_parser("bench", help="throughput benchmarks (print and save figures)")
    kinds = p.add_subparsers(dest="kind", required=True)
    _add_bench_loader(kinds)
    ingest = kinds.add_parser("ingest", help="ingest throughput and peak memory")
    ingest.add_argument("--cells", type=int, nargs="+", default=[1_000_000],
                        help="cohort sizes to simulate and ingest")
    ingest.add_argument("--dim", type=int, default=50)
    ingest.add_argument("--workdir", default="bench_out/ingest", help="scratch directory")
    ingest.add_argument("--json", required=True, help="file to save the figures to")
    ingest.set_defaults(run=_run_bench("ingest"))
    prior = kinds.add_parser("prior", help="prior build time for 100 / 1,000 / 5,000 donors")
    prior.add_argument("--donors", type=int, nargs="+", default=[100, 1000, 5000])
    prior.add_argument("--cells", type=int, default=300, help="cells per donor subsample")
    prior.add_argument("--workdir", default="bench_out/prior", help="scratch directory")
    prior.add_argument("--json", required=True, help="file to save the figures to")
    prior.set_defaults(run=_run_bench("prior"))
    embedding = kinds.add_parser("embed", help="donors/s of batch embedding, 1 and 2 actors")
    embedding.add_argument("--store", required=True)
    embedding.add_argument("--checkpoint", required=True, help="training run directory")
    embedding.add_argument("--workers", default="1,2", help="comma-separated actor counts")
    embedding.add_argument("--cells", type=int, help=default_help(EmbedConfig, "cells"))
    embedding.add_argument("--mode", choices=["random", "centrality", "all"],
                           help=default_help(EmbedConfig, "mode"))
    embedding.add_argument("--batch-donors", dest="batch_donors", type=int,
                           help=default_help(EmbedConfig, "batch_donors"))
    embedding.add_argument("--graph-cells", dest="graph_cells", type=int,
                           help=default_help(EmbedConfig, "graph_cells"))
    embedding.add_argument("--json", required=True, help="file to save the figures to")
    embedding.set_defaults(run=_run_bench("embed"))
    scale = kinds.add_parser("scale", help="every stage on one simulated ~10M-cell cohort")
    scale.add_argument("--cells", type=int, default=10_000_000)
    scale.add_argument("--donors", type=int,
                       help="about this many donors in the large cohort (default: about "
                            "2,000 cells per donor)")
    scale.add_argument("--dim", type=int, default=50)
    scale.add_argument("--workers", type=int, default=2)
    scale.add_argument("--workdir", default="bench_out/scale", help="scratch directory")
    scale.add_argument("--json", required=True, help="file to save the figures to")
    scale.set_defaults(run=_run_bench("scale"))
    training = kinds.add_parser("train", help="training throughput and 1 -> N worker scaling")
    training.add_argument("--store", required=True)
    training.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    training.add_argument("--preset", choices=["small", "large"], default="large")
    training.add_argument("--batch-size", type=int, default=32)
    training.add_argument("--cells-per-view", type=int, default=1000)
    training.add_argument("--epochs", type=int, default=3)
    training.add_argument("--use-gpu", dest="use_gpu", action="store_true",
                          help="one GPU per worker, NCCL, bf16 autocast")
    training.add_argument("--resident", nargs="+", choices=["auto", "always", "never"],
                          help="loader.resident modes to measure, each with every worker count, "
                          "e.g. never always: streamed vs device-resident bags "
                          f"({default_help(LoaderConfig, 'resident')})")
    training.add_argument("--in-process", dest="in_process", action="store_true",
                          help="one worker in this process, without Ray (--workers 1)")
    training.add_argument("--json", required=True, help="file to save the figures to")
    training.set_defaults(run=_run_bench("train"))
    _add_bench_quality(kinds)
    _add_bench_search(kinds)


def _add_bench_loader(kinds: argparse._SubParsersAction) -> None:
    loader = kinds.add_parser("loader", help="two-view bag throughput of a bag store")
    loader.add_argument("--store", required=True)
    loader.add_argument("--source", help="SOMA experiment of the store, for naive point reads")
    loader.add_argument("--batch-size", type=int, default=32)
    loader.add_argument("--cells-per-view", type=int, default=1000)
    loader.add_argument("--seconds", type=float, default=2.0,
                        help="steady-state seconds per setting (after start-up and warm-up)")
    loader.add_argument("--views", nargs="+", choices=["balanced", "uniform"],
                        default=["balanced", "uniform"],
                        help="views balanced over cell_type (the default) and/or uniform")
    loader.add_argument("--readers", nargs="+", choices=["zarr", "mmap"],
                        default=["zarr", "mmap"], help="loader.reader settings to time")
    loader.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="DataLoader worker counts to time")
    loader.add_argument("--read-threads", dest="read_threads", type=int, nargs="*",
                        help="also measure with these numbers of donors read at once")
    loader.add_argument("--json", required=True, help="file to save the figures to")
    loader.set_defaults(run=_run_bench("loader"))


def _add_bench_quality(kinds: argparse._SubParsersAction) -> None:
    from sampleclr_scale.bench.quality import SCENARIOS, VARIANTS

    quality = kinds.add_parser("quality", help="SPARE scores of SampleCLR variants over seeds "
                               "on simulated scenarios, next to the baselines")
    quality.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS),
                         default=list(SCENARIOS))
    quality.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    quality.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    quality.add_argument("--cohorts", type=int, nargs="+", default=[0],
                         help="simulator seeds: each scenario's cohort is drawn once per "
                         "seed, and every variant trained on each draw (default: one draw)")
    quality.add_argument("--epochs", type=int, default=40, help="contrastive epochs per run")
    quality.add_argument("--workers", type=int, default=2)
    quality.add_argument("--workdir", default="bench_out/quality",
                         help="scratch directory (a re-run resumes from it)")
    quality.add_argument("--json", required=True, help="file to save the figures to")
    quality.set_defaults(run=_run_bench("quality"))


def _add_bench_search(kinds: argparse._SubParsersAction) -> None:
    search = kinds.add_parser("search", help="donor search: recall@10 vs exact, queries/s, "
                              "index build time and size at simulated atlas sizes")
    search.add_argument("--donors", type=int, nargs="+", default=[15_000, 1_000_000])
    search.add_argument("--dim", type=int, default=32, help="width of the donor vectors")
    search.add_argument("--queries", type=int, default=1000, help="query donors per size")
    search.add_argument("--compare-max", dest="compare_max", type=int, default=200_000,
                        help="also time pynndescent up to this many donors")
    search.add_argument("--workdir", default="bench_out/search", help="scratch directory")
    search.add_argument("--json", required=True, help="file to save the figures to")
    search.set_defaults(run=_run_bench("search"))


def _run_bench(kind: str) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        from sampleclr_scale.bench import run_benchmark

        run_benchmark(kind, args)

    return run


# --- demo -------------------------------------------------------------------------------
