"""An AnnData object as a cell source: in memory, or backed (``read_h5ad(path, backed="r")``).

The notebook's way in (:mod:`sampleclr_scale.api`): ingest reads the object's obs, obsm and
X layers in row blocks through the :class:`~sampleclr_scale.sources.base.CellSource`
interface, as it reads an ``.h5ad`` file or a SOMA experiment, so nothing is written to
disk but the bag store. Cells are addressed by their row number in the object (the
``joinid``), so results keyed by ``source_joinid`` line up with ``adata.obs_names``.
Backed objects keep X on disk and read it in row blocks (obs and obsm are in memory, as
anndata holds them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sampleclr_scale.errors import InputError
from sampleclr_scale.sources.base import GENE_ID_COLUMN, CellSource
from sampleclr_scale.sources.obs_filter import Filter

_OBS_BLOCK = 1 << 20  # obs rows handed to the cohort at a time
IN_MEMORY = "in-memory AnnData"
"""The ``uri`` of an AnnData object that is not backed by a file (for messages and the
store's ``source`` attribute)."""


def describe(adata: Any) -> str:
    """The AnnData object in words, for messages: its file, or ``in-memory AnnData``."""
    filename = getattr(adata, "filename", None) if getattr(adata, "isbacked", False) else None
    return str(filename) if filename is not None else IN_MEMORY


class AnnDataSource(CellSource):
    """Cells of an ``anndata.AnnData`` object, in memory or backed.

    Parameters
    ----------
    adata
        The object. It is read, never changed.

    Raises
    ------
    InputError
        For anything that is not an AnnData object.
    """

    def __init__(self, adata: Any) -> None:
        import anndata

        if not isinstance(adata, anndata.AnnData):
            raise InputError(f"expected an anndata.AnnData, got {type(adata).__name__}",
                             "pass an AnnData (anndata.read_h5ad(path), or backed='r' for "
                             "one larger than memory)")
        self._adata = adata
        self.uri = describe(adata)
        self.kind = "h5ad" if adata.isbacked else "anndata"

    @property
    def obs_columns(self) -> list[str]:
        return [str(c) for c in self._adata.obs.columns]

    def iter_obs(self, columns: list[str], obs_filter: Filter | None) -> Iterator[pd.DataFrame]:
        in_filter = obs_filter.columns if obs_filter is not None else []
        needed = list(dict.fromkeys([*columns, *in_filter]))
        self.check_columns(needed, "the obs filter or cohort")
        obs = self._adata.obs
        for lo in range(0, self._adata.n_obs, _OBS_BLOCK):
            hi = min(lo + _OBS_BLOCK, self._adata.n_obs)
            frame = obs.iloc[lo:hi][needed].reset_index(drop=True)
            frame.insert(0, "joinid", np.arange(lo, hi, dtype=np.int64))
            if obs_filter is not None:
                frame = frame[obs_filter.evaluate(frame)]
            yield frame[["joinid", *columns]]

    def embedding_names(self) -> list[str]:
        return sorted(str(k) for k in self._adata.obsm)

    def embedding_dim(self, name: str) -> int:
        self.check_embedding(name)
        return int(self._adata.obsm[name].shape[1])

    def read_embedding(self, name: str, joinids: np.ndarray) -> np.ndarray:
        self.check_embedding(name)
        values = self._adata.obsm[name]
        values = values.to_numpy() if isinstance(values, pd.DataFrame) else values
        if sp.issparse(values):
            values = values.tocsr()[joinids].toarray()
            return np.asarray(values, dtype=np.float32)
        return np.asarray(values[joinids], dtype=np.float32)

    def _x(self, layer: str) -> Any:
        if layer in ("X", "raw", ""):
            if self._adata.X is None:
                raise InputError(f"the {self.uri} has no X",
                                 "set adata.X to the counts, or name a layer that has them")
            return self._adata.X
        if layer not in self._adata.layers:
            raise InputError(f"the {self.uri} has no layer {layer!r}",
                             f"use X or one of {list(self._adata.layers)}")
        return self._adata.layers[layer]

    def var_names(self, layer: str) -> np.ndarray:
        self._x(layer)
        var = self._adata.var
        ids = var[GENE_ID_COLUMN] if GENE_ID_COLUMN in var.columns else var.index
        return np.asarray(ids).astype(str)

    def read_counts(self, layer: str, joinids: np.ndarray) -> sp.csr_matrix:
        x = self._x(layer)
        if len(joinids) == 0:
            return sp.csr_matrix((0, x.shape[1]), dtype=np.float32)
        lo, hi = int(joinids[0]), int(joinids[-1]) + 1
        block = x[lo:hi]  # one range read of a backed X
        block = block if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
        return sp.csr_matrix(block[joinids - lo], dtype=np.float32)

    def close(self) -> None:
        """Nothing to release: the object belongs to the caller."""
