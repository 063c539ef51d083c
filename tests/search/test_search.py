"""Donor search (search/): recall against exact search, refusal of queries from another
model or feature space, the saved index (round trip, reuse, rebuild when stale), the
written results and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sampleclr_scale._linalg import unit_rows
from sampleclr_scale.cli import main
from sampleclr_scale.embed.config import EMBEDDINGS, SEARCH_INDEX_DIR
from sampleclr_scale.errors import InputError
from sampleclr_scale.search import IndexSettings, search_donors
from sampleclr_scale.search.index import (
    INDEX_FILE,
    META_FILE,
    build_hnsw,
    index_meta,
    open_index,
)
from sampleclr_scale.search.query import NEIGHBOURS_H5AD, NEIGHBOURS_PARQUET, drop_self
from sampleclr_scale.storage import Location

DIM = 16
PROVENANCE = {"checkpoint": "/runs/atlas", "trained_on": "/stores/atlas.zarr",
              "model_config": {"dim": DIM}, "feature_spec": {"fingerprint": "a" * 64}}


def _vectors(n: int, seed: int) -> np.ndarray:
    """Donors in 20 clusters (shared centres across seeds), as embeddings are."""
    centres = np.random.default_rng(99).normal(size=(20, DIM))
    rng = np.random.default_rng(seed)
    return (centres[rng.integers(0, 20, n)] + 0.5 * rng.normal(size=(n, DIM))).astype(
        np.float32)


def _folder(path: Path, Z: np.ndarray, prefix: str, provenance: dict | None = PROVENANCE
            ) -> Path:
    """An embedding folder as the embed stage writes it (the parts search reads)."""
    path.mkdir(parents=True)
    n = len(Z)
    z = pa.FixedSizeListArray.from_arrays(pa.array(Z.astype(np.float32).ravel()), Z.shape[1])
    pq.write_table(pa.table({"donor_index": pa.array(np.arange(n), pa.int64()),
                             "donor": [f"{prefix}{i}" for i in range(n)],
                             "disease": ["covid" if i % 3 else "healthy" for i in range(n)],
                             "z": z}), path / "donor_embeddings.parquet")
    if provenance is not None:
        (path / "provenance.json").write_text(json.dumps(provenance))
    return path


@pytest.fixture
def atlas(tmp_path) -> tuple[Path, np.ndarray]:
    Z = _vectors(3000, 0)
    return _folder(tmp_path / "atlas", Z, "atlas_"), Z


def _exact(Z: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    similarity = unit_rows(queries) @ unit_rows(Z).T
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


HNSW = IndexSettings(exact_limit=0)  # the graph index whatever the size


@pytest.mark.parametrize(("settings", "least"), [(HNSW, 0.95), (IndexSettings(), 0.999)])
def test_recall_at_10_against_exact_search(atlas, tmp_path, settings, least):
    path, Z = atlas
    queries = _vectors(300, 1)
    result = search_donors(path, query=_folder(tmp_path / "new", queries, "new_"), k=10,
                           settings=settings)
    assert result.info["index"]["kind"] == ("hnsw" if settings is HNSW else "exact")
    found = result.table["donor_index"].to_numpy().reshape(300, 10)
    exact = _exact(Z, queries, 10)
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])
    assert recall >= least
    table = result.table
    assert list(table.columns[:3]) == ["query", "rank", "distance"]
    assert {"donor", "donor_index", "disease"} <= set(table.columns)
    assert table["query"].iloc[0] == "new_0" and table["rank"].tolist()[:10] == list(range(1, 11))
    expected = 1 - np.sum(unit_rows(queries[[0]]) * unit_rows(Z[found[0]]), axis=1)
    np.testing.assert_allclose(table["distance"].to_numpy()[:10], expected, atol=1e-5)
    assert np.all(np.diff(table["distance"].to_numpy().reshape(300, 10), axis=1) >= -1e-6)
    np.testing.assert_array_equal(result.vectors[:10], Z[found[0]])


def test_atlas_donors_as_queries_are_not_their_own_neighbours(atlas):
    path, Z = atlas
    result = search_donors(path, donors=["atlas_5", "atlas_17"], k=5, settings=HNSW)
    table = result.table
    assert table["query"].tolist() == ["atlas_5"] * 5 + ["atlas_17"] * 5
    assert "atlas_5" not in table["donor"].iloc[:5].tolist()
    exact = _exact(Z, Z[[5, 17]], 6)[:, 1:]
    found = table["donor_index"].to_numpy().reshape(2, 5)
    assert np.mean([len(set(f) & set(e)) / 5 for f, e in zip(found, exact, strict=True)]) >= 0.9


def test_drop_self_keeps_order_and_length():
    positions = np.array([[4, 2, 7], [1, 3, 9]])
    distances = np.array([[0.0, 0.1, 0.2], [0.05, 0.1, 0.3]])
    kept, dist = drop_self(positions, distances, np.array([4, 8]), 2)
    np.testing.assert_array_equal(kept, [[2, 7], [1, 3]])
    np.testing.assert_array_equal(dist, [[0.1, 0.2], [0.05, 0.1]])


def test_index_is_saved_reused_and_rebuilt_when_stale(atlas):
    path, Z = atlas
    index, built = open_index(path, HNSW)
    assert built and (path / SEARCH_INDEX_DIR / INDEX_FILE).is_file()
    meta = index_meta(path)
    assert meta["n"] == 3000 and meta["dim"] == DIM and meta["kind"] == "hnsw"
    again, built = open_index(path, HNSW)
    assert not built
    queries = _vectors(50, 2)
    fresh = build_hnsw(Z, HNSW)
    fresh.hnsw.efSearch = HNSW.ef_search
    _, expected = fresh.search(unit_rows(queries).astype(np.float32), 10)
    for opened in (index, again):  # the saved index answers as the one just built
        np.testing.assert_array_equal(opened.search(queries, 10)[0], expected)
    assert EMBEDDINGS.recognise(Location(path))  # embed --overwrite still replaces it
    _folder_rewrite(path, Z[:2000])
    index, built = open_index(path, HNSW)
    assert built and index.meta["n"] == 2000 and index_meta(path)["n"] == 2000
    index, built = open_index(path)  # 2,000 donors: the default settings want it exact
    assert built and index.meta["kind"] == "exact"
    np.testing.assert_array_equal(index.search(queries, 10)[0], _exact(Z[:2000], queries, 10))


def _folder_rewrite(path: Path, Z: np.ndarray) -> None:
    (path / "donor_embeddings.parquet").unlink()
    (path / "provenance.json").unlink()
    tmp = path.parent / "rewrite"
    _folder(tmp, Z, "atlas_")
    for name in ("donor_embeddings.parquet", "provenance.json"):
        (tmp / name).rename(path / name)


@pytest.mark.parametrize(("change", "says"), [
    ({"checkpoint": "/runs/other"}, "another model"),
    ({"model_config": {"dim": 8}}, "another model"),
    ({"feature_spec": {"fingerprint": "b" * 64}}, "another feature space"),
])
def test_queries_from_another_model_or_space_are_refused(atlas, tmp_path, change, says):
    path, _ = atlas
    query = _folder(tmp_path / "q", _vectors(5, 3), "q_", {**PROVENANCE, **change})
    with pytest.raises(InputError, match=says) as err:
        search_donors(path, query=query)
    assert "--features-like" in err.value.fix
    assert not (path / SEARCH_INDEX_DIR).exists()  # refused before any index work


def test_other_bad_queries_are_input_errors(atlas, tmp_path):
    path, _ = atlas
    with pytest.raises(InputError, match=r"no provenance\.json"):
        search_donors(path, query=_folder(tmp_path / "a", _vectors(5, 3), "q_", None))
    narrow = np.ones((5, 8), np.float32)
    with pytest.raises(InputError, match="8-wide"):
        search_donors(path, query=_folder(tmp_path / "b", narrow, "q_"))
    with pytest.raises(InputError, match="not in the atlas"):
        search_donors(path, donors=["atlas_1", "nobody"])
    with pytest.raises(InputError, match="one query"):
        search_donors(path)
    with pytest.raises(InputError, match="no donor_embeddings"):
        search_donors(tmp_path, donors=["x"])


def test_written_results_round_trip(atlas, tmp_path):
    path, _ = atlas
    result = search_donors(path, donors=["atlas_3"], k=4)
    out = result.write(tmp_path / "found")
    table = pd.read_parquet(Path(out.path) / NEIGHBOURS_PARQUET)
    pd.testing.assert_frame_equal(table, result.table)
    adata = anndata.read_h5ad(Path(out.path) / NEIGHBOURS_H5AD)
    assert list(adata.obs_names) == [f"atlas_3:{r}" for r in range(1, 5)]
    np.testing.assert_array_equal(adata.X, result.vectors)
    assert json.loads(adata.uns["search"])["k"] == 4
    with pytest.raises(InputError, match="already exists"):
        result.write(tmp_path / "found")
    result.write(tmp_path / "found", overwrite=True)


def test_command_line(atlas, tmp_path, capsys):
    path, _ = atlas
    out = tmp_path / "cli"
    assert main(["search", str(path), "--donors", "atlas_1", "--k", "3", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["queries"] == 1 and printed["k"] == 3 and printed["index_built"]
    assert (out / NEIGHBOURS_PARQUET).is_file() and (path / SEARCH_INDEX_DIR / META_FILE).is_file()
    assert main(["search", str(path), "--donors", "nobody", "--out", str(tmp_path / "x")]) == 2
    assert "not in the atlas" in capsys.readouterr().err


def test_an_atlas_on_object_storage(atlas, bucket, tmp_path):
    import fsspec

    path, _ = atlas
    remote = f"{bucket}/atlas"
    fsspec.filesystem("s3").put(str(path), remote, recursive=True)
    result = search_donors(remote, donors=["atlas_2"], k=3, settings=HNSW)
    assert result.info["index_built"]
    assert (Location(remote) / SEARCH_INDEX_DIR).children() == [INDEX_FILE, META_FILE]
    again = search_donors(remote, donors=["atlas_2"], k=3, settings=HNSW)
    assert not again.info["index_built"]
    pd.testing.assert_frame_equal(again.table, result.table)
    out = result.write(f"{bucket}/found")
    assert (out / NEIGHBOURS_PARQUET).is_file() and (out / NEIGHBOURS_H5AD).is_file()
