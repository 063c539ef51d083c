"""Embed every donor of a bag store with a trained SampleCLR model, on Ray actors.

Each donor is represented by a deterministic set of its cells
(:func:`~sampleclr_scale.embed.selection.select_cells`, as ``EmbedConfig.mode`` says) and
embedded by the model in eval mode: no dropout, no sampling noise, so the same store,
model and config always give the same vectors.

Parallelism: a ``ray.util.ActorPool`` of ``workers`` actors, each loading the model once
in its constructor and holding the store open. A task is a run of consecutive donor
positions (``batch_donors`` of them): the actor reads each donor's rows with one range
read, selects the cells, runs one padded forward pass and returns ``z``, every head's
weight of every chosen cell, and the chosen rows. An actor pool rather than Ray Data:
the model is loaded once per actor, results are small (a few vectors per donor) and come
back in task order (so the output files are deterministic and written as a stream),
and there is no dataset planning or object spilling to pay for.

Outputs, in ``out`` (built in a temporary sibling and published atomically):

- ``donor_embeddings.parquet``: ``donor_index`` (int64, the store's donor position), the
  store's donor table (``donor``, key and metadata columns, ``n_cells``, ``split``) and
  ``z`` (``fixed_size_list<float32>[D]``).
- ``donor_embeddings.h5ad``: AnnData with donors as rows, ``X = z``, ``obs`` = the donor
  table and the prediction columns below (``obs_names`` = ``donor``);
  ``uns["sampleclr_provenance"]`` is the provenance as JSON text.
- ``cell_weights.parquet``: one row per chosen cell (repeats kept for donors with fewer
  than ``m`` cells): ``donor_index``, ``store_row``, ``source_joinid`` (int64) and
  ``head_0 .. head_{H-1}`` (float32, the cell's weight in the donor's bag per head).
- ``predictions.parquet`` (a model with supervised heads only; nothing for one without):
  ``donor_index``, ``donor`` and, per task, ``<task>_pred`` (the predicted class or
  ordinal level as its donor-table value, a regression value in the target's units) and
  ``<task>_p_<class>`` (class or level probabilities), computed from the heads' outputs
  of the same forward pass as ``z`` (:mod:`~sampleclr_scale.embed.predictions`).
- ``provenance.json``: checkpoint, store, source, config, model config, the model's
  feature-spec record (``feature_spec``, compared by ``search``), the tasks
  (``tasks``: column, kind, weight, classes, target mean and std), versions, time.

:func:`embed` then writes the results back (:mod:`~sampleclr_scale.embed.writeback`),
unless told not to (``write_back=False``); :func:`run_embedding` computes the outputs
only.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sampleclr_scale.cluster import ensure_ray
from sampleclr_scale.console import progress
from sampleclr_scale.embed import writeback
from sampleclr_scale.embed.config import (
    CELLS_PARQUET,
    DONORS_H5AD,
    DONORS_PARQUET,
    EMBEDDINGS,
    PREDICTIONS_PARQUET,
    PROVENANCE_FILE,
    EmbedConfig,
    check_run_name,
)
from sampleclr_scale.embed.predictions import check_prediction_columns, predictions_table
from sampleclr_scale.embed.worker import EmbeddedBatch, EmbedWorker, training_balance
from sampleclr_scale.errors import InputError
from sampleclr_scale.model.config import ModelConfig
from sampleclr_scale.storage import Location, staged_output
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.composition import (
    COMPOSITION_COLUMN,
    LearnedReference,
    composition_channel,
    composition_positions,
    donor_type_counts,
)
from sampleclr_scale.store.feature_spec import check_same_space
from sampleclr_scale.train.artifact import load_model
from sampleclr_scale.train.setup import TaskInfo, head_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedResult:
    """Where the embedding stage wrote what, and how fast it ran."""

    out: Location
    donor_embeddings: Location
    h5ad: Location
    cell_weights: Location
    provenance: Location
    n_donors: int
    n_cells: int
    """Rows of ``cell_weights.parquet``."""
    startup_seconds: float
    """Ray start and actor construction (model loading)."""
    seconds: float
    """From the first task to the last result (selection, reads, forward passes)."""
    donors_per_s: float
    predictions: Location | None = None
    """``predictions.parquet``; None for a model without supervised heads."""
    write_back: dict[str, str] = field(default_factory=dict)
    """Where the results were written back: ``store`` and/or ``soma`` -> location (empty
    with ``write_back=False``)."""


def embed(store_path: str | Path, run_dir: str | Path, out: str | Path, config: EmbedConfig,
          write_back: str | Literal[False] | None = None, *,
          in_process: bool = False) -> EmbedResult:
    """Embed every donor, write the outputs to ``out``, then write the results back.

    Parameters
    ----------
    store_path
        The bag store.
    run_dir
        The training run whose ``model.pt`` embeds the donors.
    out
        Output directory (see the module docstring); published atomically.
    config
        Selection, parallelism and naming.
    write_back
        SOMA experiment URI to write the results into (see
        :func:`~sampleclr_scale.embed.writeback.soma_target` for the default); the results
        are then also written into the store, under ``embeddings/<run>``. False writes
        nothing back (``--no-write-back``): only ``out``.
    in_process
        Embed in this process without Ray (``config.workers`` is not used), as a notebook
        does; the outputs are the same as the actors'.

    Returns
    -------
    EmbedResult
        Paths, timing and the write-back locations.

    Raises
    ------
    InputError
        For a Census-sourced store without ``write_back`` (Census is read-only) or a
        ``write_back`` that names no experiment (``none``, ...), before any work is done;
        for a model that does not fit the store.

    Examples
    --------
    Continuing the example of :func:`~sampleclr_scale.train.driver.train`, without Ray
    and without writing back:

    >>> import anndata
    >>> from sampleclr_scale.stages import embed
    >>> result = embed(f"{tmp}/bags.zarr", f"{tmp}/run", f"{tmp}/embeddings",
    ...                scs.EmbedConfig(cells=200), write_back=False, in_process=True)
    >>> donors = anndata.read_h5ad(result.h5ad)
    >>> donors.shape, "severity_pred" in donors.obs  # 32 learned + 10 composition dims
    ((24, 42), True)
    """
    if write_back is False:
        return run_embedding(store_path, run_dir, out, config, in_process)
    store, run, target = _write_back_plan(store_path, run_dir, config, write_back)
    result = run_embedding(store_path, run_dir, out, config, in_process)
    return replace(result, write_back=_write_back(result.out, store, run, target))


def _write_back_plan(store_path: str | Path, run_dir: str | Path, config: EmbedConfig,
                     write_back: str | None) -> tuple[BagStore, str, str | None]:
    """The store, the run name and the SOMA experiment (None: none) of a write-back;
    refused before any work where they are wrong."""
    store = BagStore(store_path)
    run = check_run_name(config.run_name or Location(run_dir).name)
    target = writeback.soma_target(store, write_back)
    if target is not None:
        writeback.check_soma_target(target)
    return store, run, target


def _write_back(out: Location, store: BagStore, run: str, target: str | None,
                only_missing: bool = False) -> dict[str, str]:
    """Write the results in ``out`` back into the store and ``target``: where they are
    not completely written yet, with ``only_missing``. Where they went."""
    locations = {}
    if not (only_missing and writeback.has_run(store.location, run)):
        locations["store"] = str(writeback.write_back_store(out, store.location, run))
    if target is not None and not (only_missing and writeback.has_run(target, run)):
        locations["soma"] = writeback.write_back_soma(out, target, run)
    if locations:
        log.info("results %r written back to %s", run, ", ".join(locations.values()))
    return locations


def complete_write_back(store_path: str | Path, run_dir: str | Path, out: str | Path,
                        config: EmbedConfig, write_back: str | Literal[False] | None = None
                        ) -> dict[str, str]:
    """Finish the write-back of an existing embedding folder ``out`` where an interrupted
    :func:`embed` left it missing or incomplete (arguments as for :func:`embed`); where
    it wrote (nothing where every write-back is complete)."""
    if write_back is False:
        return {}
    store, run, target = _write_back_plan(store_path, run_dir, config, write_back)
    return _write_back(Location(out), store, run, target, only_missing=True)


def _with_composition(store: BagStore, z: np.ndarray, artifact: dict[str, Any]) -> np.ndarray:
    """``z`` with the composition channel of a model trained with one
    (:func:`~sampleclr_scale.store.composition.composition_channel`; the weight saved with
    the model, the learned block standardised by the model's learned reference where it
    has one); unchanged, with a warning, for a store without ``cell_type`` codes."""
    weight = _saved_channel_weight(artifact)
    if weight <= 0:
        return z
    if COMPOSITION_COLUMN not in store.code_columns:
        log.warning("no composition channel: the store %s has no %s codes (ingest with "
                    "--cell-columns %s to add it)", store.location, COMPOSITION_COLUMN,
                    COMPOSITION_COLUMN)
        return z
    record = artifact.get("learned_reference")
    log.info("appending the composition channel (weight %g, %s) to the learned vector %s",
             weight, "CLR centred per batch" if store.donor_batch is not None else "CLR",
             "unit-norm" if record is None else "standardised by the training donors")
    counts = donor_type_counts(store, COMPOSITION_COLUMN)
    return composition_channel(z, counts, store.donor_batch, weight,
                               None if record is None else LearnedReference.from_record(record))


def _saved_channel_weight(artifact: dict[str, Any]) -> float:
    """The weight a model's run gave its composition channel: saved with the model (the
    prior's choice for ``composition_channel: auto``), or, in a model saved before the
    weight was, its run's ``composition_channel``."""
    saved = artifact.get("channel_weight")
    if saved is not None:
        return float(saved["weight"])
    return float((artifact.get("train_config") or {}).get("composition_channel", 0.0))


def run_embedding(store_path: str | Path, run_dir: str | Path, out: str | Path,
                  config: EmbedConfig, in_process: bool = False) -> EmbedResult:
    """Embed every donor and write the outputs to ``out``, without writing back.

    ``in_process`` embeds in this process, with no Ray (one :class:`EmbedWorker`, not
    an actor; ``config.workers`` is not used); the outputs are the same.
    """
    store = BagStore(store_path)
    model, artifact = load_model(run_dir)
    _check_fits(store, artifact, model.config, run_dir)
    composition = head_inputs(store, model.config)  # read once, here, for every worker
    tasks = [list(range(a, min(a + config.batch_donors, store.n_donors)))
             for a in range(0, store.n_donors, config.batch_donors)]
    begin = time.perf_counter()
    workers = _local_results if in_process else _actor_results
    with workers(store, run_dir, config, tasks, composition) as results:
        startup = time.perf_counter() - begin
        log.info("embedding %d donors %s (%s, %d cells per donor)", store.n_donors,
                 "in this process" if in_process else f"with {config.workers} actors",
                 config.mode, config.cells)
        with staged_output(out, config.overwrite, kind=EMBEDDINGS,
                           inputs=[store.location, run_dir]) as staging:
            staging.mkdir()
            start = time.perf_counter()
            z = np.zeros((store.n_donors, model.config.output_dim), dtype=np.float32)
            outputs: dict[str, np.ndarray] = {}
            n_cells = _write_cells(results, z, outputs, staging / CELLS_PARQUET)
            _check_finite(store, z, outputs, run_dir)
            z = _with_composition(store, z, artifact)
            seconds = time.perf_counter() - start
            provenance = _provenance(store, run_dir, config, artifact, n_cells, seconds)
            _write_donors(staging, store, z, provenance, artifact["tasks"], outputs)
    out = Location(out)
    rate = store.n_donors / max(seconds, 1e-9)
    log.info("embedded %d donors in %.1f s (%.1f donors/s) into %s", store.n_donors, seconds,
             rate, out)
    return EmbedResult(out, out / DONORS_PARQUET, out / DONORS_H5AD, out / CELLS_PARQUET,
                       out / PROVENANCE_FILE, store.n_donors, n_cells, round(startup, 3),
                       round(seconds, 3), round(rate, 1),
                       out / PREDICTIONS_PARQUET if artifact["tasks"] else None)


@contextlib.contextmanager
def _actor_results(store: BagStore, run_dir: str | Path, config: EmbedConfig,
                   tasks: list[list[int]], composition: torch.Tensor | None
                   ) -> Iterator[Iterator[EmbeddedBatch]]:
    """The tasks' results, in task order, from a pool of Ray actors (ready when this
    yields; killed after); ``composition`` (the heads' inputs) is put in the object store
    once."""
    import ray
    from ray.util import ActorPool

    ensure_ray()
    actor = ray.remote(EmbedWorker).options(num_cpus=1, num_gpus=int(config.use_gpu))
    shared = ray.put(composition)
    actors = [actor.remote(store.location.uri, Location(run_dir).uri,
                           config.model_dump(mode="json"), composition=shared)
              for _ in range(min(config.workers, len(tasks)))]
    try:
        ray.get([a.ready.remote() for a in actors])
        yield ActorPool(actors).map(lambda a, donors: a.embed.remote(donors), tasks)
    finally:
        for a in actors:
            ray.kill(a)


@contextlib.contextmanager
def _local_results(store: BagStore, run_dir: str | Path, config: EmbedConfig,
                   tasks: list[list[int]], composition: torch.Tensor | None
                   ) -> Iterator[Iterator[EmbeddedBatch]]:
    """The tasks' results, in task order, computed in this process by one
    :class:`EmbedWorker` (the actors' code, without Ray)."""
    worker = EmbedWorker(store.location.uri, Location(run_dir).uri,
                         config.model_dump(mode="json"), limit_threads=False,
                         composition=composition)
    yield (worker.embed(donors) for donors in tasks)


def _check_finite(store: BagStore, z: np.ndarray, outputs: dict[str, np.ndarray],
                  run_dir: str | Path) -> None:
    """Refuse to publish a NaN or infinite vector or head output (the staged output is
    discarded)."""
    bad = ~np.isfinite(z).all(axis=1)
    for values in outputs.values():
        bad |= ~np.isfinite(values).all(axis=1)
    if bad.any():
        donors = store.donors["donor"].iloc[np.flatnonzero(bad)[:3]].tolist()
        raise InputError(f"the model of {run_dir} gives {int(bad.sum())} donors a NaN or "
                         f"infinite embedding (e.g. {donors}); nothing was written",
                         "check the store (`sampleclr-scale check STORE`: non-finite "
                         "features) and retrain the model")


def _check_fits(store: BagStore, artifact: dict[str, Any], model: ModelConfig,
                run_dir: str | Path) -> None:
    """Refuse, before any work, a model whose feature space, input, standardisation,
    balance column, heads' composition or prediction columns do not fit the store."""
    check_same_space(artifact.get("feature_spec"), store.feature_spec, run_dir=str(run_dir),
                     store=str(store.location), trained_on=artifact.get("store"))
    if model.input_dim != store.dim:
        raise InputError(
            f"the model in {run_dir} takes {model.input_dim} features per cell, the "
            f"store {store.location} has {store.dim}",
            "embed with a model trained on this store's features",
        )
    if artifact.get("standardize") == "batch_cell_type" and store.batch_type_maps is None:
        raise InputError(
            f"the model in {run_dir} was trained on features corrected per (batch, cell "
            f"type); the store {store.location} has no such statistics",
            "ingest the store with --batch-key and cell_type codes (--cell-columns cell_type)")
    if artifact.get("standardize") and store.batch_stats is None:
        raise InputError(
            f"the model in {run_dir} was trained on features standardised per technical "
            f"batch; the store {store.location} has no batch statistics",
            "ingest the store with --batch-key (the batch columns of the training store)")
    if training_balance(artifact) is not None:
        store.codes(training_balance(artifact))  # the column the views were balanced over
    if model.head_composition:  # in the driver, before the actors read the codes
        composition_positions(store, model.head_composition)
    check_prediction_columns(artifact["tasks"], ["donor_index", *store.donors.columns],
                             str(run_dir))


def _write_cells(results: Iterator[EmbeddedBatch], z: np.ndarray,
                 outputs: dict[str, np.ndarray], path: Path) -> int:
    """Stream the cell weights to Parquet in task order, fill ``z`` and the head
    ``outputs`` by task (created at the first batch); return the row count."""
    writer: pq.ParquetWriter | None = None
    n_cells = 0
    bar = progress(len(z), "embedding", "donors")
    try:
        for batch in results:
            z[batch.donors] = batch.z
            for name, values in batch.outputs.items():
                outputs.setdefault(name, np.zeros((len(z), values.shape[1]), np.float32))
                outputs[name][batch.donors] = values
            table = _cell_table(batch)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            n_cells += table.num_rows
            bar.update(len(batch.donors))
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return n_cells


def _cell_table(batch: EmbeddedBatch) -> pa.Table:
    """One row per chosen cell: donor, store row, source id, weight per head."""
    columns = {
        "donor_index": pa.array(np.repeat(batch.donors, batch.counts), pa.int64()),
        "store_row": pa.array(batch.store_rows, pa.int64()),
        "source_joinid": pa.array(batch.source_joinids, pa.int64()),
    }
    for h in range(batch.weights.shape[1]):
        columns[f"head_{h}"] = pa.array(batch.weights[:, h], pa.float32())
    return pa.table(columns)


def _write_donors(directory: Path, store: BagStore, z: np.ndarray, provenance: dict[str, Any],
                  tasks: list[TaskInfo], outputs: dict[str, np.ndarray]) -> None:
    """The donor table with ``z`` as Parquet and as h5ad (obs with the predictions), the
    predictions (a model with heads) and the provenance."""
    import anndata

    donors = store.donors.reset_index(drop=True)
    donors.insert(0, "donor_index", np.arange(store.n_donors, dtype=np.int64))
    table = pa.Table.from_pandas(donors, preserve_index=False)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(z.ravel(), pa.float32()), z.shape[1])
    pq.write_table(table.append_column("z", vectors), directory / DONORS_PARQUET)
    text = json.dumps(provenance, indent=2)
    predictions = predictions_table(donors, tasks, outputs)
    if predictions is not None:
        predictions.to_parquet(directory / PREDICTIONS_PARQUET, index=False)
        donors = donors.join(predictions.drop(columns=["donor_index", "donor"]))
    obs = donors.set_axis(pd.Index(donors["donor"].astype(str).to_numpy()), axis=0)
    adata = anndata.AnnData(X=z, obs=obs, uns={"sampleclr_provenance": text})
    adata.write_h5ad(directory / DONORS_H5AD)
    (directory / PROVENANCE_FILE).write_text(text + "\n")


def _version(package: str) -> str | None:
    """An installed package's version, without importing it (None if not installed)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _provenance(store: BagStore, run_dir: str | Path, config: EmbedConfig,
                artifact: dict[str, Any], n_cells: int, seconds: float) -> dict[str, Any]:
    """Where the embeddings come from: model, store, source, settings, versions."""
    return {
        "checkpoint": Location(run_dir).uri,
        "run_name": config.run_name or Location(run_dir).name,
        "store": store.location.uri,
        "store_source": store.attrs.get("source"),
        "store_source_kind": store.attrs.get("source_kind"),
        "donor_key": list(store.attrs.get("donor_key", [])),
        "features": store.attrs.get("features"),
        "feature_spec": artifact.get("feature_spec"),  # the model's; search compares them
        "config": config.model_dump(mode="json"),
        "model_config": artifact["model_config"],
        "tasks": [asdict(task) for task in artifact["tasks"]],
        "trained_on": artifact.get("store"),
        "n_donors": store.n_donors,
        "n_cells": n_cells,
        "seconds": round(seconds, 3),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "ray": _version("ray"), "numpy": np.__version__},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
