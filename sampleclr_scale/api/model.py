"""``SampleCLR``: the notebook's model, in the conventions of scvi-tools.

A thin layer over the stages: :meth:`SampleCLR.train` ingests the AnnData object into a
bag store (:func:`~sampleclr_scale.ingest.stage.ingest`) and trains on it
(:func:`~sampleclr_scale.train.driver.train`, in this process or on Ray Train);
:meth:`~SampleCLR.get_sample_representation` and :meth:`~SampleCLR.get_cell_weights` embed
with :func:`~sampleclr_scale.embed.embedder.embed` and read its output folder;
:meth:`~SampleCLR.save` writes the command line's run directory. The stores, runs and
embedding folders live in a working directory (a temporary one unless ``workdir`` is
given), so the object holds no data of its own and the command line can take over any of
its files.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from sampleclr_scale.api.anndata_setup import (
    AnnDataSetup,
    ingest_anndata,
    read_setup,
    setup_anndata,
)
from sampleclr_scale.config import TrainConfig
from sampleclr_scale.embed.config import CELLS_PARQUET, DONORS_H5AD, EmbedConfig
from sampleclr_scale.embed.embedder import embed
from sampleclr_scale.errors import InputError
from sampleclr_scale.storage import Location
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.feature_spec import SPEC_FOLDER, write_spec_folder
from sampleclr_scale.train.artifact import MODEL_FILE, load_model
from sampleclr_scale.train.driver import train

log = logging.getLogger(__name__)

SETUP_FILE = "anndata_setup.json"
"""A saved model's :class:`~sampleclr_scale.api.anndata_setup.AnnDataSetup`."""
_RUN_FILES = (MODEL_FILE, "metrics.jsonl", "train_config.json", "store.json", SETUP_FILE)
_API_DEFAULTS: dict[str, Any] = {"workers": 1}


class SampleCLR:
    """Sample (donor) representations learned contrastively from each sample's cells.

    Parameters
    ----------
    adata
        An AnnData object (in memory or backed) set up with :meth:`setup_anndata`.
    workdir
        Where the bag stores, the run and the embeddings are written; default a temporary
        directory removed with the object.
    **config
        Any :class:`~sampleclr_scale.config.TrainConfig` setting (``epochs``, ``model``,
        ``loss``, ``loader``, ``optim``, ...), validated as the command line's YAML is;
        ``tasks`` may also be a mapping ``{column: kind}``.

    Examples
    --------
    >>> import sampleclr_scale as scs
    >>> adata = scs.simulated_anndata(n_donors=24, seed=0)
    >>> scs.SampleCLR.setup_anndata(adata, sample_key="sample", cell_type_key="cell_type",
    ...                             features="scvi", min_cells=20)
    >>> model = scs.SampleCLR(adata, epochs=2, supervised_epochs=1, supervised_min_steps=0,
    ...                       tasks={"severity": "ordinal"}, loader={"cells_per_view": 64})
    >>> model.train()
    >>> donors = model.get_sample_representation()
    >>> donors.n_obs, bool(donors.obs["severity_pred"].notna().all())
    (24, True)
    """

    def __init__(self, adata: Any, workdir: str | Path | None = None, **config: Any) -> None:
        setup = read_setup(adata)
        if setup is None:
            raise InputError("this AnnData is not set up for SampleCLR",
                             "call SampleCLR.setup_anndata(adata, sample_key=...) first")
        self._start(adata, setup, _train_config(setup, config), workdir)

    def _start(self, adata: Any, setup: AnnDataSetup, config: TrainConfig,
               workdir: str | Path | None) -> None:
        """The state of a new model (``__init__``, :meth:`from_store` and :meth:`load`)."""
        self.adata = adata
        self._setup = setup
        self.config = config
        self._workdir = _workdir(self, workdir)
        self._store: str | None = None
        self._run: str | None = None
        self._like: str | None = None
        self._stores: dict[int, tuple[Any, str]] = {}
        self._embedded: dict[tuple[str, str], Path] = {}
        self.history: list[dict[str, Any]] = []

    @classmethod
    def from_store(cls, store: str | Path, workdir: str | Path | None = None,
                   **config: Any) -> SampleCLR:
        """A model to train on a bag store that the ingest stage built: from a SOMA
        experiment, CELLxGENE Census or an ``.h5ad`` too large for a notebook.

        Parameters
        ----------
        store
            The bag store (a local path or a URI), e.g. from ``sampleclr-scale ingest
            census --out STORE ...``.
        workdir, **config
            As for :class:`SampleCLR`.

        Returns
        -------
        SampleCLR
            An untrained model; its samples are the store's donors, its cell weights are
            indexed by the cells' ids in the source (``soma_joinid``).
        """
        location = Location(store).uri
        setup = AnnDataSetup.from_ingest(BagStore(location).attrs)
        model = cls.__new__(cls)
        model._start(None, setup, _train_config(setup, config), workdir)
        model._store = location
        return model

    @staticmethod
    def setup_anndata(adata: Any, sample_key: str | list[str],
                      batch_key: str | list[str] | None = None,
                      cell_type_key: str | None = None, features: str = "pca:50",
                      layer: str = "X", min_cells: int = 50, val_fraction: float = 0.2,
                      seed: int = 0) -> None:
        """Check ``adata`` and record which columns name its samples, batches and cell
        types, and which features the model reads.

        Parameters
        ----------
        adata
            An AnnData object, in memory or backed (``read_h5ad(path, backed="r")``).
        sample_key
            Obs column(s) naming a sample (donor, patient); several name it together.
        batch_key
            Obs column(s) naming a sample's technical batch (site, dataset, assay):
            constant within a sample; kept as metadata, and per-batch feature statistics
            are stored (``standardize="batch"``, ``loss={"negatives": "same_batch"}``).
        cell_type_key
            Obs column of cell types: training views hold the cohort's cell-type
            proportions, so composition alone does not tell samples apart.
        features
            An obsm key (``"X_scVI"`` or ``"obsm:X_scVI"``), or ``"pca:N"``: library-size
            normalisation, log1p and a PCA to N components of the counts in ``layer``.
        layer
            ``"X"`` or a layer holding counts, for ``pca:N``.
        min_cells
            Fewest cells of a sample; a smaller one is an error naming it.
        val_fraction
            Share of samples held out for validation (early stopping, held-out scores).
        seed
            Seed of the split, the within-sample cell order and the PCA subsample.

        Raises
        ------
        InputError
            For a key that is no obs column, features that are missing or not finite, a
            sample below ``min_cells``, fewer than two samples.
        """
        setup_anndata(adata, sample_key, batch_key, cell_type_key, features, layer,
                      min_cells, val_fraction, seed)

    def __repr__(self) -> str:
        state = "trained" if self.is_trained else "not trained"
        return (f"SampleCLR({state}, samples by {self._setup.sample_key}, features "
                f"{self._setup.features}, run {self._run})")

    @property
    def is_trained(self) -> bool:
        """Whether the model has weights (trained here, or loaded)."""
        return self._run is not None

    def train(self, max_epochs: int | None = None, workers: int = 1,
              use_gpu: bool | None = None, **config: Any) -> None:
        """Ingest the AnnData into a bag store and train on it.

        Parameters
        ----------
        max_epochs
            Epochs of the contrastive stage (``epochs``); default the model's setting.
        workers
            1 trains in this process, without Ray Train; more trains data-parallel with
            Ray Train (a local Ray, or the cluster that ``RAY_ADDRESS`` names). Either
            way the first run builds the GloScope prior of the default loss into the
            bag store, as Ray tasks (``loss={"prior": None}`` trains without one).
        use_gpu
            Train on GPUs; default: when torch sees one.
        **config
            More :class:`~sampleclr_scale.config.TrainConfig` settings for this run.

        Notes
        -----
        Unless ``loader={"batch_size": ...}`` was given, a cohort of fewer training
        samples than the default batch (32 a step, split over the workers) trains on
        batches of all of them; unless ``loader={"cells_per_view": ...}`` was given, a
        view holds at most half of the median sample's cells (1000 by default: the
        paper's).
        The bag store is built once, at the first call (in the working directory); a
        second call trains a new run on it.
        """
        import torch

        if self.adata is None and self._store is None:
            raise InputError("this model was loaded without an AnnData to train on",
                             "create a new SampleCLR(adata, ...) to train")
        updates = {**config, "workers": workers,
                   "use_gpu": torch.cuda.is_available() if use_gpu is None else use_gpu}
        if max_epochs is not None:
            updates["epochs"] = max_epochs
        if self._store is None:
            self._store = str(self._workdir / "store.zarr")
            ingest_anndata(self.adata, self._setup, self._store)
            self._stores[id(self.adata)] = (self.adata, self._store)
        values = {**self.config.model_dump(exclude_unset=True), **updates}
        values["loader"] = _fitted_loader(self.config, BagStore(self._store), workers)
        self.config = TrainConfig.from_layers({"SampleCLR(...).train(...)": values})
        run = self._workdir / "run"
        shutil.rmtree(run, ignore_errors=True)
        self._embedded.clear()
        result = train(self._store, str(run), self.config, in_process=workers == 1)
        self._run, self._like, self.history = str(run), self._store, result.history

    def get_sample_representation(self, adata: Any = None, **settings: Any) -> Any:
        """One row per sample: ``X`` the representation, ``obs`` the sample metadata.

        Parameters
        ----------
        adata
            Cells of other samples (a new cohort), put in the model's feature space first
            (its obsm embedding, or its PCA applied to the same genes); default the
            training AnnData.
        **settings
            :class:`~sampleclr_scale.embed.config.EmbedConfig` settings (``cells``,
            ``mode``, ``seed``; ``use_gpu`` defaults to whether the model trained on one).

        Returns
        -------
        anndata.AnnData
            Samples x dimensions: ``obs_names`` the sample names; ``obs`` the sample
            metadata, ``n_cells``, ``split`` and, for a model with supervised tasks, the
            predictions (``<task>_pred``, ``<task>_p_<class>``);
            ``uns["sampleclr_provenance"]`` the provenance (JSON text).
        """
        import anndata

        return anndata.read_h5ad(self._embedding(adata, settings) / DONORS_H5AD)

    def get_cell_weights(self, adata: Any = None, **settings: Any) -> pd.DataFrame:
        """Each cell's importance weight in its sample's representation, per head.

        Parameters
        ----------
        adata, **settings
            As for :meth:`get_sample_representation`; ``mode="all"`` weighs every cell.

        Returns
        -------
        pandas.DataFrame
            Indexed like ``adata.obs_names``, one column per head (``head_0`` ...): the
            cell's weight in its sample's bag (averaged over repeats, for samples with
            fewer cells than ``cells``), NaN for cells the embedding did not choose. A
            model without an AnnData (:meth:`from_store`, :meth:`load` of a run of the
            command line) gives the chosen cells only, indexed by their ids in the source
            (``source_joinid``: ``soma_joinid``, or the row of an ``.h5ad``).
        """
        import pyarrow.parquet as pq

        cells = pq.read_table(self._embedding(adata, settings) / CELLS_PARQUET).to_pandas()
        heads = [c for c in cells.columns if c.startswith("head_")]
        mean = cells.groupby("source_joinid")[heads].mean()
        if adata is None and self.adata is None:  # a store's cells: by their source ids
            return mean.astype(np.float32)
        target = self._target(adata)
        out = pd.DataFrame(np.nan, index=target.obs_names.copy(), columns=heads,
                           dtype=np.float32)
        out.iloc[mean.index.to_numpy()] = mean.to_numpy(dtype=np.float32)
        return out

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the run directory: the command line's (``sampleclr-scale embed
        --checkpoint DIR`` embeds with it) plus the AnnData setup and the feature space.

        Parameters
        ----------
        directory
            A new directory (or an existing one with ``overwrite``).
        overwrite
            Replace what is there.

        Returns
        -------
        pathlib.Path
            ``directory``.
        """
        self._require_trained()
        path = Path(directory)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise InputError(f"{path} exists and is not empty",
                             "pass overwrite=True, or choose another directory")
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        run = Path(self._run)
        for name in _RUN_FILES:
            if (run / name).is_file():
                shutil.copy2(run / name, path / name)
        (path / SETUP_FILE).write_text(self._setup.model_dump_json(indent=2))
        spec = BagStore(self._like).feature_spec if self._like else None
        if spec is not None:
            write_spec_folder(Location(path / SPEC_FOLDER), spec)
        return path

    @classmethod
    def load(cls, directory: str | Path, adata: Any = None,
             workdir: str | Path | None = None) -> SampleCLR:
        """A trained model from a run directory: one :meth:`save` wrote, or one that
        ``sampleclr-scale train`` wrote.

        Parameters
        ----------
        directory
            The run directory (``model.pt``).
        adata
            The cells to use by default (set up as the model's if not set up already);
            default: the run's training store, for a run of the command line.
        workdir
            As for :class:`SampleCLR`.
        """
        _, artifact = load_model(directory)
        run = Location(directory)
        setup, like = _saved_setup(run, artifact)
        model = cls.__new__(cls)
        try:
            config = TrainConfig.model_validate(artifact["train_config"] or {})
        except ValidationError:  # a run of an older version: its settings are history
            config = TrainConfig(workers=1)
        model._start(adata, setup, config, workdir)
        model._like, model._run = like, run.uri
        model.history = list(artifact.get("history") or [])
        if adata is None and like is not None and Location(like).exists() and \
                not (Location(like) / SPEC_FOLDER).exists():
            model._store = like  # a command-line run: its training store
        elif adata is not None and read_setup(adata) is None:
            _apply_setup(adata, setup)
        return model

    # ------------------------------------------------------------------------- internals

    def _require_trained(self) -> None:
        if not self.is_trained:
            raise InputError("the model is not trained yet", "call model.train() first")

    def _target(self, adata: Any) -> Any:
        """The AnnData whose cells are meant: ``adata``, else the model's."""
        target = adata if adata is not None else self.adata
        if target is None:
            raise InputError("this model has no AnnData of its own (it was loaded or built "
                             "from a store without one)",
                             "pass adata=, or load it with SampleCLR.load(dir, adata)")
        return target

    def _store_of(self, adata: Any) -> str:
        """The bag store of ``adata`` (ingested in the model's feature space once)."""
        if adata is None and self._store is not None:
            return self._store
        target = self._target(adata)
        if id(target) in self._stores:
            return self._stores[id(target)][1]
        setup = read_setup(target) or _apply_setup(target, self._setup)
        if setup.sample_key != self._setup.sample_key:
            log.info("samples of the new cohort are named by %s", setup.sample_key)
        store = str(self._workdir / f"store-{len(self._stores) + 1}.zarr")
        ingest_anndata(target, setup.model_copy(update={"features": self._setup.features}),
                       store, features_like=self._require_like())
        self._stores[id(target)] = (target, store)
        if target is self.adata:
            self._store = store
        return store

    def _require_like(self) -> str:
        if self._like is None:
            raise InputError("the model does not know its feature space (its training "
                             "store is gone and it was not saved with one)",
                             "load the model from a directory SampleCLR.save wrote, or "
                             "keep its training store where it was trained")
        return self._like

    def _embedding(self, adata: Any, settings: dict[str, Any]) -> Path:
        """The embedding folder of ``adata``'s store with ``settings`` (made once)."""
        import torch

        self._require_trained()
        on_gpu = self.config.use_gpu and torch.cuda.is_available()  # as the model trained
        config = EmbedConfig.from_mapping(
            {"workers": 1, "use_gpu": on_gpu, **settings, "overwrite": True},
            where="embedding settings")
        store = self._store_of(adata)
        key = (store, config.model_dump_json())
        if key not in self._embedded:
            out = self._workdir / f"embeddings-{len(self._embedded) + 1}"
            embed(store, self._run, out, config, write_back=False, in_process=True)
            self._embedded[key] = out
        return self._embedded[key]


def _train_config(setup: AnnDataSetup, config: dict[str, Any]) -> TrainConfig:
    """The run's settings: the API's defaults, the views balanced over the cell types,
    tasks given as ``{column: kind}``; tasks only on sample-level columns."""
    values = {**_API_DEFAULTS, **config}
    tasks = values.get("tasks", [])
    if isinstance(tasks, dict):
        values["tasks"] = [{"column": c, "kind": k} for c, k in tasks.items()]
    loader = dict(values.get("loader") or {})
    if setup.cell_type_key is not None and "balance" not in loader:
        values["loader"] = {**loader, "balance": setup.cell_type_key}
    result = TrainConfig.from_mapping(values, where="SampleCLR(...)")
    varying = [t.column for t in result.tasks if t.column not in setup.metadata]
    if varying:
        raise InputError(f"tasks {varying} are not sample-level obs columns (one value per "
                         "sample)", f"use one of {setup.metadata}")
    return result


def _fitted_loader(config: TrainConfig, store: BagStore, workers: int) -> dict[str, Any]:
    """The loader settings with the defaults the user left fitted to a small cohort: a
    batch of at most the training samples, views of at most half the median sample."""
    loader = config.loader.model_dump(exclude_unset=True)
    if "batch_size" not in config.loader.model_fields_set:
        n_train = len(store.split_donors("train"))
        loader["batch_size"] = min(config.loader.process_batch(workers), max(n_train // workers, 1))
    if "cells_per_view" not in config.loader.model_fields_set:
        half = int(np.median(store.cells_per_donor)) // 2
        loader["cells_per_view"] = min(config.loader.cells_per_view, max(half, 1))
    return loader


def _workdir(owner: object, workdir: str | Path | None) -> Path:
    """``workdir`` (created), or a temporary directory removed with ``owner``."""
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        return Path(workdir)
    path = Path(tempfile.mkdtemp(prefix="sampleclr-"))
    weakref.finalize(owner, shutil.rmtree, path, ignore_errors=True)
    return path


def _saved_setup(run: Location, artifact: dict[str, Any]) -> tuple[AnnDataSetup, str | None]:
    """The setup and the feature space of a run: saved by :meth:`SampleCLR.save`, else its
    training store's (a run of the command line)."""
    if (run / SETUP_FILE).is_file():
        setup = AnnDataSetup.model_validate(json.loads((run / SETUP_FILE).read_text()))
        like = run.uri if (run / SPEC_FOLDER).exists() else artifact.get("store")
        return setup, like
    store = artifact.get("store")
    if not store or not Location(store).exists():
        raise InputError(f"the run {run} was trained on the store {store}, which is not "
                         "there, and was not saved by SampleCLR.save",
                         "put the training store back where it was trained")
    return AnnDataSetup.from_ingest(BagStore(store).attrs), store


def _apply_setup(adata: Any, setup: AnnDataSetup) -> AnnDataSetup:
    """Set ``adata`` up as ``setup`` says (its keys), checking it; every sample is kept
    (``min_cells=1``): a new cohort's small samples are embedded too."""
    return setup_anndata(adata, setup.sample_key, setup.batch_key or None,
                         setup.cell_type_key, setup.features, setup.layer, min_cells=1,
                         val_fraction=setup.val_fraction, seed=setup.seed)
