"""Writing simulated AnnData chunks as a SOMA Experiment or a Census-shaped Collection.

Appends chunk after chunk with ``tiledbsoma.io`` so memory stays bounded by one chunk,
registering each chunk on its own (the obs ids of the chunks are unique by
construction) instead of re-reading every id written so far.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import anndata
import numpy as np
import pandas as pd
import pyarrow as pa
import tiledbsoma
import tiledbsoma.io
from scipy import sparse

EXPERIMENT = "homo_sapiens"
MEASUREMENT = "RNA"
X_LAYER = "raw"
_OBS_ID, _VAR_ID = "obs_id", "var_id"  # tiledbsoma's columns for the AnnData indexes
_SOMA_TILE_EXTENT = 2048  # tiledbsoma's default tile extent of a sparse array dimension
_COLLECTION = "sampleclr_scale synthetic cohort"  # collection_name of the default datasets


def write_census_collection(uri: str, chunks: Iterable[anndata.AnnData], width: int,
                            n_donors: int,
                            titles: Mapping[str, tuple[str, str]] | None = None) -> None:
    """Write the chunks as a Collection laid out like CELLxGENE Census.

    ``census_info`` holds ``summary`` and ``datasets`` tables; the experiment is
    ``census_data/homo_sapiens``, which ``cellxgene_census.open_soma(uri=...)`` opens.
    ``titles`` gives a ``dataset_id``'s ``collection_name`` and ``dataset_title`` in the
    datasets table (default: the synthetic cohort's).
    """
    with tiledbsoma.Collection.create(uri) as census:
        census.add_new_collection("census_info")
        census.add_new_collection("census_data")
    experiment_uri = f"{uri}/census_data/{EXPERIMENT}"
    counts = write_experiment(experiment_uri, chunks, width)
    with tiledbsoma.Collection.open(uri, mode="w") as census:
        with tiledbsoma.Experiment.open(experiment_uri) as experiment:
            census["census_data"].set(EXPERIMENT, experiment)
        _write_census_info(census["census_info"], counts, n_donors, titles or {})


def write_experiment(uri: str, chunks: Iterable[anndata.AnnData], width: int) -> pd.Series:
    """Write AnnData chunks (cells in order) to a new SOMA Experiment, one after another.

    ``width`` is the largest number of columns of X or an obsm array. Returns the cell
    counts by ``(dataset_id, is_primary_data)``.
    """
    # Cells arrive in joinid order, so the coordinates of every matrix are already in
    # TileDB's global order when all columns fit in one tile: skip the costly sort then.
    fits_one_tile = width <= _SOMA_TILE_EXTENT
    options = {
        "X_layer_name": X_LAYER,
        "uns_keys": [],
        "platform_config": {"tiledb": {"write": {"sort_coords": not fits_one_tile}}},
    }
    counts: list[pd.Series] = []
    n_written = 0
    for chunk in chunks:
        # tiledbsoma sizes its write batches row by row in Python for a csr_matrix, but
        # from whole slices for other sparse types: csr_array is the fast path.
        chunk.X = sparse.csr_array(chunk.X)
        mapping = _registration(uri, chunk, n_written) if n_written else None
        tiledbsoma.io.from_anndata(
            uri, chunk, MEASUREMENT, registration_mapping=mapping, **options
        )
        n_written += chunk.n_obs
        keys = [chunk.obs["dataset_id"].astype(str), chunk.obs["is_primary_data"]]
        counts.append(chunk.obs.groupby(keys).size())
    return pd.concat(counts).groupby(level=[0, 1]).sum()


def _registration(
    uri: str, chunk: anndata.AnnData, offset: int
) -> tiledbsoma.io.ExperimentAmbientLabelMapping:
    """Register ``chunk`` as obs rows ``offset, offset + 1, ...`` of the experiment at ``uri``.

    ``register_anndatas(uri, chunk)`` would read every obs id written so far, so time and
    memory would grow with the cohort. Cell ids are unique by construction: register the
    chunk on its own and shift its joinids past the rows already written.
    """
    alone = tiledbsoma.io.register_anndatas(
        None,
        chunk,
        measurement_name=MEASUREMENT,
        obs_field_name=_OBS_ID,
        var_field_name=_VAR_ID,
        append_obsm_varm=True,
    )
    obs = alone.obs_axis
    shifted = type(obs)(
        field_name=obs.field_name,
        joinid_map=obs.joinid_map + offset,
        enum_values=obs.enum_values,
        allow_duplicate_ids=obs.allow_duplicate_ids,
    )
    mapping = type(alone)(obs_axis=shifted, var_axes=alone.var_axes)
    mapping.prepare_experiment(uri)
    return mapping


def _write_census_info(info: tiledbsoma.Collection, counts: pd.Series, n_donors: int,
                       titles: Mapping[str, tuple[str, str]]) -> None:
    """Write Census-style ``summary`` and ``datasets`` tables from the cell counts."""
    per_dataset = counts.groupby(level=0).sum()
    names = [titles.get(d, (_COLLECTION, f"Synthetic blood cohort, {d}"))
             for d in per_dataset.index]
    summary = pd.DataFrame(
        {
            "label": [
                "census_schema_version",
                "dataset_schema_version",
                "total_cell_count",
                "unique_cell_count",
                "number_donors_homo_sapiens",
            ],
            "value": [
                "2.4.0",
                "synthetic (sampleclr_scale.simulate.cohorts)",
                str(counts.sum()),
                str(counts.xs(True, level=1).sum()),
                str(n_donors),
            ],
        }
    )
    datasets = pd.DataFrame(
        {
            "collection_name": [collection for collection, _ in names],
            "dataset_id": per_dataset.index.astype(str),
            "dataset_title": [title for _, title in names],
            "dataset_total_cell_count": per_dataset.to_numpy(dtype=np.int64),
        }
    )
    for key, table in (("summary", summary), ("datasets", datasets)):
        arrow = pa.Table.from_pandas(
            table.assign(soma_joinid=np.arange(len(table), dtype=np.int64)), preserve_index=False
        )
        domain = [(0, len(table) - 1)]
        with info.add_new_dataframe(key, schema=arrow.schema, domain=domain) as frame:
            frame.write(arrow)
