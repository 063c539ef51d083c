"""An ``.h5ad`` file as a cell source, read backed through h5py in row blocks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sampleclr_scale.errors import InputError
from sampleclr_scale.sources.base import GENE_ID_COLUMN, OBS_BLOCK, CellSource, unreadable
from sampleclr_scale.sources.obs_filter import Filter


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
        for lo in range(0, self._n_obs, OBS_BLOCK):
            hi = min(lo + OBS_BLOCK, self._n_obs)
            frame = pd.DataFrame({c: _read_rows(self._file["obs"][c], lo, hi, read_elem)
                                  for c in needed})
            frame.insert(0, "joinid", np.arange(lo, hi, dtype=np.int64))
            if obs_filter is not None:
                frame = frame[obs_filter.evaluate(frame)]
            yield frame[["joinid", *columns]]

    def embedding_names(self) -> list[str]:
        return sorted(self._file["obsm"].keys()) if "obsm" in self._file else []

    def check_embedding(self, name: str) -> None:
        """Also refuse an obsm entry that is not a dense 2-D array (a sparse matrix or a
        data frame is stored as a group: it has no rows to read in blocks)."""
        super().check_embedding(name)
        elem = self._file["obsm"][name]
        if not hasattr(elem, "shape") or len(elem.shape) != 2:
            encoding = elem.attrs.get("encoding-type", "a group")
            raise InputError(
                f"obsm {name!r} of {self.uri} is stored as {encoding}, not a dense "
                "cells x dimensions array",
                f"store it dense (adata.obsm[{name!r}] = np.asarray(adata.obsm[{name!r}]), "
                "or .toarray() / .to_numpy()) and write the file again, or use --features "
                "pca:N")

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
