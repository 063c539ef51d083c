"""Donor search: the atlas donors nearest to query donors, by cosine distance of embeddings.

A query is either a new cohort's embedding folder (its store embedded with the atlas's
model: ``ingest --features-like ATLAS_STORE``, then ``embed --checkpoint ATLAS_RUN``) or
donors of the atlas itself, by id. A query folder from another model or feature space is
refused (:func:`check_same_model`): its vectors live in another space, and their
distances to the atlas's would mean nothing.

Results (:class:`SearchResult`, written by :meth:`SearchResult.write`):

- ``neighbours.parquet``: one row per query donor and rank: ``query`` (the query donor's
  id), ``rank`` (1 = nearest), ``distance`` (``1 - cos``), ``donor_index`` (the atlas
  donor's position in its store) and every column of the atlas's donor table (``donor``,
  metadata, ``n_cells``, ``split``);
- ``neighbours.h5ad``: the same rows as ``obs``, ``X`` the atlas donors' vectors,
  ``uns["search"]`` the atlas, ``k`` and the index's settings.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sampleclr_scale.embed.config import DONORS_PARQUET, PROVENANCE_FILE
from sampleclr_scale.errors import InputError
from sampleclr_scale.search.index import IndexSettings, open_index, read_vectors
from sampleclr_scale.storage import Location, files_output, staged_output

if TYPE_CHECKING:
    import anndata

NEIGHBOURS_PARQUET = "neighbours.parquet"
NEIGHBOURS_H5AD = "neighbours.h5ad"
SEARCH_RESULTS = files_output("a donor search result", (NEIGHBOURS_PARQUET, NEIGHBOURS_H5AD),
                              commit=NEIGHBOURS_PARQUET)
"""What ``search --overwrite`` replaces: a folder of those files and nothing else."""
MODEL_KEYS = ("checkpoint", "trained_on", "model_config")
"""Provenance entries that must be equal for two embedding folders to share a model."""


@dataclass
class SearchResult:
    """The nearest atlas donors of each query donor.

    Attributes
    ----------
    table : pd.DataFrame
        One row per query donor and rank (see the module docstring).
    vectors : np.ndarray
        Float32 ``[len(table), D]`` vectors of the atlas donors in ``table``.
    info : dict
        The atlas, ``k``, what was queried, and the index's ``index.json``.
    """

    table: pd.DataFrame
    vectors: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def to_anndata(self) -> anndata.AnnData:
        """The result as AnnData: ``obs`` = :attr:`table`, ``X`` = :attr:`vectors`."""
        import anndata

        obs = self.table.copy()
        obs.index = (obs["query"].astype(str) + ":" + obs["rank"].astype(str)).to_numpy()
        return anndata.AnnData(X=self.vectors, obs=obs,
                               uns={"search": json.dumps(self.info, default=str)})

    def write(self, out: str | os.PathLike | Location, overwrite: bool = False) -> Location:
        """Write ``neighbours.parquet`` and ``neighbours.h5ad`` into ``out`` (atomically)."""
        with staged_output(out, overwrite, kind=SEARCH_RESULTS) as staging:
            staging.mkdir(parents=True)
            self.to_anndata().write_h5ad(staging / NEIGHBOURS_H5AD)
            self.table.to_parquet(staging / NEIGHBOURS_PARQUET, index=False)
        return Location(out)


def search_donors(atlas: str | os.PathLike | Location, *,
                  query: str | os.PathLike | Location | None = None,
                  donors: list[str] | None = None, k: int = 10,
                  settings: IndexSettings | None = None, rebuild: bool = False) -> SearchResult:
    """The ``k`` atlas donors nearest to each query donor, through the atlas's index.

    The index is built on first use and saved in ``ATLAS/search_index`` (rebuilt when the
    embeddings changed; :func:`~sampleclr_scale.search.index.open_index`).

    Parameters
    ----------
    atlas : str, Path or Location
        The atlas's embedding folder (``sampleclr-scale embed``).
    query : str, Path or Location, optional
        An embedding folder of new donors embedded with the atlas's model: every donor of
        it is a query.
    donors : list of str, optional
        Ids (the ``donor`` column) of atlas donors to query instead; a donor is not its
        own neighbour.
    k : int
        Neighbours per query donor.
    settings : IndexSettings, optional
        HNSW settings of the index.
    rebuild : bool
        Rebuild the index even when it is current.

    Returns
    -------
    SearchResult
        Donors, distances and metadata; ``.write(out)`` saves them as Parquet and h5ad.

    Raises
    ------
    InputError
        For neither or both of ``query`` and ``donors``, unknown donor ids, or a query
        folder from another model or feature space.

    Example
    -------
    >>> from sampleclr_scale.search import search_donors
    >>> result = search_donors("atlas/embeddings", query="my_cohort/embeddings", k=10)
    >>> result.table[["query", "rank", "donor", "distance", "disease"]].head()
    >>> result.write("my_cohort/nearest_atlas_donors")
    """
    if (query is None) == (donors is None):
        raise InputError("search needs one query: a new cohort's embeddings or atlas donors",
                         "pass --query EMB or --donors ID [ID ...], not both")
    if k < 1:
        raise InputError(f"k = {k} must be at least 1", "ask for one or more neighbours")
    atlas = Location(atlas)
    meta = _atlas_table(atlas)
    atlas_vectors = read_vectors(atlas)
    if query is not None:
        query = Location(query)
        check_same_model(_provenance(atlas), _provenance(query), atlas, query)
        vectors = read_vectors(query)
        names = _donor_names(query)
        own = None
    else:
        own = _atlas_positions(meta, donors, atlas)
        vectors, names = atlas_vectors[own], list(donors)
    if vectors.shape[1] != atlas_vectors.shape[1]:
        raise InputError(f"the vectors of {query} are {vectors.shape[1]}-wide, the atlas's "
                         f"{atlas_vectors.shape[1]}-wide",
                         "embed the query with the atlas's model")
    index, built = open_index(atlas, settings, rebuild)
    k = min(k, index.meta["n"] - (own is not None))
    positions, distances = index.search(vectors, k + (own is not None))
    if own is not None:
        positions, distances = drop_self(positions, distances, own, k)
    info = {"atlas": atlas.uri, "query": None if query is None else query.uri,
            "k": k, "index_built": built, "index": index.meta}
    return _result(meta, atlas_vectors, names, positions, distances, info)


def drop_self(positions: np.ndarray, distances: np.ndarray, own: np.ndarray,
              k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` first neighbours other than the query donor itself (``own``)."""
    keep = positions != own[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept ones first, in order
    return (np.take_along_axis(positions, order, axis=1),
            np.take_along_axis(distances, order, axis=1))


def check_same_model(atlas_prov: dict[str, Any], query_prov: dict[str, Any],
                     atlas: Location, query: Location) -> None:
    """Refuse a query folder whose embeddings come from another model or feature space.

    Compares the provenance of both folders: the model's feature-spec fingerprint (when
    both record one), then the checkpoint, the store it was trained on and the model
    configuration.

    Raises
    ------
    InputError
        Naming what differs and how to embed the query in the atlas's space.
    """
    fix = (f"embed the query's cells with the atlas's model: ingest them with "
           f"--features-like {atlas_prov.get('trained_on') or 'ATLAS_STORE'}, then "
           f"embed --checkpoint {atlas_prov.get('checkpoint') or 'ATLAS_RUN'}")
    ours = (atlas_prov.get("feature_spec") or {}).get("fingerprint")
    theirs = (query_prov.get("feature_spec") or {}).get("fingerprint")
    if ours and theirs and ours != theirs:
        raise InputError(f"{query} was embedded from another feature space than the atlas "
                         f"{atlas} (feature-spec fingerprint {theirs[:12]} vs {ours[:12]})", fix)
    for key in MODEL_KEYS:
        if atlas_prov.get(key) != query_prov.get(key):
            shown = {p: str(prov.get(key))[:80] for p, prov in (("query", query_prov),
                                                                ("atlas", atlas_prov))}
            raise InputError(f"{query} was embedded with another model than the atlas {atlas}"
                             f": {key} {shown['query']!r} vs {shown['atlas']!r}", fix)


# ---- helpers ---------------------------------------------------------------------------


def _provenance(emb: Location) -> dict[str, Any]:
    path = emb / PROVENANCE_FILE
    if not path.is_file():
        raise InputError(f"{emb} has no {PROVENANCE_FILE}: which model made it is unknown",
                         "pass embedding folders written by `sampleclr-scale embed`")
    return json.loads(path.read_text())


def _atlas_table(atlas: Location) -> pd.DataFrame:
    path = atlas / DONORS_PARQUET
    if not path.is_file():
        raise InputError(f"{atlas} has no {DONORS_PARQUET}",
                         "pass the atlas's embedding folder (`sampleclr-scale embed --out`)")
    schema = path.parquet_file().schema_arrow
    return path.read_parquet([c for c in schema.names if c != "z"]).to_pandas()


def _donor_names(emb: Location) -> list[str]:
    return [str(d) for d in (emb / DONORS_PARQUET).read_parquet(["donor"]).column("donor")
            .to_pylist()]


def _atlas_positions(meta: pd.DataFrame, donors: list[str], atlas: Location) -> np.ndarray:
    row = pd.Series(np.arange(len(meta)), index=meta["donor"].astype(str).to_numpy())
    row = row[~row.index.duplicated()]
    missing = [d for d in donors if d not in row.index]
    if missing:
        raise InputError(f"{len(missing)} of the donors are not in the atlas {atlas}, e.g. "
                         f"{missing[:3]}", f"use ids of its donor column, e.g. "
                         f"{meta['donor'].astype(str).head(3).tolist()}")
    return row[list(donors)].to_numpy().astype(np.int64)


def _result(meta: pd.DataFrame, atlas_vectors: np.ndarray, names: list[str],
            positions: np.ndarray, distances: np.ndarray, info: dict[str, Any]) -> SearchResult:
    q, k = positions.shape
    rows = positions.ravel()
    found = rows >= 0  # faiss marks missing neighbours (fewer than k reachable) with -1
    front = pd.DataFrame({"query": np.repeat(np.asarray(names, dtype=object), k)[found],
                          "rank": np.tile(np.arange(1, k + 1), q)[found],
                          "distance": distances.ravel()[found]})
    table = pd.concat([front, meta.iloc[rows[found]].reset_index(drop=True)], axis=1)
    return SearchResult(table, atlas_vectors[rows[found]], info)
