"""The feature spec: what defines a store's feature space.

A model trained on one store can embed another store only if both hold the same features
of a cell, not just as many. The spec is what makes two stores' features the same:

- ``obsm:NAME`` (:class:`EmbeddingSpec`): the embedding's name and width. Whether two
  sources' embeddings of one name come from the same model (e.g. Census's hosted
  embeddings) is beyond what a store can see.
- ``pca:N`` (:class:`PCASpec`): the gene ids, the normalisation (library size to
  ``target_sum`` counts, then log1p), the mean and the components of the fitted PCA.

Ingest stores the spec (``STORE/feature_spec/`` for PCA, :func:`write_spec`) and its
record (the ``feature_spec`` attribute: kind, width, fingerprint); ``ingest
--features-like STORE`` applies a stored spec to another source instead of fitting one,
so the new store gets the same spec and fingerprint. The trained model keeps its store's
record, and embedding refuses a store of another fingerprint (:func:`check_same_space`).
The fingerprint is the SHA-256 of the spec's defining content, so equal specs have equal
fingerprints however and wherever they were written.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import zarr

from sampleclr_scale.errors import InputError
from sampleclr_scale.storage import Location

log = logging.getLogger(__name__)

SPEC_GROUP = "feature_spec"
"""The store's group holding a PCA spec: arrays ``mean`` and ``components``, attributes
``genes`` and ``normalisation``."""


def _sha256(header: dict[str, Any], *arrays: np.ndarray) -> str:
    """SHA-256 of ``header`` as canonical JSON, then of each array as little-endian float32."""
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    for array in arrays:
        digest.update(np.ascontiguousarray(array, dtype="<f4").tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class EmbeddingSpec:
    """An existing cell embedding (``obsm:NAME``), by name and width."""

    name: str
    dim: int

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the kind, name and width."""
        return _sha256({"kind": "obsm", "name": self.name, "dim": self.dim})

    def record(self) -> dict[str, Any]:
        """The ``feature_spec`` store attribute (and the trained model's entry)."""
        return {"kind": "obsm", "name": self.name, "dim": self.dim,
                "fingerprint": self.fingerprint}


@dataclass(frozen=True, eq=False)
class PCASpec:
    """A fitted PCA of normalised counts (``pca:N``).

    Attributes
    ----------
    genes
        The ids of the genes it uses (the source's ``var_names``), in column order.
    mean
        Float32 ``[n_genes]`` mean of the normalised, log1p counts it was fitted on.
    components
        Float32 ``[N, n_genes]`` principal axes.
    target_sum
        Counts per cell after library-size normalisation (log1p follows).
    """

    genes: tuple[str, ...]
    mean: np.ndarray
    components: np.ndarray
    target_sum: float

    @property
    def dim(self) -> int:
        """Number of components ``N``."""
        return int(self.components.shape[0])

    @property
    def normalisation(self) -> dict[str, Any]:
        """How counts are normalised before the projection."""
        return {"target_sum": self.target_sum, "log1p": True}

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the gene ids, the normalisation, the mean and the components."""
        header = {"kind": "pca", "genes": list(self.genes), "shape": list(self.components.shape),
                  "normalisation": self.normalisation}
        return _sha256(header, self.mean, self.components)

    def record(self) -> dict[str, Any]:
        """The ``feature_spec`` store attribute (and the trained model's entry)."""
        return {"kind": "pca", "n_components": self.dim, "n_genes": len(self.genes),
                "dim": self.dim, "fingerprint": self.fingerprint}


FeatureSpec = EmbeddingSpec | PCASpec


def write_spec(group: zarr.Group, spec: FeatureSpec) -> dict[str, Any]:
    """Write a PCA spec into ``group/feature_spec`` (an embedding's needs no arrays);
    return the ``feature_spec`` attribute."""
    if isinstance(spec, PCASpec):
        sub = group.create_group(SPEC_GROUP, attributes={
            "genes": list(spec.genes), "normalisation": spec.normalisation})
        sub.create_array("mean", data=spec.mean.astype(np.float32))
        sub.create_array("components", data=spec.components.astype(np.float32))
    return spec.record()


def read_spec(attrs: dict[str, Any], group: zarr.Group) -> FeatureSpec | None:
    """The spec of a store from its attributes and group; None for a store whose PCA
    features were ingested before specs were stored.

    A store ingested with an embedding before then has its spec in the ``features``
    attribute (name and width).
    """
    record = attrs.get("feature_spec")
    if record is None:
        features = attrs.get("features") or {}
        if features.get("kind") != "embedding":
            return None
        return EmbeddingSpec(str(features["name"]), int(features["dim"]))
    if record["kind"] == "obsm":
        return EmbeddingSpec(str(record["name"]), int(record["dim"]))
    sub = group[SPEC_GROUP]
    return PCASpec(genes=tuple(sub.attrs["genes"]), mean=sub["mean"][:],
                   components=sub["components"][:],
                   target_sum=float(sub.attrs["normalisation"]["target_sum"]))


SPEC_FOLDER = "feature_spec.zarr"
"""A saved model's copy of its training store's feature spec (a Zarr group with the
``feature_spec`` attribute and, for PCA, the ``feature_spec/`` arrays), written by
:meth:`sampleclr_scale.api.SampleCLR.save` so that the run directory alone puts a new
cohort in the model's space (``ingest --features-like RUN``)."""


def write_spec_folder(location: Location, spec: FeatureSpec) -> None:
    """Write ``spec`` as a Zarr group at ``location`` (:data:`SPEC_FOLDER`)."""
    group = location.open_group(mode="w")
    group.attrs["feature_spec"] = write_spec(group, spec)


def read_spec_folder(location: Location) -> FeatureSpec | None:
    """The spec written by :func:`write_spec_folder` at ``location``; None where there is
    none (a bag store, a run of the command line)."""
    if not location.is_zarr_group():
        return None
    group = location.open_group(mode="r")
    return read_spec(dict(group.attrs), group)


def locate_genes(genes: tuple[str, ...], source_genes: np.ndarray) -> np.ndarray:
    """Column of each of ``genes`` among ``source_genes`` (matched by id); -1 if absent.

    Raises
    ------
    InputError
        If a gene of ``genes`` names more than one column of the source.
    """
    index = pd.Index(np.asarray(source_genes, dtype=str))
    repeated = index.duplicated(keep=False)
    ambiguous = sorted(set(index[repeated]) & set(genes))
    if ambiguous:
        raise InputError(f"the source names {len(ambiguous)} gene(s) of the feature spec in "
                         f"more than one column (e.g. {ambiguous[:5]})",
                         "make the source's gene ids unique (var_names, or var column "
                         "feature_id)")
    columns = np.flatnonzero(~repeated)
    found = index[~repeated].get_indexer(list(genes))
    return np.where(found >= 0, columns[found], -1)


def check_missing_genes(missing: list[str], n_genes: int, max_missing: float,
                        source: str) -> None:
    """Warn about genes of the spec that the source lacks; refuse more than
    ``max_missing`` of them (a fraction of the spec's ``n_genes``).

    Raises
    ------
    InputError
        For a larger fraction missing: the features would be another space in all but name.
    """
    if not missing:
        return
    share = len(missing) / n_genes
    named = (f"{len(missing)} of the feature spec's {n_genes} genes ({share:.1%}), e.g. "
             f"{missing[:10]}")
    if share > max_missing:
        raise InputError(
            f"{source} lacks {named}: more than max_missing_genes ({max_missing:.1%})",
            "check that the source's gene ids are of the training store's kind (var column "
            "feature_id, else var_names), or raise --max-missing-genes")
    log.warning("%s lacks %s; they are taken at the training mean (no contribution to "
                "any component)", source, named)


def describe_record(record: dict[str, Any]) -> str:
    """A spec record in words, for messages: ``pca:50 of 2000 genes (fingerprint ...)``."""
    kind = (f"pca:{record['n_components']} of {record['n_genes']} genes"
            if record["kind"] == "pca" else f"obsm:{record['name']} of width {record['dim']}")
    return f"{kind} (fingerprint {record['fingerprint'][:12]})"


def check_same_space(trained: dict[str, Any] | None, spec: FeatureSpec | None, *,
                     run_dir: str, store: str, trained_on: str | None) -> None:
    """Refuse to embed a store whose features are not those the model was trained on.

    Parameters
    ----------
    trained
        The model's spec record (None: a model trained before models recorded one, which
        is embedded with a warning: only the number of features is checked).
    spec
        The store's spec (None: PCA features ingested before specs were stored).
    run_dir, store, trained_on
        The run, the store and the model's training store, for the message.

    Raises
    ------
    InputError
        Naming both specs and how to ingest the store in the model's space.
    """
    if trained is None:
        log.warning("the model in %s records no feature spec (it was trained by an older "
                    "sampleclr-scale): only the number of features of %s is checked, not "
                    "that they are the features it was trained on", run_dir, store)
        return
    if spec is not None and spec.fingerprint == trained["fingerprint"]:
        return
    has = ("no feature spec (its PCA was ingested by an older sampleclr-scale)"
           if spec is None else describe_record(spec.record()))
    raise InputError(
        f"the model in {run_dir} was trained on features {describe_record(trained)}; the "
        f"store {store} has {has}: not the model's feature space, so its embedding would "
        "be meaningless",
        f"ingest the cohort in the model's feature space: `sampleclr-scale ingest SOURCE "
        f"--out NEW_STORE --features-like {trained_on or 'TRAINING_STORE'}`, then embed "
        "NEW_STORE")
