"""The cell-source interface: what ingest asks of wherever cells live.

A source answers three questions, always in blocks and never by loading the whole
dataset: which cells pass an obs filter (with the requested obs columns), what are the
features of a sorted set of cells (an obsm/embedding array), and what are their gene
counts (an X layer). Cells are addressed by ``joinid``: the SOMA ``soma_joinid``, or the
row number of an ``.h5ad`` file.
"""

from __future__ import annotations

import errno
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Self

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sampleclr_scale.errors import InputError
from sampleclr_scale.sources.obs_filter import Filter

OBS_BLOCK = 1 << 20  # obs rows read at a time


GENE_ID_COLUMN = "feature_id"
"""The var column of gene ids where a source has one (Census's Ensembl ids); else the var
index (in a SOMA experiment written from AnnData, the column named after it)."""


def unreadable(path: str) -> PermissionError | None:
    """The error for a local file, or folder, that this process may not read; None for
    anything else (h5py and tiledbsoma report an unreadable source as a bad file or a bad
    path)."""
    wanted = os.R_OK | os.X_OK if os.path.isdir(path) else os.R_OK
    if os.path.exists(path) and not os.access(path, wanted):
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    return None


class CellSource(ABC):
    """A collection of cells with obs metadata, embeddings and gene counts."""

    uri: str
    kind: str

    @property
    @abstractmethod
    def obs_columns(self) -> list[str]:
        """Names of the obs columns."""

    @abstractmethod
    def iter_obs(self, columns: list[str], obs_filter: Filter | None) -> Iterator[pd.DataFrame]:
        """Blocks of the obs rows passing ``obs_filter``, in increasing ``joinid`` order, with
        ``columns`` plus an int64 ``joinid`` column.

        Raises
        ------
        InputError
            If the filter's literals do not fit the types of its columns
            (:meth:`~sampleclr_scale.sources.obs_filter.Filter.check_types`).
        """

    @abstractmethod
    def embedding_names(self) -> list[str]:
        """Names of the per-cell embeddings (obsm)."""

    @abstractmethod
    def embedding_dim(self, name: str) -> int:
        """Width of embedding ``name``."""

    @abstractmethod
    def read_embedding(self, name: str, joinids: np.ndarray) -> np.ndarray:
        """Float32 rows of embedding ``name`` for sorted ``joinids``; NaN where absent."""

    @abstractmethod
    def var_names(self, layer: str) -> np.ndarray:
        """Gene ids (strings) of the X layer's columns: var column ``feature_id`` where
        there is one, else the var index."""

    @abstractmethod
    def read_counts(self, layer: str, joinids: np.ndarray) -> sp.csr_matrix:
        """Rows of X layer ``layer`` for sorted ``joinids`` as a CSR matrix."""

    @abstractmethod
    def close(self) -> None:
        """Release file handles."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_columns(self, columns: list[str], what: str) -> None:
        """Raise a clear error when any of ``columns`` is not an obs column."""
        missing = [c for c in columns if c not in self.obs_columns]
        if missing:
            raise InputError(
                f"{what} names obs column(s) {missing} that {self.uri} does not have",
                f"use one of its obs columns: {sorted(self.obs_columns)}",
            )

    def check_embedding(self, name: str) -> None:
        """Raise a clear error when ``name`` is not an embedding of this source."""
        if name not in self.embedding_names():
            raise InputError(
                f"{self.uri} has no cell embedding (obsm) named {name!r}",
                f"use one of {self.embedding_names()} (--features obsm:NAME), or genes "
                "with --features pca:N",
            )


def locate(joinids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | slice]:
    """Positions in sorted ``joinids`` of those ``ids`` it contains, and which ids those are.

    ``ids`` come from a read of the span ``joinids[0]..joinids[-1]`` (dense) or of the
    points ``joinids`` themselves. A dense span uses a lookup table (linear time), points
    a binary search.
    """
    if dense_span(joinids):
        lookup = np.full(int(joinids[-1] - joinids[0]) + 1, -1, dtype=np.int64)
        lookup[joinids - joinids[0]] = np.arange(len(joinids))
        pos = lookup[ids - joinids[0]]
        if len(lookup) == len(joinids):  # every id of the span is wanted
            return pos, slice(None)
        keep = pos >= 0
        return pos[keep], keep
    pos = np.minimum(np.searchsorted(joinids, ids), len(joinids) - 1)
    keep = joinids[pos] == ids
    return pos[keep], keep


def dense_span(joinids: np.ndarray) -> bool:
    """Whether reading the span ``joinids[0]..joinids[-1]`` wastes at most half of it."""
    return int(joinids[-1] - joinids[0] + 1) <= 2 * len(joinids)
