"""Recipes: one YAML file runs a cohort through every stage into one output directory.

A recipe (:class:`PipelineConfig`) names a source and the settings of each stage:
ingest -> prior -> train (one or more models) -> embed every donor (+ write back) ->
evaluate. :func:`run_pipeline` runs it into ``OUT``::

    OUT/bags.zarr                 the bag store (and its prior, embeddings written back)
    OUT/runs/MODEL/               one training run per model
    OUT/embeddings/LABEL/         one embedding per model and cell-choice mode
    OUT/report/                   metrics.json, report.md, figures
    OUT/WRITE_BACK                the SOMA experiment written back to (Census recipes;
                                  nothing is written back with write_back: false)

Each stage is skipped when its output is complete, so a re-run resumes where the last one
stopped; the evaluation always runs. The demo (:mod:`sampleclr_scale.demo`) is a recipe
built in code for the simulated cohort.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, field_validator, model_validator

from sampleclr_scale.config import IngestConfig, StageConfig, TrainConfig, is_census
from sampleclr_scale.embed.config import (
    NO_WRITE_BACK_FIX,
    EmbedConfig,
    valid_run_name,
    valid_write_back,
)
from sampleclr_scale.embed.selection import SelectionMode
from sampleclr_scale.evaluate.config import EvaluateConfig
from sampleclr_scale.prior.config import PriorConfig
from sampleclr_scale.storage import Location

STORE_DIR = "bags.zarr"
RUNS_DIR = "runs"
EMBEDDINGS_DIR = "embeddings"
REPORT_DIR = "report"
"""Where :func:`run_pipeline` writes each stage's output, relative to ``OUT``."""

PIPELINE_STAGES = ("ingest", "prior", "train", "embed", "evaluate", "done")
"""The stages :func:`run_pipeline` announces, in order."""


class ModelRecipe(StageConfig):
    """One SampleCLR model of a recipe: its training settings and how it embeds donors."""

    train: dict[str, Any] = Field(default_factory=dict)
    """TrainConfig keys of this model, merged over the recipe's shared ``train`` (nested
    mappings such as ``loss`` or ``loader`` key by key)."""
    embed_modes: list[SelectionMode] = Field(default_factory=lambda: ["random"], min_length=1)
    """Cell choices to embed every donor with (EmbedConfig ``mode``); the first embedding
    is named after the model, the others ``MODEL_MODE``."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if len(set(self.embed_modes)) != len(self.embed_modes):
            raise ValueError(f"embed_modes must be unique: {self.embed_modes}")
        return self

    def labels(self, model: str) -> dict[str, SelectionMode]:
        """The embedding names of model ``model`` and their cell choice."""
        first, *others = self.embed_modes
        return {model: first, **{f"{model}_{mode}": mode for mode in others}}


class PipelineConfig(StageConfig):
    """A recipe: a cohort from a source through every stage, with each stage's settings."""

    name: str
    """Name of the recipe (printed in the stage headers)."""
    source: str
    """SOMA experiment URI, ``.h5ad`` path, or ``census[:VERSION_OR_URI]``; the ``source``
    argument of :func:`run_pipeline` (``--source``) overrides it, e.g. with
    ``census:PATH`` for a Census-shaped local copy."""
    ingest: dict[str, Any] = Field(default_factory=dict)
    """IngestConfig keys except ``source`` and ``out`` (obs_filter, features, meta,
    cell_columns, min_cells, stratify, ...)."""
    prior: PriorConfig | None = None
    """Donor-similarity prior built into the store before training: PriorConfig keys, or
    just its kind (``prior: gloscope``) for the default settings; a model's
    ``loss.prior`` must then name its kind (or none). None builds the priors that the
    models' losses name (the default X-CLR loss: GloScope), with the default settings."""
    train: dict[str, Any] = Field(default_factory=dict)
    """TrainConfig keys shared by every model."""
    models: dict[str, ModelRecipe] = Field(
        default_factory=lambda: {"sampleclr": ModelRecipe()}, min_length=1)
    """The models trained, by name (their run directory and embedding name)."""
    embed: dict[str, Any] = Field(default_factory=dict)
    """EmbedConfig keys shared by every embedding (``mode`` and ``run_name`` are set per
    embedding)."""
    evaluate: dict[str, Any] = Field(default_factory=dict)
    """EvaluateConfig keys: the relevant, technical and trajectory covariates."""
    write_back: str | Literal[False] | None = None
    """SOMA experiment the embeddings are written back to: a path relative to ``OUT`` (or
    a URI); None writes into the source experiment; false writes nothing back (neither
    the store's ``embeddings/`` nor an experiment: the embedding folders only, as
    ``embed --no-write-back``). Census is read-only, so a Census recipe must name a
    separate experiment here (created if missing) or set false."""

    @field_validator("prior", mode="before")
    @classmethod
    def _prior_kind(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> Self:
        fixed = sorted({"source", "out"} & set(self.ingest))
        if fixed:
            raise ValueError(f"ingest cannot set {fixed}: the recipe's source and OUT do")
        if is_census(self.source) and self.write_back is None:
            raise ValueError("Census is read-only: set write_back to a separate local SOMA "
                             "experiment (a path relative to OUT), or false")
        if isinstance(self.write_back, str) and not valid_write_back(self.write_back):
            raise ValueError(f"write_back {self.write_back!r} is not a SOMA experiment path "
                             f"or URI: {NO_WRITE_BACK_FIX}")
        self.ingest_config(STORE_DIR)
        self.evaluate_config()
        for model, recipe in self.models.items():
            for label, mode in recipe.labels(model).items():
                if not valid_run_name(label):
                    raise ValueError(f"model name {model!r} cannot name embedding {label!r}")
                self.embed_config(label, mode)
            prior = self.train_config(model).loss.store_prior
            if self.prior is not None and prior not in (None, self.prior.kind):
                raise ValueError(f"model {model!r} trains with the {prior} prior, but the "
                                 f"recipe builds {self.prior.kind}: set prior: {prior}")
        return self

    def priors(self) -> list[PriorConfig]:
        """The priors built into the store before training: the recipe's, or those the
        models' losses name (default settings)."""
        if self.prior is not None:
            return [self.prior]
        kinds = {self.train_config(model).loss.store_prior for model in self.models}
        return [PriorConfig(kind=kind) for kind in sorted(kinds - {None})]

    def with_source(self, source: str) -> PipelineConfig:
        """The same recipe reading ``source`` (validated again)."""
        return type(self).from_mapping({**self.model_dump(), "source": source},
                                       where=f"recipe {self.name} with source {source}")

    def ingest_config(self, store: str) -> IngestConfig:
        """The ingest settings, writing the bag store ``store``."""
        return IngestConfig.from_mapping({**self.ingest, "source": self.source, "out": store},
                                         where=f"ingest of recipe {self.name}")

    def train_config(self, model: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Training settings of ``model``: shared keys, the model's, then ``overrides``."""
        values = _merge(_merge(self.train, self.models[model].train), overrides or {})
        return TrainConfig.from_mapping(values, where=f"train of model {model}")

    def embed_config(self, label: str, mode: SelectionMode,
                     overrides: dict[str, Any] | None = None) -> EmbedConfig:
        """Settings of embedding ``label`` with cell choice ``mode``, then ``overrides``."""
        values = {**self.embed, **(overrides or {}), "mode": mode, "run_name": label}
        return EmbedConfig.from_mapping(values, where=f"embed {label}")

    def evaluate_config(self) -> EvaluateConfig:
        """The evaluation settings."""
        return EvaluateConfig.from_mapping(self.evaluate, where=f"evaluate of {self.name}")


@dataclass(frozen=True)
class Headers:
    """Console stage headers ``== i/N text``.

    Attributes
    ----------
    before : tuple of str
        Stages of the caller announced before the pipeline's (the demo's ``simulate``).
    """

    before: tuple[str, ...] = ()

    def __call__(self, stage: str, text: str) -> None:
        """Print the header of ``stage`` (one of ``before`` or :data:`PIPELINE_STAGES`)."""
        stages = (*self.before, *PIPELINE_STAGES)
        print(f"\n== {stages.index(stage) + 1}/{len(stages)} {text}", flush=True)


def run_pipeline(config: PipelineConfig, out: str | os.PathLike | Location, *,
                 source: str | None = None, workers: int | None = None,
                 epochs: int | None = None, headers: Headers | None = None,
                 in_process: bool = False) -> dict[str, Any]:
    """Run a recipe into ``out``, skipping every stage whose output is complete.

    Parameters
    ----------
    config : PipelineConfig
        The recipe.
    out : str, path or Location
        Output directory: a local path or a URI (``s3://...``); see the module docstring
        for its layout.
    source : str, optional
        Read this source instead of the recipe's (e.g. ``census:PATH`` offline).
    workers : int, optional
        Ray Train workers and embedding actors, instead of the recipe's.
    epochs : int, optional
        Epochs of each training stage (contrastive, and supervised for models with
        tasks), instead of the recipe's, exactly (``supervised_min_steps`` 0); for quick
        runs.
    headers : Headers, optional
        Prints the stage headers; the caller's own stages may come first.
    in_process : bool
        Train each model in this process (one worker, no Ray Train), e.g. for many
        small runs; embedding still uses Ray actors.

    Returns
    -------
    dict
        The evaluation metrics (what :func:`sampleclr_scale.evaluate.evaluate` returns).

    Raises
    ------
    InputError
        For an invalid recipe after the overrides, or bad input found by a stage.
    """
    from sampleclr_scale.evaluate import headline

    begin = time.perf_counter()
    if source is not None:
        config = config.with_source(source)
    run = _Run(config, Location(out), headers or Headers(), in_process,
               train_overrides={key: value for key, value in {
                   "workers": workers, "epochs": epochs, "supervised_epochs": epochs,
                   "supervised_min_steps": None if epochs is None else 0}.items()
                   if value is not None},
               embed_overrides={"workers": workers} if workers is not None else {})
    n_train = run.ingest()
    run.prior()
    runs, embeddings = [], []
    for model in config.models:
        runs.append(run.train(model, n_train))
        embeddings.extend(run.embed(model))
    metrics, report = run.evaluate(embeddings, runs)
    run.header("done", "done")
    print(headline(metrics))
    print(f"\nreport: {report / 'report.md'}   ({time.perf_counter() - begin:.0f} s)")
    return metrics


@dataclass(frozen=True)
class _Run:
    """The stages of one :func:`run_pipeline` call; each skips an output already there."""

    config: PipelineConfig
    out: Location
    header: Headers
    in_process: bool
    train_overrides: dict[str, Any]
    """Overrides of every model's training settings."""
    embed_overrides: dict[str, Any]
    """Overrides of every embedding's settings."""

    @property
    def store(self) -> Location:
        return self.out / STORE_DIR

    def ingest(self) -> int:
        """Ingest the source into the bag store; the number of training donors."""
        from sampleclr_scale.ingest.stage import ingest
        from sampleclr_scale.store.bag_store import BagStore

        config = self.config
        self.header("ingest", f"{config.name}: ingest {config.source} -> bag store {self.store}")
        if not self.store.exists():
            ingest(config.ingest_config(str(self.store)))
        store = BagStore(self.store)
        n_train = len(store.split_donors("train"))
        print(f"   {store.n_cells:,} cells of {store.n_donors} donors ({n_train} for "
              f"training), d = {store.dim}")
        return n_train

    def prior(self) -> None:
        """Build the recipe's priors into the store, unless they are there."""
        from sampleclr_scale.prior.build import ensure_prior

        for prior in self.config.priors():
            self.header("prior", f"{prior.kind} prior between donors (Ray tasks)")
            ensure_prior(str(self.store), prior)

    def train(self, model: str, n_train: int) -> str:
        """Train ``model`` (resuming an interrupted run); its run directory."""
        from sampleclr_scale.train.artifact import MODEL_FILE
        from sampleclr_scale.train.driver import CONFIG_FILE, train

        run_dir = self.out / RUNS_DIR / model
        train_config = _fit_batch(self.config, model, self.train_overrides, n_train)
        where = ("in this process" if self.in_process
                 else f"with {train_config.workers} Ray Train workers")
        self.header("train", f"train {model} {where} -> {run_dir}")
        if not (run_dir / MODEL_FILE).exists():
            train(str(self.store), str(run_dir), train_config,
                  resume=(run_dir / CONFIG_FILE).exists(), in_process=self.in_process)
        return str(run_dir)

    def embed(self, model: str) -> list[str]:
        """Embed every donor with ``model``, once per cell choice; the embeddings."""
        from sampleclr_scale.embed.embedder import complete_write_back, embed

        config = self.config
        write_back = config.write_back
        if isinstance(write_back, str):
            write_back = _resolve(self.out, write_back)
        back = "" if write_back is False else ", write back"
        embeddings = []
        for label, mode in config.models[model].labels(model).items():
            emb_dir = self.out / EMBEDDINGS_DIR / label
            self.header("embed", f"embed every donor with {model} ({mode} cells){back} "
                        f"-> {emb_dir}")
            settings = config.embed_config(label, mode, self.embed_overrides)
            if not emb_dir.exists():
                embed(str(self.store), str(self.out / RUNS_DIR / model), str(emb_dir),
                      settings, write_back=write_back)
            else:  # a write-back that a killed run left unfinished is finished now
                complete_write_back(str(self.store), str(self.out / RUNS_DIR / model),
                                    str(emb_dir), settings, write_back=write_back)
            embeddings.append(str(emb_dir))
        return embeddings

    def evaluate(self, embeddings: list[str], runs: list[str]) -> tuple[dict[str, Any], Location]:
        """Score the embeddings against the baselines; the metrics and the report folder."""
        from sampleclr_scale.evaluate import evaluate
        from sampleclr_scale.prior.storage import available_priors

        report = self.out / REPORT_DIR
        gloscope = ", GloScope" if "gloscope" in available_priors(str(self.store)) else ""
        self.header("evaluate", f"evaluate against pseudobulk, composition, random{gloscope} "
                    f"-> {report}")
        metrics = evaluate(embeddings, str(self.store), str(report),
                           self.config.evaluate_config(), run_dirs=runs)
        return metrics, report


def _fit_batch(config: PipelineConfig, model: str, overrides: dict[str, Any],
               n_train: int) -> TrainConfig:
    """``model``'s training settings with the per-worker batch cut to fit the cohort.

    A global batch larger than the training donors would repeat donors within a batch
    (as each other's negatives), so the batch is at most ``n_train // workers`` donors
    (and at least 2).
    """
    train_config = config.train_config(model, overrides)
    batch = max(2, min(train_config.worker_batch, n_train // train_config.workers))
    if batch == train_config.worker_batch:
        return train_config
    print(f"   {model}: {batch} donors per worker batch ({n_train} training donors)")
    return config.train_config(model, _merge(overrides, {"loader": {"batch_size": batch}}))


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``update``, nested mappings merged key by key."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve(out: Location, where: str) -> str:
    """A path relative to ``out`` (absolute paths and URIs unchanged)."""
    return where if "://" in where or Path(where).is_absolute() else str(out / where)
