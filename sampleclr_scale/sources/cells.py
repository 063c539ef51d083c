"""Cell sources: a SOMA experiment, CELLxGENE Census, or an ``.h5ad`` file read backed.

A source answers three questions, always in blocks and never by loading the whole
dataset: which cells pass an obs filter (with the requested obs columns), what are the
features of a sorted set of cells (an obsm/embedding array), and what are their gene
counts (an X layer). Cells are addressed by ``joinid``: the SOMA ``soma_joinid``, or the
row number of an ``.h5ad`` file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sampleclr_scale.config import is_census
from sampleclr_scale.errors import InputError
from sampleclr_scale.sources.obs_filter import Filter

_OBS_BLOCK = 1 << 20  # obs rows read at a time
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


def _locate(joinids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | slice]:
    """Positions in sorted ``joinids`` of those ``ids`` it contains, and which ids those are.

    ``ids`` come from a read of the span ``joinids[0]..joinids[-1]`` (dense) or of the
    points ``joinids`` themselves. A dense span uses a lookup table (linear time), points
    a binary search.
    """
    if _dense_span(joinids):
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


def _dense_span(joinids: np.ndarray) -> bool:
    """Whether reading the span ``joinids[0]..joinids[-1]`` wastes at most half of it."""
    return int(joinids[-1] - joinids[0] + 1) <= 2 * len(joinids)


class SomaSource(CellSource):
    """One SOMA Experiment (a local path, an s3:// URI, or Census's ``census_data/...``).

    Parameters
    ----------
    experiment
        An open ``tiledbsoma.Experiment``.
    uri
        Its URI, for messages and provenance.
    measurement
        The measurement holding X layers and obsm (``RNA`` in Census).
    owner
        An enclosing open SOMA object (e.g. the Census collection) to close with it.
    """

    kind = "soma"

    def __init__(self, experiment, uri: str, measurement: str = "RNA", owner=None) -> None:
        self._exp = experiment
        self._owner = owner
        self.uri = uri
        if measurement not in experiment.ms:
            raise InputError(
                f"SOMA experiment {uri} has no measurement {measurement!r}",
                f"pass one of {sorted(experiment.ms.keys())} as --measurement",
            )
        self._ms = experiment.ms[measurement]
        self._obs_columns = [
            name for name in experiment.obs.schema.names if name != "soma_joinid"
        ]

    @classmethod
    def open(cls, uri: str, measurement: str = "RNA") -> SomaSource:
        """Open a SOMA experiment, with a clear error for anything else."""
        import tiledbsoma

        try:
            obj = tiledbsoma.open(uri)
        except Exception as err:  # tiledbsoma raises several types for a bad path
            raise unreadable(uri) or InputError(
                f"cannot open {uri!r} as a SOMA experiment: {err}",
                "pass the URI of a SOMA Experiment (a directory written by tiledbsoma), "
                "an .h5ad file, or census[:VERSION]",
            ) from None
        if not isinstance(obj, tiledbsoma.Experiment):
            obj.close()
            raise InputError(
                f"{uri} is a SOMA {type(obj).__name__}, not an Experiment",
                "for a Census-shaped collection use census:URI; otherwise pass the "
                "experiment inside it",
            )
        return cls(obj, uri, measurement)

    @property
    def obs_columns(self) -> list[str]:
        return self._obs_columns

    def iter_obs(self, columns: list[str], obs_filter: Filter | None) -> Iterator[pd.DataFrame]:
        import tiledbsoma

        value_filter = None
        if obs_filter is not None:
            obs_filter.check_types(self._exp.obs.schema.empty_table().to_pandas())
            value_filter = obs_filter.soma_expression
        for lo in range(0, self._max_joinid() + 1, _OBS_BLOCK):
            try:
                tables = list(self._exp.obs.read(
                    coords=(slice(lo, lo + _OBS_BLOCK - 1),),
                    column_names=["soma_joinid", *columns], value_filter=value_filter))
            except (tiledbsoma.SOMAError, ValueError) as err:
                raise InputError(
                    f"obs filter {value_filter!r} was refused by {self.uri}: {err}",
                    "use the SOMA value-filter syntax on existing obs columns",
                ) from None
            for table in tables:
                yield table.to_pandas().rename(columns={"soma_joinid": "joinid"})

    def _max_joinid(self) -> int:
        """The largest obs ``soma_joinid`` in use (from the array's non-empty domain)."""
        domain = self._exp.obs.non_empty_domain()
        return int(domain[0][1]) if domain and domain[0] else -1

    def embedding_names(self) -> list[str]:
        return sorted(self._ms.obsm.keys()) if "obsm" in self._ms else []

    def _embedding_array(self, name: str):
        if name.startswith(("/", "s3://", "gs://", "file://")):
            # A separately hosted embedding keyed by soma_joinid (as Census hosts them).
            import tiledbsoma

            return tiledbsoma.SparseNDArray.open(name)
        self.check_embedding(name)
        return self._ms.obsm[name]

    def embedding_dim(self, name: str) -> int:
        return int(self._embedding_array(name).shape[1])

    def read_embedding(self, name: str, joinids: np.ndarray) -> np.ndarray:
        array = self._embedding_array(name)
        out = np.full((len(joinids), array.shape[1]), np.nan, dtype=np.float32)
        if len(joinids) == 0:
            return out
        coords = slice(int(joinids[0]), int(joinids[-1])) if _dense_span(joinids) else joinids
        for table in array.read(coords=(coords,)).tables():
            rows, keep = _locate(joinids, table["soma_dim_0"].to_numpy())
            out[rows, table["soma_dim_1"].to_numpy()[keep]] = table["soma_data"].to_numpy()[keep]
        return out

    def _layer(self, layer: str):
        if layer not in self._ms.X:
            raise InputError(
                f"{self.uri} has no X layer {layer!r}",
                f"use one of {sorted(self._ms.X.keys())} with --layer",
            )
        return self._ms.X[layer]

    def var_names(self, layer: str) -> np.ndarray:
        """Gene ids of the X layer's columns (column ``i`` is var ``soma_joinid`` ``i``):
        :func:`soma_gene_ids`."""
        n_var = int(self._layer(layer).shape[1])
        column = soma_gene_ids(self._ms.var)
        columns = list(dict.fromkeys(["soma_joinid", column]))
        var = self._ms.var.read(column_names=columns).concat()
        joinid = var["soma_joinid"].to_numpy()
        ids = np.full(n_var, "", dtype=object)
        inside = joinid < n_var
        ids[joinid[inside]] = var[column].to_numpy().astype(str)[inside]
        return ids

    def read_counts(self, layer: str, joinids: np.ndarray) -> sp.csr_matrix:
        array = self._layer(layer)
        n_var = int(array.shape[1])
        if len(joinids) == 0:
            return sp.csr_matrix((0, n_var), dtype=np.float32)
        coords = slice(int(joinids[0]), int(joinids[-1])) if _dense_span(joinids) else joinids
        rows, cols, vals = [], [], []
        for table in array.read(coords=(coords,)).tables():
            pos, keep = _locate(joinids, table["soma_dim_0"].to_numpy())
            rows.append(pos)
            cols.append(table["soma_dim_1"].to_numpy()[keep])
            vals.append(table["soma_data"].to_numpy()[keep].astype(np.float32))
        if not rows:
            return sp.csr_matrix((len(joinids), n_var), dtype=np.float32)
        return sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(len(joinids), n_var),
            dtype=np.float32,
        )

    def close(self) -> None:
        self._exp.close()
        if self._owner is not None:
            self._owner.close()


def soma_gene_ids(var) -> str:
    """The column of a SOMA var dataframe that holds gene ids: ``feature_id``, else the
    AnnData var index it was written from (``var_id`` when unnamed), else ``soma_joinid``."""
    names = var.schema.names
    index = json.loads(var.metadata.get("soma_dataframe_original_index_name", "null"))
    return next((c for c in (GENE_ID_COLUMN, index or "var_id") if c in names), "soma_joinid")


class H5adSource(CellSource):
    """An ``.h5ad`` file read backed through h5py: obs columns, obsm and X in row blocks."""

    kind = "h5ad"

    def __init__(self, path: str) -> None:
        import h5py

        self.uri = str(path)
        if not Path(path).is_file():
            raise InputError(
                f"source {path!r} does not exist",
                "pass an existing .h5ad file, a SOMA experiment URI, or census[:VERSION]",
            )
        try:
            self._file = h5py.File(path, "r")
        except OSError as err:
            raise unreadable(path) or InputError(
                f"{path} is not an .h5ad (HDF5) file: {err}",
                "pass an AnnData .h5ad file written by anndata/scanpy",
            ) from None
        if "obs" not in self._file:
            self._file.close()
            raise InputError(f"{path} has no 'obs' group, so it is not an AnnData file",
                             "pass an AnnData .h5ad file written by anndata/scanpy")
        obs = self._file["obs"]
        index_key = obs.attrs.get("_index", "_index")
        self._obs_columns = [k for k in obs if k != index_key]
        self._n_obs = int(obs[index_key].shape[0])

    @property
    def obs_columns(self) -> list[str]:
        return self._obs_columns

    def iter_obs(self, columns: list[str], obs_filter: Filter | None) -> Iterator[pd.DataFrame]:
        from anndata.io import read_elem

        in_filter = obs_filter.columns if obs_filter is not None else []
        needed = list(dict.fromkeys([*columns, *in_filter]))
        self.check_columns(needed, "the obs filter or cohort")
        for lo in range(0, self._n_obs, _OBS_BLOCK):
            hi = min(lo + _OBS_BLOCK, self._n_obs)
            frame = pd.DataFrame({c: _read_rows(self._file["obs"][c], lo, hi, read_elem)
                                  for c in needed})
            frame.insert(0, "joinid", np.arange(lo, hi, dtype=np.int64))
            if obs_filter is not None:
                frame = frame[obs_filter.evaluate(frame)]
            yield frame[["joinid", *columns]]

    def embedding_names(self) -> list[str]:
        return sorted(self._file["obsm"].keys()) if "obsm" in self._file else []

    def embedding_dim(self, name: str) -> int:
        self.check_embedding(name)
        return int(self._file["obsm"][name].shape[1])

    def read_embedding(self, name: str, joinids: np.ndarray) -> np.ndarray:
        self.check_embedding(name)
        if len(joinids) == 0:
            return np.empty((0, self.embedding_dim(name)), dtype=np.float32)
        lo, hi = int(joinids[0]), int(joinids[-1]) + 1
        block = self._file["obsm"][name][lo:hi]
        return np.asarray(block[joinids - lo], dtype=np.float32)

    def _x(self, layer: str):
        from anndata.io import sparse_dataset

        if layer in ("X", "raw", ""):
            elem = self._file["X"]
        elif "layers" in self._file and layer in self._file["layers"]:
            elem = self._file["layers"][layer]
        else:
            layers = list(self._file["layers"]) if "layers" in self._file else []
            raise InputError(f"{self.uri} has no layer {layer!r}",
                             f"use X or one of {layers} with --layer")
        return elem if hasattr(elem, "shape") else sparse_dataset(elem)

    def var_names(self, layer: str) -> np.ndarray:
        from anndata.io import read_elem

        self._x(layer)
        var = self._file["var"]
        column = GENE_ID_COLUMN if GENE_ID_COLUMN in var else var.attrs.get("_index", "_index")
        return np.asarray(read_elem(var[column])).astype(str)

    def read_counts(self, layer: str, joinids: np.ndarray) -> sp.csr_matrix:
        x = self._x(layer)
        if len(joinids) == 0:
            return sp.csr_matrix((0, x.shape[1]), dtype=np.float32)
        lo, hi = int(joinids[0]), int(joinids[-1]) + 1
        block = x[lo:hi]
        block = block if sp.issparse(block) else sp.csr_matrix(block)
        return sp.csr_matrix(block[joinids - lo], dtype=np.float32)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._file.close()


def _read_rows(elem, lo: int, hi: int, read_elem) -> pd.Series | np.ndarray:
    """Rows ``lo:hi`` of an h5ad obs column: a plain dataset, or a categorical group
    (codes + categories) read without loading the other rows."""
    if hasattr(elem, "shape"):  # an HDF5 dataset
        import h5py

        return (elem.asstr() if h5py.check_string_dtype(elem.dtype) else elem)[lo:hi]
    if "codes" in elem and "categories" in elem:
        categories = read_elem(elem["categories"])
        return pd.Categorical.from_codes(elem["codes"][lo:hi], categories=categories,
                                         ordered=bool(elem.attrs.get("ordered", False)))
    return read_elem(elem)[lo:hi]  # other encodings (nullable arrays): read, then slice


def open_source(spec: str, measurement: str = "RNA", organism: str = "homo_sapiens") -> CellSource:
    """Open a source from its command-line spelling.

    Parameters
    ----------
    spec
        ``path/to/file.h5ad``; a SOMA experiment URI; ``census`` (the stable release),
        ``census:VERSION`` (e.g. ``census:2025-11-08``), or ``census:PATH_OR_URI`` for a
        Census-shaped SOMA collection stored elsewhere (mirrors, offline copies).
    measurement
        Measurement of the experiment that holds X and obsm.
    organism
        Census organism (``homo_sapiens``, ``mus_musculus``, ...).
    """
    if is_census(spec):
        return _open_census(_absolute(spec.partition(":")[2]) or "stable", measurement,
                            organism)
    if "://" not in spec:  # the store records where its cells came from: absolute paths
        spec = str(Path(spec).resolve())
    if spec.endswith(".h5ad"):
        return H5adSource(spec)
    if "://" not in spec and not Path(spec).exists():
        raise InputError(
            f"source {spec!r} does not exist",
            "pass an existing .h5ad file, a SOMA experiment URI, or census[:VERSION]",
        )
    return SomaSource.open(spec, measurement)


def _absolute(location: str) -> str:
    """A Census location with a local path made absolute (anything spelt like a path, or
    an existing folder such as ``census-copy``); URIs, versions (``2025-11-08``,
    ``stable``) and the empty string unchanged."""
    is_path = location.startswith(".") or "/" in location or (
        bool(location) and Path(location).is_dir())
    if "://" in location or not is_path:
        return location
    return str(Path(location).resolve())


def _open_census(where: str, measurement: str, organism: str) -> SomaSource:
    import cellxgene_census

    is_uri = "/" in where or where.startswith(".")
    try:
        census = (
            cellxgene_census.open_soma(uri=where)
            if is_uri
            else cellxgene_census.open_soma(census_version=where)
        )
    except Exception as err:  # network, version or layout errors
        raise InputError(
            f"cannot open CELLxGENE Census {where!r}: {err}",
            "use census:VERSION (e.g. census:stable) with network access, or census:PATH to "
            "a local Census-shaped SOMA collection",
        ) from None
    data = census["census_data"]
    if organism not in data:
        census.close()
        raise InputError(f"Census {where} has no organism {organism!r}",
                         f"use one of {sorted(data.keys())} with --organism")
    return SomaSource(data[organism], f"census:{where}/{organism}", measurement, owner=census)
