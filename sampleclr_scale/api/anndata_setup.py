"""Which columns of an AnnData name the samples, batches and cell types, and its features.

:func:`setup_anndata` checks an AnnData object once, up front, with the project's errors
(a missing column, a sample with too few cells, non-finite features), and records the
answer in ``adata.uns`` (:data:`SETUP_KEY`, as JSON text, so the object still writes to
``.h5ad``). :func:`ingest_anndata` turns the object into a bag store with the ingest stage
(:func:`~sampleclr_scale.ingest.stage.ingest`), read through
:class:`~sampleclr_scale.sources.anndata.AnnDataSource`: the notebook and the command line
build the same store.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from sampleclr_scale.config import IngestConfig, StageConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.ingest.stage import IngestReport, ingest
from sampleclr_scale.sources.anndata import AnnDataSource, describe

SETUP_KEY = "sampleclr_setup"
"""The ``adata.uns`` entry holding :class:`AnnDataSetup` as JSON text."""


class AnnDataSetup(StageConfig):
    """What :func:`setup_anndata` found: the keys, the features and the cohort rules."""

    sample_key: list[str]
    """Obs column(s) naming a sample (donor); several columns name it together."""
    batch_key: list[str] = Field(default_factory=list)
    """Obs column(s) naming a sample's technical batch (constant within a sample)."""
    cell_type_key: str | None = None
    """Obs column of cell types: kept per cell, and the training views are balanced over
    it."""
    features: str = "pca:50"
    """``obsm:NAME`` (an existing embedding) or ``pca:N`` (PCA of the counts in ``layer``)."""
    layer: str = "X"
    """Where the counts are for ``pca:N``: ``X`` or a layer's name."""
    min_cells: int = Field(default=50, ge=1)
    """Fewest cells a sample may have."""
    val_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    """Share of samples held out for validation."""
    seed: int = 0
    """Seed of the split, the within-sample order and the PCA subsample."""
    metadata: list[str] = Field(default_factory=list)
    """The obs columns constant within every sample (found by :func:`setup_anndata`): the
    sample metadata, and the columns supervised tasks may predict."""

    @field_validator("features")
    @classmethod
    def _spelling(cls, value: str) -> str:
        """A bare name is an obsm key."""
        return value if value.startswith(("obsm:", "pca:")) else f"obsm:{value}"

    def ingest_config(self, source: str, out: str, **overrides: Any) -> IngestConfig:
        """The ingest stage's settings for this setup (``overrides`` win); the rest are the
        command line's defaults (samples named ``pooled`` or ``unknown`` are dropped)."""
        values: dict[str, Any] = dict(
            source=source, out=out, features=self.features, layer=self.layer,
            donor_key=self.sample_key, batch_key=self.batch_key,
            cell_columns=[self.cell_type_key] if self.cell_type_key else [],
            meta=[c for c in self.metadata if c not in self.sample_key],
            min_cells=self.min_cells, val_fraction=self.val_fraction, seed=self.seed)
        values.update(overrides)
        if "features_like" in overrides:
            values.pop("features")
        return IngestConfig.from_mapping(values, where="setup_anndata(...)")

    @classmethod
    def from_ingest(cls, attrs: dict[str, Any]) -> AnnDataSetup:
        """The setup of a store's ``ingest`` attribute (a store the command line built)."""
        ingest_attrs = attrs.get("ingest", {})
        cell_columns = ingest_attrs.get("cell_columns") or [None]
        return cls(sample_key=list(attrs.get("donor_key") or ingest_attrs["donor_key"]),
                   batch_key=ingest_attrs.get("batch_key", []), cell_type_key=cell_columns[0],
                   features=ingest_attrs.get("features", "pca:50"),
                   layer=ingest_attrs.get("layer", "X"),
                   min_cells=ingest_attrs.get("min_cells", 50),
                   val_fraction=ingest_attrs.get("val_fraction", 0.2),
                   seed=ingest_attrs.get("seed", 0), metadata=ingest_attrs.get("meta", []))


def setup_anndata(adata: Any, sample_key: str | list[str], batch_key: str | list[str] | None = None,
                  cell_type_key: str | None = None, features: str = "pca:50",
                  layer: str = "X", min_cells: int = 50, val_fraction: float = 0.2,
                  seed: int = 0) -> AnnDataSetup:
    """Check ``adata`` and record its setup in ``adata.uns`` (see :class:`AnnDataSetup`).

    Raises
    ------
    InputError
        For a key that is no obs column, features that are not there or not finite, a
        sample with fewer than ``min_cells`` cells, or fewer than two samples.
    """
    source = AnnDataSource(adata)
    setup = AnnDataSetup.from_mapping(dict(
        sample_key=_columns(sample_key), batch_key=_columns(batch_key),
        cell_type_key=cell_type_key, features=features, layer=layer, min_cells=min_cells,
        val_fraction=val_fraction, seed=seed), where="setup_anndata(...)")
    keys = [*setup.sample_key, *setup.batch_key, *filter(None, [setup.cell_type_key])]
    missing = [c for c in keys if c not in adata.obs.columns]
    if missing:
        raise InputError(f"setup_anndata names obs column(s) {missing} that the "
                         f"{source.uri} does not have",
                         f"use its obs columns: {sorted(map(str, adata.obs.columns))}")
    _check_features(source, adata, setup)
    _check_samples(adata, setup, source.uri)
    setup = setup.model_copy(update={"metadata": sample_columns(adata.obs, setup.sample_key)})
    adata.uns[SETUP_KEY] = setup.model_dump_json()
    return setup


def _columns(key: str | list[str] | None) -> list[str]:
    """A key as a list of columns."""
    return [] if key is None else [key] if isinstance(key, str) else list(key)


def _check_features(source: AnnDataSource, adata: Any, setup: AnnDataSetup) -> None:
    """Refuse features that are not there, or not finite (in an obsm embedding)."""
    kind, _, name = setup.features.partition(":")
    if kind == "pca":
        source.var_names(setup.layer)  # the layer exists
        return
    if name not in adata.obsm:
        raise InputError(f"the {source.uri} has no obsm[{name!r}]",
                         f"pass features= one of {sorted(map(str, adata.obsm))}, or "
                         "'pca:N' for a PCA of the counts")
    values = adata.obsm[name]
    values = values.to_numpy() if isinstance(values, pd.DataFrame) else np.asarray(values)
    bad = int((~np.isfinite(values).all(axis=1)).sum())
    if bad:
        raise InputError(f"{bad} cells of the {source.uri} have NaN or infinite values in "
                         f"obsm[{name!r}]",
                         f"drop them first: adata = adata[np.isfinite(adata.obsm[{name!r}])"
                         ".all(axis=1)].copy()")


def _check_samples(adata: Any, setup: AnnDataSetup, where: str) -> None:
    """Refuse samples below ``min_cells``, and cohorts of fewer than two samples."""
    sizes = adata.obs.groupby(setup.sample_key, observed=True, dropna=True).size()
    small = sizes[sizes < setup.min_cells]
    key = setup.sample_key[0] if len(setup.sample_key) == 1 else setup.sample_key
    if len(small):
        names = [str(n) for n in small.index[:5]]
        raise InputError(
            f"{len(small)} sample(s) of the {where} have fewer than min_cells="
            f"{setup.min_cells} cells, e.g. {names} ({small.iloc[:5].tolist()} cells)",
            f"drop them (keep = adata.obs.groupby({key!r}, observed=True)[...].transform("
            "'size') >= min_cells), or pass a smaller min_cells to setup_anndata")
    if len(sizes) < 2:
        raise InputError(f"the {where} has {len(sizes)} sample(s) by {key!r}; contrastive "
                         "learning needs at least two", "check sample_key")


def sample_columns(obs: pd.DataFrame, sample_key: list[str]) -> list[str]:
    """The obs columns with one value per sample (missing values counted as one)."""
    grouped = obs.groupby(sample_key, observed=True, dropna=True)
    return [str(c) for c in obs.columns
            if c not in sample_key and (grouped[c].nunique(dropna=False) <= 1).all()]


def read_setup(adata: Any) -> AnnDataSetup | None:
    """The setup :func:`setup_anndata` recorded in ``adata``, or None."""
    text = adata.uns.get(SETUP_KEY) if hasattr(adata, "uns") else None
    return None if text is None else AnnDataSetup.model_validate(json.loads(str(text)))


def ingest_anndata(adata: Any, setup: AnnDataSetup, out: str,
                   features_like: str | None = None) -> IngestReport:
    """Ingest ``adata`` into a new bag store at ``out`` with the ingest stage.

    Parameters
    ----------
    features_like
        A store or saved model whose feature space the cells are put in (a new cohort for
        a trained model), instead of ``setup.features``.
    """
    source = AnnDataSource(adata)
    overrides: dict[str, Any] = {} if features_like is None else {"features_like":
                                                                  features_like}
    return ingest(setup.ingest_config(describe(adata), out, **overrides), source=source)
