"""CELLxGENE Census (or a Census-shaped SOMA collection) opened as a cell source."""

from __future__ import annotations

from pathlib import Path

from sampleclr_scale.errors import InputError
from sampleclr_scale.sources.soma import SomaSource


def absolute_location(location: str) -> str:
    """A Census location with a local path made absolute (anything spelt like a path, or
    an existing folder such as ``census-copy``); URIs, versions (``2025-11-08``,
    ``stable``) and the empty string unchanged."""
    is_path = location.startswith(".") or "/" in location or (
        bool(location) and Path(location).is_dir())
    if "://" in location or not is_path:
        return location
    return str(Path(location).resolve())


def open_census(where: str, measurement: str, organism: str) -> SomaSource:
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
