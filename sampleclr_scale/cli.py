"""The ``sampleclr-scale`` command: one subcommand per stage, plus ``pipeline``, ``demo``
and ``bench``."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sampleclr_scale.bench.options import add_bench
from sampleclr_scale.config import default_help
from sampleclr_scale.errors import InputError, path_error

log = logging.getLogger("sampleclr_scale")


def _overrides(args: argparse.Namespace, cls: Any) -> dict[str, Any]:
    """The options given on the command line that are fields of config ``cls`` (an
    option's ``dest`` is its field's name, so the two cannot drift apart)."""
    return {n: getattr(args, n) for n in cls.model_fields if getattr(args, n, None) is not None}


def _load(cls, args: argparse.Namespace, **fixed: Any):
    """A stage config from ``--config`` YAML, then command-line options, then ``fixed``
    (an error names the file or the command line, where its key was given)."""
    from sampleclr_scale.config import read_yaml

    file = getattr(args, "config", None)
    layers = {file: read_yaml(file)} if file else {}
    layers["command line"] = {**_overrides(args, cls), **fixed}
    return cls.from_layers(layers)


# --- ingest -----------------------------------------------------------------------------

def _add_ingest(sub: argparse._SubParsersAction) -> None:
    from sampleclr_scale.config import IngestConfig

    default = functools.partial(default_help, IngestConfig)
    p = sub.add_parser("ingest", help="build a donor-sorted bag store from a source",
                       description="Select a cohort from a SOMA experiment, an .h5ad file or "
                       "CELLxGENE Census and write it as a bag store (out of core).")
    p.add_argument("source", help="SOMA experiment URI, .h5ad path, census[:VERSION|:PATH]")
    p.add_argument("--out", required=True,
                   help="bag store to create: a path or URI (built locally, then uploaded)")
    p.add_argument("--config", help="YAML file with IngestConfig keys")
    p.add_argument("--features", help=f"obsm:NAME (an embedding) or pca:N ({default('features')})")
    p.add_argument("--features-like", dest="features_like", metavar="STORE",
                   help="put the cells in STORE's feature space instead (e.g. the training "
                   "store of the model that will embed them): its embedding, or its PCA "
                   "applied with genes matched by id; embed checks it")
    p.add_argument("--max-missing-genes", dest="max_missing_genes", type=float,
                   help="with --features-like and PCA: largest fraction of its genes the "
                   "source may lack, each taken at the PCA mean "
                   f"({default('max_missing_genes')})")
    p.add_argument("--layer", help=f"X layer for pca:N ({default('layer')}; X for .h5ad)")
    p.add_argument("--measurement", help=f"SOMA measurement ({default('measurement')})")
    p.add_argument("--organism", help=f"Census organism ({default('organism')})")
    p.add_argument("--donor-key", nargs="+", dest="donor_key",
                   help="obs column(s) naming a donor (default donor_id, or dataset_id "
                   "donor_id when donor ids repeat across datasets; Census: dataset_id "
                   "donor_id)")
    p.add_argument("--obs-filter", dest="obs_filter",
                   help="cell filter: column OP literal (== != < <= > >=), column in "
                   "[...], joined with and/or/not (a subset of SOMA's value filters)")
    p.add_argument("--primary-only", dest="primary_only", action="store_true", default=None,
                   help="keep only is_primary_data == True cells (default for Census)")
    p.add_argument("--min-cells", dest="min_cells", type=int, help="drop smaller donors")
    p.add_argument("--meta", nargs="+", help="donor-level obs columns to keep")
    p.add_argument("--cell-columns", nargs="*", dest="cell_columns",
                   help="cell-level obs columns to keep (default: cell_type when the source "
                   "has it; give the flag with no column to keep none)")
    p.add_argument("--batch-key", nargs="+", dest="batch_key",
                   help="donor-level obs column(s) naming a technical batch (e.g. dataset_id "
                   "assay): kept in the donor table, with per-batch feature mean and std")
    p.add_argument("--val-fraction", dest="val_fraction", type=float,
                   help=f"fraction of donors for validation ({default('val_fraction')})")
    p.add_argument("--stratify", help="donor column to stratify the split on")
    p.add_argument("--group-by", dest="group_by", help="donor column to group the split by")
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", choices=["float32", "float16"])
    p.add_argument("--read-block", dest="read_block", type=int, help="cells per source read")
    p.add_argument("--read-workers", dest="read_workers", type=int,
                   help="Ray actors reading the source's blocks in parallel "
                        f"({default('read_workers')})")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an existing bag store atomically (nothing else)")
    p.set_defaults(run=_run_ingest)


def _run_ingest(args: argparse.Namespace) -> None:
    from sampleclr_scale.config import IngestConfig
    from sampleclr_scale.ingest.stage import ingest

    config = _load(IngestConfig, args, source=args.source, out=args.out)
    report = ingest(config)
    print(json.dumps({"store": report.out, "cells": report.n_cells, "donors": report.n_donors,
                      "dim": report.dim, "seconds": round(report.seconds, 2),
                      "counts": report.counts}, indent=2))


# --- check ------------------------------------------------------------------------------

def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="verify a bag store against its manifest",
                       description="Check that every file ingest wrote into a bag store is "
                       "there, with its size and CRC32 (reads the whole store); exit status "
                       "2 names every missing, truncated or changed file.")
    p.add_argument("store", help="bag store: a path or URI")
    p.set_defaults(run=_run_check)


def _run_check(args: argparse.Namespace) -> None:
    from sampleclr_scale.storage import Location
    from sampleclr_scale.store.bag_store import BagStore
    from sampleclr_scale.store.invariants import check_contents
    from sampleclr_scale.store.manifest import check_store

    where = Location(args.store)
    if not where.exists() or where.is_file():
        raise InputError(f"{where} {'is a file' if where.exists() else 'does not exist'}, "
                         "not a bag store", "name the folder (or URI) that `sampleclr-scale "
                         "ingest` wrote")
    report = check_store(where)
    report |= check_contents(BagStore(where))
    print(json.dumps(report, indent=2))


# --- train ------------------------------------------------------------------------------

def _add_train(sub: argparse._SubParsersAction) -> None:
    from sampleclr_scale.config import TrainConfig

    p = sub.add_parser("train", help="train SampleCLR with Ray Train",
                       description="Train SampleCLR data-parallel on a bag store: Ray Train "
                       "workers stream their shard of two-view donor bags; one X-CLR loss over "
                       "the global batch; checkpoints and restarts from failures.")
    p.add_argument("--store", required=True, help="bag store (from ingest): a path or URI")
    p.add_argument("--out", required=True,
                   help="run directory (model.pt, metrics, checkpoints): a path or URI")
    p.add_argument("--config", help="YAML file with TrainConfig keys")
    p.add_argument("--workers", type=int,
                   help=f"Ray Train workers ({default_help(TrainConfig, 'workers')})")
    p.add_argument("--use-gpu", dest="use_gpu", action="store_true", default=None,
                   help="one GPU per worker, NCCL")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out from its latest checkpoint")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from sampleclr_scale.config import TrainConfig
    from sampleclr_scale.train.driver import train

    config = _load(TrainConfig, args)
    result = train(args.store, args.out, config, resume=args.resume)
    last = result.history[-1] if result.history else {}
    print(json.dumps({"run": str(result.run_dir), "model": str(result.model_path),
                      "epochs": len(result.history), "last_epoch": last}, indent=2))


# --- prior ------------------------------------------------------------------------------

def _add_prior(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prior", help="build a donor-similarity prior for X-CLR",
                       description="Compute a donor x donor similarity from a bag store and "
                       "store it in the store (priors/KIND): pseudobulk cosine, or GloScope "
                       "(symmetrised kNN KL divergence, exp(-D/scale)); all pairs for small "
                       "cohorts, each donor's nearest donors for large ones (Ray tasks).")
    from sampleclr_scale.prior.config import PriorConfig

    default = functools.partial(default_help, PriorConfig)
    p.add_argument("--store", required=True)
    p.add_argument("--config", help="YAML file with PriorConfig keys")
    p.add_argument("--kind", choices=["pseudobulk", "gloscope"])
    p.add_argument("--k", type=int, help=f"kNN of the KL estimator ({default('k')})")
    p.add_argument("--cells", dest="cells_per_donor", type=int,
                   help=f"cells per donor, gloscope ({default('cells_per_donor')})")
    p.add_argument("--pcs", dest="n_pcs", type=int,
                   help=f"principal components, gloscope ({default('n_pcs')})")
    p.add_argument("--scale", type=float,
                   help=f"similarity exp(-D/scale) ({default('scale')})")
    p.add_argument("--neighbours", type=int,
                   help=f"nearest donors per donor in sparse mode ({default('neighbours')})")
    p.add_argument("--dense-limit", dest="dense_limit", type=int,
                   help=f"all pairs up to this many donors, sparse above "
                   f"({default('dense_limit')})")
    p.add_argument("--seed", type=int, help=f"which window of cells ({default('seed')})")
    p.add_argument("--correct", choices=["auto", "batch_cell_type", "none"],
                   help="compare the cells corrected per (batch, cell type), as training "
                   f"reads them, or as stored ({default('correct')})")
    p.set_defaults(run=_run_prior)


def _run_prior(args: argparse.Namespace) -> None:
    from sampleclr_scale.prior.build import build_and_save_prior
    from sampleclr_scale.prior.config import PriorConfig
    from sampleclr_scale.prior.graph import prior_summary

    prior, where = build_and_save_prior(args.store, _load(PriorConfig, args))
    print(json.dumps({"prior": str(where), **prior_summary(prior)}, indent=2))


# --- embed ------------------------------------------------------------------------------

def _add_embed(sub: argparse._SubParsersAction) -> None:
    from sampleclr_scale.embed.config import EmbedConfig

    p = sub.add_parser("embed", help="embed every donor with a trained model, write back",
                       description="Embed all donors of a bag store with a pool of Ray actors "
                       "(each loads the model once), on a fixed, deterministic set of cells per "
                       "donor; write donor embeddings, cell weights and (for a model with "
                       "supervised heads) predictions to EMB and back into the store and a "
                       "SOMA experiment.")
    p.add_argument("--store", required=True)
    p.add_argument("--checkpoint", required=True, help="training run directory (model.pt)")
    p.add_argument("--out", required=True, help="output directory: a path or URI")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--write-back", dest="write_back", metavar="SOMA_URI",
                        help="SOMA experiment to write into: a path or URI, created if "
                        "missing (default: the store's source experiment; required for "
                        "Census stores)")
    target.add_argument("--no-write-back", dest="write_back", action="store_const",
                        const=False, help="write only EMB: nothing into the store or a SOMA "
                        "experiment")
    p.add_argument("--config", help="YAML file with EmbedConfig keys")
    p.add_argument("--workers", type=int,
                   help=f"Ray actors ({default_help(EmbedConfig, 'workers')})")
    p.add_argument("--cells", type=int,
                   help=f"cells per donor ({default_help(EmbedConfig, 'cells')})")
    p.add_argument("--mode", choices=["random", "centrality", "all"],
                   help=f"cell choice ({default_help(EmbedConfig, 'mode')})")
    p.add_argument("--run-name", dest="run_name", help="name of the written-back results")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an existing embedding folder (nothing else)")
    p.set_defaults(run=_run_embed)


def _run_embed(args: argparse.Namespace) -> None:
    from sampleclr_scale.embed.config import EmbedConfig
    from sampleclr_scale.embed.embedder import embed

    config = _load(EmbedConfig, args)
    result = embed(args.store, args.checkpoint, args.out, config, write_back=args.write_back)
    print(json.dumps({"out": str(result.out), "donors": result.n_donors,
                      "donors_per_s": result.donors_per_s, "write_back": result.write_back},
                     indent=2))


# --- evaluate ---------------------------------------------------------------------------

def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="SPARE metrics against baselines, report with plots",
                       description="Score donor embeddings with the SPARE metrics (kNN "
                       "information retention, batch mixing, trajectory, replicates) next to "
                       "pseudobulk, cell-type composition, random vectors and GloScope.")
    p.add_argument("--embeddings", nargs="+", required=True,
                   help="embedding directories (from embed); NAME=PATH to name one; "
                   "NAME_seedN runs are averaged")
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True, help="report directory: a path or URI")
    p.add_argument("--config", help="YAML file with EvaluateConfig keys (covariates)")
    p.add_argument("--runs", nargs="*", default=None,
                   help="training runs whose curves to draw (default: from provenance)")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> None:
    from sampleclr_scale.evaluate import EvaluateConfig, evaluate, headline
    from sampleclr_scale.storage import Location

    config = EvaluateConfig.from_yaml(args.config) if args.config else EvaluateConfig()
    metrics = evaluate(args.embeddings, args.store, args.out, config, run_dirs=args.runs)
    print(headline(metrics))
    print(f"report: {Location(args.out) / 'report.md'}")


# --- search -----------------------------------------------------------------------------

def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="the atlas donors nearest to query donors",
                       description="Find the K nearest donors of an atlas's embeddings to "
                       "each query donor (cosine), through an index built once and saved in "
                       "ATLAS/search_index (rebuilt when the embeddings change); write "
                       "donors, distances and metadata as neighbours.parquet and .h5ad.")
    p.add_argument("atlas", help="the atlas's embedding folder (from embed)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--query", help="embedding folder of new donors, embedded with the "
                       "atlas's model (ingest --features-like, embed --checkpoint)")
    query.add_argument("--donors", nargs="+", help="ids of atlas donors to query")
    p.add_argument("--k", type=int, default=10, help="neighbours per query donor (default 10)")
    p.add_argument("--out", required=True, help="result folder: a path or URI")
    p.add_argument("--rebuild", action="store_true", help="rebuild the index even if current")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier result folder")
    p.set_defaults(run=_run_search)


def _run_search(args: argparse.Namespace) -> None:
    from sampleclr_scale.search import search_donors

    result = search_donors(args.atlas, query=args.query, donors=args.donors, k=args.k,
                           rebuild=args.rebuild)
    where = result.write(args.out, overwrite=args.overwrite)
    print(json.dumps({"out": str(where), "queries": int(result.table["query"].nunique()),
                      "k": result.info["k"], "index_built": result.info["index_built"]},
                     indent=2))


# --- simulate ---------------------------------------------------------------------------

def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="write the built-in simulated cohort",
                       description="Simulate a donor cohort (Census-like obs schema) and write "
                       "it as a SOMA experiment, a Census-shaped SOMA collection, or .h5ad.")
    p.add_argument("--out", required=True, help="path to write")
    p.add_argument("--format", choices=["soma", "census", "h5ad"], default="soma")
    p.add_argument("--donors", type=int, default=200)
    p.add_argument("--min-cells", type=int, default=200)
    p.add_argument("--max-cells", type=int, default=3000)
    p.add_argument("--genes", type=int, default=200)
    p.add_argument("--dim", type=int, default=32, help="width of the obsm embedding")
    p.add_argument("--scenario", choices=["mixed", "shape", "composition", "realistic"],
                   default="mixed",
                   help="what severity changes: composition and within-type states (mixed), "
                   "only the shape of within-type state distributions (shape), only "
                   "composition (composition), or composition, one type's mean state and "
                   "another's split (realistic); each with its default effect sizes and "
                   "site effects (composition and realistic: per-cell-type site effects)")
    p.add_argument("--site-effect", type=float,
                   help="additive technical shift per site (default: the scenario's)")
    p.add_argument("--site-composition", type=float,
                   help="sd of a technical per-site change of cell-type log-proportions "
                   "(default: the scenario's)")
    p.add_argument("--site-type-effect", type=float,
                   help="sd of a shift per (site, cell type) (default: the scenario's)")
    p.add_argument("--site-gain", type=float,
                   help="sd of a log gain per (site, feature) (default: the scenario's)")
    p.add_argument("--confounding", type=float,
                   help="probability that a donor of the top severity level is put in "
                   "site 0 (a confounded design; default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_simulate)


def _run_simulate(args: argparse.Namespace) -> None:
    from sampleclr_scale.simulate import cohorts as synthetic

    optional = ("site_effect", "site_composition", "site_type_effect", "site_gain",
                "confounding")
    overrides = {name: getattr(args, name) for name in optional
                 if getattr(args, name) is not None}
    spec = synthetic.CohortSpec.for_scenario(
        args.scenario, n_donors=args.donors, min_cells=args.min_cells,
        max_cells=args.max_cells, n_genes=args.genes, embedding_dim=args.dim,
        seed=args.seed, **overrides)
    if args.format == "h5ad":
        where = synthetic.write_h5ad(spec, args.out)
    else:
        where = synthetic.write_soma(spec, args.out, census_like=args.format == "census")
    print(where)


# --- bench ------------------------------------------------------------------------------

def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the built-in simulated cohort",
                       description="Simulate a cohort, write it as a SOMA experiment, ingest "
                       "it, build the GloScope prior, train SampleCLR with it (unsupervised; "
                       "supervised on severity), embed every donor, write back, evaluate "
                       "against the baselines and write a report. Local Ray, CPU only.")
    p.add_argument("--out", required=True, help="directory for everything the demo writes")
    p.add_argument("--donors", type=int, default=200)
    p.add_argument("--workers", type=int, default=2, help="Ray training workers and actors")
    p.add_argument("--epochs", type=int, default=40, help="contrastive epochs per model (40: "
                   "what the defaults were chosen at)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from sampleclr_scale.demo import run_demo

    run_demo(Path(args.out), n_donors=args.donors, workers=args.workers, epochs=args.epochs,
             seed=args.seed)


# --- pipeline ---------------------------------------------------------------------------

def _add_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="run a recipe: every stage on one cohort",
                       description="Run a recipe (YAML, keys of PipelineConfig; see pipelines/) "
                       "into OUT: ingest, prior, train, embed every donor, write back, "
                       "evaluate. Stages whose output is complete are kept, so a re-run "
                       "resumes.")
    p.add_argument("recipe", help="recipe YAML file, e.g. pipelines/census_pbmc_covid.yaml")
    p.add_argument("--out", required=True, help="directory for everything the run writes")
    p.add_argument("--source",
                   help="source instead of the recipe's (e.g. census:PATH for a local copy)")
    p.add_argument("--workers", type=int, help="Ray training workers and embedding actors")
    p.add_argument("--epochs", type=int,
                   help="epochs of each training stage (contrastive and supervised), "
                        "exactly: no minimum of supervised steps")
    p.set_defaults(run=_run_pipeline)


def _run_pipeline(args: argparse.Namespace) -> None:
    from sampleclr_scale.pipeline import PipelineConfig, run_pipeline

    run_pipeline(PipelineConfig.from_yaml(args.recipe), args.out, source=args.source,
                 workers=args.workers, epochs=args.epochs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sampleclr-scale``."""
    parser = argparse.ArgumentParser(
        prog="sampleclr-scale",
        description="Atlas-scale SampleCLR: one vector per donor from millions of cells.",
        epilog="Stores (--store), run directories (--out, --checkpoint), embeddings and "
        "reports are local paths or URIs (s3://BUCKET/..., gs://...), so one command runs on a "
        "laptop and on a cluster whose nodes share a bucket; credentials come from the usual "
        "environment (AWS_*, ~/.aws, an IAM role).",
    )
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true",
                          help="warnings and errors only, no progress bars")
    loudness.add_argument("-v", "--verbose", action="store_true",
                          help="debug logging, Ray's worker output on the console")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_simulate, _add_ingest, _add_check, _add_prior, _add_train, _add_embed,
                _add_evaluate, _add_search, add_bench, _add_pipeline, _add_demo):
        add(sub)
    return parser


_CREDENTIAL_ERRORS = frozenset({"NoCredentialsError", "PartialCredentialsError",
                                "CredentialRetrievalError", "DefaultCredentialsError"})
"""botocore's and google-auth's errors for missing object-storage credentials."""


def _credentials_error(err: Exception) -> InputError | None:
    """Missing credentials for ``s3://`` or ``gs://`` as an :class:`InputError`; None for
    any other error (a bug, shown with its traceback)."""
    if type(err).__name__ not in _CREDENTIAL_ERRORS:
        return None
    return InputError(f"no credentials for object storage: {err}",
                      "for s3:// set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                      "AWS_PROFILE); for gs:// set GOOGLE_APPLICATION_CREDENTIALS")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; bad input prints the problem and the fix and exits with status 2."""
    args = build_parser().parse_args(argv)
    from sampleclr_scale import console

    console.configure("quiet" if args.quiet else "verbose" if args.verbose else "normal")
    try:
        args.run(args)
    except SystemExit:
        from sampleclr_scale.cluster import terminated_by

        signum = terminated_by()
        if signum is None:
            raise
        print(f"sampleclr-scale {args.command}: stopped by signal {signum} (SIGTERM); its "
              "output is untouched (a training run continues with --resume)", file=sys.stderr)
        return 128 + signum
    except Exception as err:
        shown = (err if isinstance(err, InputError) else path_error(err)
                 if isinstance(err, OSError) else _credentials_error(err))
        if shown is None:
            raise
        print(f"sampleclr-scale {args.command}: error: {shown}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
