"""Cell features: an existing embedding, or PCA of normalised gene counts.

Both readers take sorted source ids and return float32 rows, so ingest can stream the
source in large sequential blocks. PCA is fitted on a random subsample of the cohort and
then applied block by block: memory depends on the subsample and the block, not on the
number of cells. Each reader has the spec of its features
(:mod:`~sampleclr_scale.store.feature_spec`); :func:`like_features` reads another store's
spec and applies it to the source instead of fitting one.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Self

import numpy as np
import scipy.sparse as sp

from sampleclr_scale.config import IngestConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.ingest.cell_index import CellIndex
from sampleclr_scale.sources.base import CellSource
from sampleclr_scale.storage import Location
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.feature_spec import (
    SPEC_FOLDER,
    EmbeddingSpec,
    FeatureSpec,
    PCASpec,
    check_missing_genes,
    locate_genes,
    read_spec_folder,
)

log = logging.getLogger(__name__)

TARGET_SUM = 1e4


class _SourceReader:
    """A feature reader over a source; it pickles without the source, so that another
    process (a Ray actor, :mod:`~sampleclr_scale.ingest.block_reads`) can :meth:`bind` it
    to the same source opened there."""

    _source: CellSource  # None in a pickled copy until bound

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_source": None}

    def bind(self, source: CellSource) -> Self:
        """A copy of this reader that reads ``source``."""
        bound = copy.copy(self)
        bound._source = source
        return bound


class EmbeddingFeatures(_SourceReader):
    """Rows of an existing cell embedding (SOMA obsm, a Census embedding array, h5ad obsm)."""

    def __init__(self, source: CellSource, name: str) -> None:
        source.embedding_dim(name)  # validates the name
        self._source = source
        self._name = name
        self.dim = source.embedding_dim(name)
        self.spec = EmbeddingSpec(name, self.dim)
        self.counts: dict[str, int] = {}

    def read(self, joinids: np.ndarray) -> np.ndarray:
        """Float32 ``[len(joinids), dim]``; NaN rows for cells without an embedding."""
        return self._source.read_embedding(self._name, joinids)

    def describe(self) -> dict:
        """Provenance for the store's attributes."""
        return {"kind": "embedding", "name": self._name, "dim": self.dim}


def normalise_log1p(counts: sp.csr_matrix, target_sum: float = TARGET_SUM) -> sp.csr_matrix:
    """Library-size normalisation to ``target_sum`` counts per cell, then ``log1p``.

    Cells with no counts stay all zero.
    """
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals, dtype=np.float64),
                      where=totals > 0)
    out = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ counts, dtype=np.float32)
    np.log1p(out.data, out=out.data)
    return out


@dataclass(frozen=True)
class PCAModel:
    """A fitted PCA of normalised, log1p-transformed counts on a gene subset.

    Attributes
    ----------
    genes
        Column positions (in the X layer) of the genes used.
    mean
        Float32 ``[n_genes]`` mean of the subsample.
    components
        Float32 ``[n_components, n_genes]`` principal axes.
    target_sum
        Counts per cell after library-size normalisation.
    """

    genes: np.ndarray
    mean: np.ndarray
    components: np.ndarray
    target_sum: float = TARGET_SUM

    def transform(self, counts: sp.csr_matrix) -> np.ndarray:
        """Project raw counts ``[n, all genes]`` to float32 ``[n, n_components]``."""
        x = normalise_log1p(counts, self.target_sum)[:, self.genes]
        return (np.asarray(x @ self.components.T) - self.mean @ self.components.T).astype(
            np.float32
        )


def fit_pca(
    source: CellSource, layer: str, joinids: np.ndarray, n_components: int, n_genes: int,
    seed: int,
) -> PCAModel:
    """Fit PCA on the cells with sorted source ids ``joinids`` (a random subsample).

    The ``n_genes`` most variable genes of the subsample (after normalisation and log1p)
    are kept; the subsample is read in one sorted query.
    """
    from sklearn.decomposition import PCA

    x = normalise_log1p(source.read_counts(layer, joinids))
    mean = np.asarray(x.mean(axis=0)).ravel()
    var = np.asarray(x.multiply(x).mean(axis=0)).ravel() - mean**2
    genes = np.sort(np.argsort(var)[::-1][: min(n_genes, x.shape[1])])
    dense = x[:, genes].toarray()
    n_components = min(n_components, *dense.shape)
    pca = PCA(n_components=n_components, svd_solver="randomized", random_state=seed).fit(dense)
    log.info("PCA fitted on %d cells x %d genes: %.1f%% variance in %d components",
             dense.shape[0], dense.shape[1], 100 * pca.explained_variance_ratio_.sum(),
             n_components)
    return PCAModel(genes=genes, mean=pca.mean_.astype(np.float32),
                    components=pca.components_.astype(np.float32))


class PCAFeatures(_SourceReader):
    """PCA coordinates of normalised gene counts, computed block by block.

    Parameters
    ----------
    model
        The PCA on the source's columns.
    spec
        Its feature spec (of another store, with :func:`like_features`).
    missing_genes
        The spec's genes that the source lacks (None: the PCA was fitted on this source).
    """

    def __init__(self, source: CellSource, layer: str, model: PCAModel, spec: PCASpec,
                 missing_genes: list[str] | None = None) -> None:
        self._source = source
        self._layer = layer
        self.model = model
        self.spec = spec
        self.dim = int(model.components.shape[0])
        self._missing = missing_genes
        self.counts: dict[str, int] = ({} if missing_genes is None
                                       else {"genes_missing": len(missing_genes)})

    def read(self, joinids: np.ndarray) -> np.ndarray:
        """Float32 ``[len(joinids), dim]``."""
        return self.model.transform(self._source.read_counts(self._layer, joinids))

    def describe(self) -> dict:
        """Provenance for the store's attributes."""
        described = {"kind": "pca", "layer": self._layer, "dim": self.dim,
                     "n_genes": len(self.spec.genes), "target_sum": self.spec.target_sum}
        if self._missing is not None:
            described["missing_genes"] = self._missing
        return described


def make_features(
    source: CellSource, config: IngestConfig, cells: CellIndex
) -> EmbeddingFeatures | PCAFeatures:
    """The feature reader that ``config.features`` asks for (PCA: fitted on ``cells``)."""
    kind, _, arg = config.features.partition(":")
    if kind == "obsm":
        return EmbeddingFeatures(source, arg)
    model = fit_pca(source, config.layer, cells.sample(config.pca_fit_cells, config.seed),
                    int(arg), config.pca_genes, config.seed)
    genes = tuple(str(g) for g in source.var_names(config.layer)[model.genes])
    spec = PCASpec(genes, model.mean, model.components, model.target_sum)
    return PCAFeatures(source, config.layer, model, spec)


def like_features(source: CellSource, config: IngestConfig) -> EmbeddingFeatures | PCAFeatures:
    """The reader of ``source``'s features in the space of the store
    ``config.features_like``: the same embedding, or the same PCA with genes matched by id.

    The spec's genes that the source lacks are taken at the spec's mean (they add nothing
    to any component), with a warning, up to ``config.max_missing_genes`` of them; genes
    of the source outside the spec are ignored, but count in the cells' library sizes.

    Raises
    ------
    InputError
        For a store without a spec, an embedding of another width, too many missing genes.
    """
    like = config.features_like
    spec = _stored_spec(like)
    if isinstance(spec, EmbeddingSpec):
        features = EmbeddingFeatures(source, spec.name)
        if features.dim != spec.dim:
            raise InputError(
                f"{source.uri}'s embedding {spec.name!r} has width {features.dim}, the "
                f"features of {like} have width {spec.dim}: another embedding model",
                f"use the embedding of the model behind {like}, or ingest with its own "
                "--features and train a model on that store")
        return features
    columns = locate_genes(spec.genes, source.var_names(config.layer))
    found = columns >= 0
    missing = [g for g, ok in zip(spec.genes, found, strict=True) if not ok]
    check_missing_genes(missing, len(spec.genes), config.max_missing_genes, source.uri)
    model = PCAModel(genes=columns[found], mean=spec.mean[found],
                     components=spec.components[:, found], target_sum=spec.target_sum)
    return PCAFeatures(source, config.layer, model, spec, missing)


def _stored_spec(location: str) -> FeatureSpec:
    """The feature spec of the store at ``location``, or of a saved model there (a run
    directory with :data:`~sampleclr_scale.store.feature_spec.SPEC_FOLDER`).

    Raises
    ------
    InputError
        For a store whose PCA was ingested before specs were stored.
    """
    saved = read_spec_folder(Location(location) / SPEC_FOLDER)
    if saved is not None:
        return saved
    spec = BagStore(location).feature_spec
    if spec is None:
        raise InputError(f"bag store {location} does not store its PCA (it was ingested by an "
                         "older sampleclr-scale), so --features-like cannot apply it",
                         f"re-ingest that cohort (`sampleclr-scale ingest SOURCE --out "
                         f"{location} --overwrite`), retrain its model, then use it here")
    return spec
