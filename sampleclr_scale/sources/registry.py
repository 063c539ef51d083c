"""Every kind of cell source, and :func:`open_source`: a source from its spelling.

A kind is a :class:`SourceKind`: a name, whether a command-line spelling is its, and how
to open it. :data:`SOURCE_KINDS` is the one place a new kind is registered (the first
kind that claims a spelling opens it); ingest, the cohort and the features need nothing
else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sampleclr_scale.config import is_census
from sampleclr_scale.errors import InputError
from sampleclr_scale.sources.base import CellSource
from sampleclr_scale.sources.census import absolute_location, open_census
from sampleclr_scale.sources.h5ad import H5adSource
from sampleclr_scale.sources.soma import SomaSource

_SPELLINGS = "an existing .h5ad file, a SOMA experiment URI, or census[:VERSION]"


@dataclass(frozen=True)
class SourceKind:
    """One kind of cell source."""

    name: str
    """The kind's name (``CellSource.kind`` of what it opens)."""
    claims: Callable[[str], bool]
    """Whether a spelling (local paths already absolute) is this kind's."""
    open: Callable[[str, str, str], CellSource]
    """Opens ``(spelling, measurement, organism)``."""


def _local(spec: str) -> str:
    """A local path made absolute (the store records where its cells came from); a URI
    unchanged."""
    return spec if "://" in spec else str(Path(spec).resolve())


def _open_census(spec: str, measurement: str, organism: str) -> CellSource:
    return open_census(absolute_location(spec.partition(":")[2]) or "stable", measurement,
                       organism)


SOURCE_KINDS: tuple[SourceKind, ...] = (
    SourceKind("census", is_census, _open_census),
    SourceKind("h5ad", lambda spec: spec.endswith(".h5ad"),
               lambda spec, _measurement, _organism: H5adSource(_local(spec))),
    SourceKind("soma", lambda spec: "://" in spec or Path(spec).exists(),
               lambda spec, measurement, _organism: SomaSource.open(_local(spec), measurement)),
)
"""The kinds, in the order they are asked whether a spelling is theirs."""


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

    Raises
    ------
    InputError
        When no kind claims ``spec`` (a local path that does not exist).
    """
    for kind in SOURCE_KINDS:
        if kind.claims(spec):
            return kind.open(spec, measurement, organism)
    raise InputError(f"source {_local(spec)!r} does not exist", f"pass {_SPELLINGS}")
