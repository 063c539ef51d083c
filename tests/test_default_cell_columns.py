"""Ingest records cell-type codes by default when the source has a cell_type column."""

from __future__ import annotations

from sampleclr_scale.config import IngestConfig
from sampleclr_scale.data.ingest import with_default_cell_columns


def _config(**kw: object) -> IngestConfig:
    return IngestConfig(source="src.h5ad", out="out.zarr", **kw)


def test_unset_cell_columns_take_cell_type_when_the_source_has_it() -> None:
    assert with_default_cell_columns(_config(), ["donor_id", "cell_type"]).cell_columns == [
        "cell_type"]
    assert with_default_cell_columns(_config(), ["donor_id"]).cell_columns == []


def test_explicit_cell_columns_are_kept_even_when_empty() -> None:
    obs = ["donor_id", "cell_type", "cell_state"]
    assert with_default_cell_columns(_config(cell_columns=[]), obs).cell_columns == []
    assert with_default_cell_columns(_config(cell_columns=["cell_state"]),
                                     obs).cell_columns == ["cell_state"]
