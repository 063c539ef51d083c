"""Recipes: one YAML file runs a cohort through every stage into one output directory.

A recipe (:class:`PipelineConfig`) names a source and the settings of each stage:
ingest -> prior -> train (one or more models) -> embed every donor (+ write back) ->
evaluate. :func:`run_pipeline` runs it into ``OUT``::

    OUT/bags.zarr                 the bag store (and its prior, embeddings written back)
    OUT/runs/MODEL/               one training run per model
    OUT/embeddings/LABEL/         one embedding per model and cell-choice mode
    OUT/report/                   metrics.json, report.md, figures
    OUT/WRITE_BACK                the SOMA experiment written back to (Census recipes)

Each stage is skipped when its output is complete, so a re-run resumes where the last one
stopped; the evaluation always runs. The demo (:mod:`sampleclr_scale.demo`) is a recipe
built in code for the simulated cohort.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, model_validator

from sampleclr_scale.config import IngestConfig, StageConfig, TrainConfig, is_census
from sampleclr_scale.embed.config import EmbedConfig, valid_run_name
from sampleclr_scale.embed.selection import SelectionMode
from sampleclr_scale.evaluate.config import EvaluateConfig

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
    prior: Literal["gloscope", "pseudobulk"] | None = None
    """Donor-similarity prior built into the store before training (default settings of
    ``sampleclr-scale prior``); a model's ``loss.prior`` must name it."""
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
    write_back: str | None = None
    """SOMA experiment the embeddings are written back to: a path relative to ``OUT`` (or
    a URI); None writes into the source experiment. Census is read-only, so a Census
    recipe must name a separate experiment here (created if missing)."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        fixed = sorted({"source", "out"} & set(self.ingest))
        if fixed:
            raise ValueError(f"ingest cannot set {fixed}: the recipe's source and OUT do")
        if is_census(self.source) and self.write_back is None:
            raise ValueError("Census is read-only: set write_back to a separate local SOMA "
                             "experiment (a path relative to OUT)")
        self.ingest_config(STORE_DIR)
        self.evaluate_config()
        for model, recipe in self.models.items():
            for label, mode in recipe.labels(model).items():
                if not valid_run_name(label):
                    raise ValueError(f"model name {model!r} cannot name embedding {label!r}")
                self.embed_config(label, mode)
            prior = self.train_config(model).loss.store_prior
            if prior is not None and prior != self.prior:
                raise ValueError(f"model {model!r} trains with the {prior} prior, but the "
                                 f"recipe builds {self.prior}: set prior: {prior}")
        return self

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


def run_pipeline(config: PipelineConfig, out: Path, *, source: str | None = None,
                 workers: int | None = None, epochs: int | None = None,
                 headers: Headers | None = None, in_process: bool = False
                 ) -> dict[str, Any]:
    """Run a recipe into ``out``, skipping every stage whose output is complete.

    Parameters
    ----------
    config : PipelineConfig
        The recipe.
    out : Path
        Output directory (created); see the module docstring for its layout.
    source : str, optional
        Read this source instead of the recipe's (e.g. ``census:PATH`` offline).
    workers : int, optional
        Ray Train workers and embedding actors, instead of the recipe's.
    epochs : int, optional
        Epochs of each training stage (contrastive, and supervised for models with
        tasks), instead of the recipe's; for quick runs.
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
    from sampleclr_scale.data.ingest import ingest
    from sampleclr_scale.data.store import BagStore
    from sampleclr_scale.embed.embedder import embed
    from sampleclr_scale.evaluate import evaluate, headline
    from sampleclr_scale.train.artifact import MODEL_FILE
    from sampleclr_scale.train.driver import train
    from sampleclr_scale.train.prior import available_priors, build_prior, save_prior

    begin = time.perf_counter()
    if source is not None:
        config = config.with_source(source)
    header = headers or Headers()
    train_overrides = {key: value for key, value in
                       {"workers": workers, "epochs": epochs, "supervised_epochs": epochs}.items()
                       if value is not None}
    embed_overrides = {"workers": workers} if workers is not None else {}
    out.mkdir(parents=True, exist_ok=True)
    store_path = out / STORE_DIR
    write_back = None if config.write_back is None else _resolve(out, config.write_back)

    header("ingest", f"{config.name}: ingest {config.source} -> bag store {store_path}")
    if not store_path.exists():
        ingest(config.ingest_config(str(store_path)))
    store = BagStore(store_path)
    n_train = len(store.split_donors("train"))
    print(f"   {store.n_cells:,} cells of {store.n_donors} donors ({n_train} for training), "
          f"d = {store.dim}")

    if config.prior is not None:
        header("prior", f"{config.prior} prior between donors (Ray tasks)")
        if config.prior not in available_priors(str(store_path)):
            save_prior(str(store_path), build_prior(str(store_path), config.prior))

    embeddings, runs = [], []
    for model, recipe in config.models.items():
        run_dir = out / RUNS_DIR / model
        train_config = _fit_batch(config, model, train_overrides, n_train)
        where = ("in this process" if in_process
                 else f"with {train_config.workers} Ray Train workers")
        header("train", f"train {model} {where} -> {run_dir}")
        if not (run_dir / MODEL_FILE).exists():
            train(str(store_path), str(run_dir), train_config, resume=True,
                  in_process=in_process)
        runs.append(str(run_dir))
        for label, mode in recipe.labels(model).items():
            emb_dir = out / EMBEDDINGS_DIR / label
            header("embed", f"embed every donor with {model} ({mode} cells), write back "
                   f"-> {emb_dir}")
            if not emb_dir.exists():
                embed(str(store_path), str(run_dir), str(emb_dir),
                      config.embed_config(label, mode, embed_overrides), write_back=write_back)
            embeddings.append(str(emb_dir))

    report = out / REPORT_DIR
    header("evaluate", f"evaluate against pseudobulk, composition, random"
           f"{', GloScope' if 'gloscope' in available_priors(str(store_path)) else ''} "
           f"-> {report}")
    metrics = evaluate(embeddings, str(store_path), str(report), config.evaluate_config(),
                       run_dirs=runs)

    header("done", "done")
    print(headline(metrics))
    print(f"\nreport: {report / 'report.md'}   ({time.perf_counter() - begin:.0f} s)")
    return metrics


def _fit_batch(config: PipelineConfig, model: str, overrides: dict[str, Any],
               n_train: int) -> TrainConfig:
    """``model``'s training settings with the per-worker batch cut to fit the cohort.

    A global batch larger than the training donors would repeat donors within a batch
    (as each other's negatives), so the batch is at most ``n_train // workers`` donors
    (and at least 2).
    """
    train_config = config.train_config(model, overrides)
    batch = max(2, min(train_config.loader.batch_size, n_train // train_config.workers))
    if batch == train_config.loader.batch_size:
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


def _resolve(out: Path, where: str) -> str:
    """A path relative to ``out`` (absolute paths and URIs unchanged)."""
    return where if "://" in where else str(out / where)
