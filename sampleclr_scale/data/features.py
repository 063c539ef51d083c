"""Cell features: an existing embedding, or PCA of normalised gene counts.

Both readers take sorted source ids and return float32 rows, so ingest can stream the
source in large sequential blocks. PCA is fitted on a random subsample of the cohort and
then applied block by block: memory depends on the subsample and the block, not on the
number of cells.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from sampleclr_scale.config import IngestConfig
from sampleclr_scale.data.cell_index import CellIndex
from sampleclr_scale.data.sources import CellSource

log = logging.getLogger(__name__)

TARGET_SUM = 1e4


class EmbeddingFeatures:
    """Rows of an existing cell embedding (SOMA obsm, a Census embedding array, h5ad obsm)."""

    def __init__(self, source: CellSource, name: str) -> None:
        source.embedding_dim(name)  # validates the name
        self._source = source
        self._name = name
        self.dim = source.embedding_dim(name)

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
    """

    genes: np.ndarray
    mean: np.ndarray
    components: np.ndarray

    def transform(self, counts: sp.csr_matrix) -> np.ndarray:
        """Project raw counts ``[n, all genes]`` to float32 ``[n, n_components]``."""
        x = normalise_log1p(counts)[:, self.genes]
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


class PCAFeatures:
    """PCA coordinates of normalised gene counts, computed block by block."""

    def __init__(self, source: CellSource, layer: str, model: PCAModel) -> None:
        self._source = source
        self._layer = layer
        self.model = model
        self.dim = int(model.components.shape[0])

    def read(self, joinids: np.ndarray) -> np.ndarray:
        """Float32 ``[len(joinids), dim]``."""
        return self.model.transform(self._source.read_counts(self._layer, joinids))

    def describe(self) -> dict:
        """Provenance for the store's attributes."""
        return {"kind": "pca", "layer": self._layer, "dim": self.dim,
                "n_genes": len(self.model.genes), "target_sum": TARGET_SUM}


def make_features(
    source: CellSource, config: IngestConfig, cells: CellIndex
) -> EmbeddingFeatures | PCAFeatures:
    """The feature reader that ``config.features`` asks for (PCA: fitted on ``cells``)."""
    kind, _, arg = config.features.partition(":")
    if kind == "obsm":
        return EmbeddingFeatures(source, arg)
    model = fit_pca(source, config.layer, cells.sample(config.pca_fit_cells, config.seed),
                    int(arg), config.pca_genes, config.seed)
    return PCAFeatures(source, config.layer, model)
