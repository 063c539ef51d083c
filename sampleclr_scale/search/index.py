"""The donor search index of an embedding folder: built once, saved beside the embeddings.

``EMB/search_index/`` holds ``index.faiss`` (a faiss index over the donors' unit vectors,
inner product = cosine similarity: exact up to ``IndexSettings.exact_limit`` donors, an
HNSW graph above) and ``index.json`` (written last: the
fingerprint of the ``donor_embeddings.parquet`` it was built from, the number and width
of the vectors, the settings). It is built with
:func:`~sampleclr_scale.storage.staged_output` (atomic; a concurrent build is refused)
and rebuilt whenever the embeddings' fingerprint no longer matches (``embed
--overwrite`` wrote new ones), so a stale index is never searched.

Why faiss (measured in benchmarks/README.md, "Donor search"): its exact search answers
thousands of queries per CPU-second at tens of thousands of donors, and its HNSW reached
recall@10 >= 0.95 at 1,000,000 donors with more queries per second and a faster build
than pynndescent (numba, whose compilation alone takes minutes here); hnswlib has no
wheels (it needs a compiler).

Row ``i`` of the index is row ``i`` of ``donor_embeddings.parquet``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from sampleclr_scale._linalg import unit_rows
from sampleclr_scale.embed.config import DONORS_PARQUET, SEARCH_INDEX_DIR
from sampleclr_scale.errors import InputError
from sampleclr_scale.storage import Location, files_output, staged_output

if TYPE_CHECKING:
    import faiss

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
SEARCH_INDEX = files_output("a donor search index", (INDEX_FILE, META_FILE), commit=META_FILE)
"""What a rebuild replaces: a folder of those files and nothing else."""
FORMAT = 1
"""Version of the index folder's layout; another version is rebuilt."""


@dataclass(frozen=True)
class IndexSettings:
    """Index settings: exact or HNSW (Malkov & Yashunin 2018), chosen by ``bench search``.

    Attributes
    ----------
    exact_limit : int
        Up to this many donors the index is exact (faiss ``IndexFlatIP``: recall 1, and
        at 15,000 donors as fast as HNSW); above, HNSW.
    m : int
        Links per node of the graph (memory ``~ 2 m`` ints per donor).
    ef_construction : int
        Candidates kept while inserting (build time against graph quality).
    ef_search : int
        Candidates kept while searching (queries/s against recall).
    """

    exact_limit: int = 50_000
    m: int = 32
    ef_construction: int = 80
    ef_search: int = 128


@dataclass
class DonorIndex:
    """An opened search index and what it was built from.

    Attributes
    ----------
    index : faiss.Index
        The HNSW index over unit vectors.
    meta : dict
        ``index.json``: ``fingerprint``, ``n``, ``dim``, ``settings``, ``format``.
    """

    index: faiss.Index
    meta: dict[str, Any]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest donors of each query by cosine distance.

        Parameters
        ----------
        queries : np.ndarray
            ``[q, dim]`` vectors (any length; scaled to unit length here).
        k : int
            Neighbours per query (at most the indexed donors).

        Returns
        -------
        positions, distances
            Int64 ``[q, k]`` rows of ``donor_embeddings.parquet`` and float64 ``[q, k]``
            cosine distances ``1 - cos`` in ``[0, 2]``, nearest first.
        """
        unit = np.ascontiguousarray(unit_rows(queries), dtype=np.float32)
        if self.meta["kind"] == "hnsw":
            self.index.hnsw.efSearch = max(self.meta["settings"]["ef_search"], k)
        similarity, positions = self.index.search(unit, k)
        return positions.astype(np.int64), np.clip(1.0 - similarity.astype(np.float64), 0, 2)


def embeddings_fingerprint(emb: str | os.PathLike | Location) -> str:
    """SHA-256 of the embedding folder's ``donor_embeddings.parquet``."""
    path = Location(emb) / DONORS_PARQUET
    if not path.is_file():
        raise InputError(f"{emb} has no {DONORS_PARQUET}",
                         "pass an embedding folder written by `sampleclr-scale embed`")
    digest = hashlib.sha256()
    with path.fs.open(path.path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def read_vectors(emb: str | os.PathLike | Location) -> np.ndarray:
    """The float32 ``[n, D]`` vectors ``z`` of an embedding folder, in file order."""
    path = Location(emb) / DONORS_PARQUET
    try:
        z = path.read_parquet(["z"]).column("z").combine_chunks()
    except (pa.ArrowInvalid, KeyError, FileNotFoundError) as err:
        raise InputError(f"cannot read the vectors z of {path}: {err}",
                         "pass an embedding folder written by `sampleclr-scale embed`") from None
    if not pa.types.is_fixed_size_list(z.type) or z.null_count:
        raise InputError(f"column z of {path} is {z.type} with {z.null_count} nulls, not "
                         "fixed_size_list<float32>[D] without nulls",
                         "re-run `sampleclr-scale embed`")
    return z.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(
        len(z), z.type.list_size)


def build_hnsw(vectors: np.ndarray, settings: IndexSettings) -> faiss.Index:
    """A faiss HNSW inner-product index over the unit rows of ``vectors``."""
    import faiss

    unit = np.ascontiguousarray(unit_rows(vectors), dtype=np.float32)
    index = faiss.IndexHNSWFlat(unit.shape[1], settings.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = settings.ef_construction
    index.add(unit)
    return index


def build_exact(vectors: np.ndarray) -> faiss.Index:
    """A faiss exact inner-product index over the unit rows of ``vectors``."""
    import faiss

    unit = np.ascontiguousarray(unit_rows(vectors), dtype=np.float32)
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    return index


def build_index(emb: str | os.PathLike | Location,
                settings: IndexSettings | None = None) -> dict[str, Any]:
    """Build ``EMB/search_index`` from the embeddings (replacing an index there); its meta.

    Raises
    ------
    InputError
        If the folder has no embeddings, or another run is building the index.
    """
    import faiss

    settings = settings or IndexSettings()
    emb = Location(emb)
    fingerprint = embeddings_fingerprint(emb)
    vectors = read_vectors(emb)
    if len(vectors) == 0:
        raise InputError(f"{emb} holds no donors", "embed a store with donors")
    exact = len(vectors) <= settings.exact_limit
    index = build_exact(vectors) if exact else build_hnsw(vectors, settings)
    meta = {"format": FORMAT, "fingerprint": fingerprint, "n": len(vectors),
            "dim": int(vectors.shape[1]), "library": f"faiss {faiss.__version__}",
            "kind": "exact" if exact else "hnsw", "settings": vars(settings)}
    with staged_output(emb / SEARCH_INDEX_DIR, True, kind=SEARCH_INDEX,
                       inputs=[emb / DONORS_PARQUET]) as staging:
        staging.mkdir(parents=True)
        faiss.write_index(index, str(staging / INDEX_FILE))
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def index_meta(emb: str | os.PathLike | Location) -> dict[str, Any] | None:
    """``index.json`` of the folder's index; None without a complete one."""
    path = Location(emb) / SEARCH_INDEX_DIR / META_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def is_current(meta: dict[str, Any] | None, fingerprint: str,
               settings: IndexSettings) -> bool:
    """Whether an index with ``meta`` was built from embeddings of ``fingerprint`` with
    ``settings`` (its construction; ``ef_search`` only needs the meta updated)."""
    if meta is None or meta.get("format") != FORMAT or meta.get("fingerprint") != fingerprint:
        return False
    if (meta.get("kind") == "exact") != (meta.get("n", 0) <= settings.exact_limit):
        return False
    built = meta.get("settings", {})
    return meta["kind"] == "exact" or (built.get("m"), built.get("ef_construction")) == (
        settings.m, settings.ef_construction)


def open_index(emb: str | os.PathLike | Location, settings: IndexSettings | None = None,
               rebuild: bool = False) -> tuple[DonorIndex, bool]:
    """The folder's search index, built first when missing, stale or ``rebuild``.

    Parameters
    ----------
    emb : str, Path or Location
        An embedding folder (a local path or a URI).
    settings : IndexSettings, optional
        HNSW settings (the defaults otherwise).
    rebuild : bool
        Build it even when it is current.

    Returns
    -------
    DonorIndex, bool
        The index, and whether it was built by this call.
    """
    import faiss

    settings = settings or IndexSettings()
    emb = Location(emb)
    meta = index_meta(emb)
    built = rebuild or not is_current(meta, embeddings_fingerprint(emb), settings)
    if built:
        meta = build_index(emb, settings)
    data = (emb / SEARCH_INDEX_DIR / INDEX_FILE).read_bytes()
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    meta = {**meta, "settings": {**meta["settings"], "ef_search": settings.ef_search}}
    return DonorIndex(index, meta), built
