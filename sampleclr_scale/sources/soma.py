"""A SOMA experiment as a cell source (a local path, a URI, or a Census experiment)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sampleclr_scale.errors import InputError
from sampleclr_scale.sources.base import (
    GENE_ID_COLUMN,
    OBS_BLOCK,
    CellSource,
    dense_span,
    locate,
    unreadable,
)
from sampleclr_scale.sources.obs_filter import Filter


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
        for lo in range(0, self._max_joinid() + 1, OBS_BLOCK):
            try:
                tables = list(self._exp.obs.read(
                    coords=(slice(lo, lo + OBS_BLOCK - 1),),
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
        with _readable(self.uri, f"obsm {name!r}"):
            return int(self._embedding_array(name).shape[1])

    def read_embedding(self, name: str, joinids: np.ndarray) -> np.ndarray:
        with _readable(self.uri, f"obsm {name!r}"):
            array = self._embedding_array(name)
            out = np.full((len(joinids), array.shape[1]), np.nan, dtype=np.float32)
            if len(joinids) == 0:
                return out
            span = dense_span(joinids)
            coords = slice(int(joinids[0]), int(joinids[-1])) if span else joinids
            for table in array.read(coords=(coords,)).tables():
                rows, keep = locate(joinids, table["soma_dim_0"].to_numpy())
                out[rows, table["soma_dim_1"].to_numpy()[keep]] = (
                    table["soma_data"].to_numpy()[keep])
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
        with _readable(self.uri, f"X layer {layer!r}"):
            return self._read_counts(layer, joinids)

    def _read_counts(self, layer: str, joinids: np.ndarray) -> sp.csr_matrix:
        array = self._layer(layer)
        n_var = int(array.shape[1])
        if len(joinids) == 0:
            return sp.csr_matrix((0, n_var), dtype=np.float32)
        coords = slice(int(joinids[0]), int(joinids[-1])) if dense_span(joinids) else joinids
        rows, cols, vals = [], [], []
        for table in array.read(coords=(coords,)).tables():
            pos, keep = locate(joinids, table["soma_dim_0"].to_numpy())
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


@contextlib.contextmanager
def _readable(uri: str, what: str) -> Iterator[None]:
    """Turn TileDB's error on a damaged array (a fragment, or its metadata, missing or
    unreadable) into one that names the array and the fix."""
    import tiledbsoma

    try:
        yield
    except tiledbsoma.SOMAError as err:
        detail = str(err).strip().splitlines()[-1].strip()
        raise InputError(
            f"cannot read {what} of {uri}: {detail}",
            "the experiment is damaged or incomplete (part of an array is missing or "
            "unreadable): write it again from its source, or copy it again whole",
        ) from None


def soma_gene_ids(var) -> str:
    """The column of a SOMA var dataframe that holds gene ids: ``feature_id``, else the
    AnnData var index it was written from (``var_id`` when unnamed), else ``soma_joinid``."""
    names = var.schema.names
    index = json.loads(var.metadata.get("soma_dataframe_original_index_name", "null"))
    return next((c for c in (GENE_ID_COLUMN, index or "var_id") if c in names), "soma_joinid")
