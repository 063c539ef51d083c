"""Reading cells from where they live: a SOMA experiment, CELLxGENE Census, an ``.h5ad``.

Owns the :class:`~sampleclr_scale.sources.cells.CellSource` interface, its implementations,
:func:`~sampleclr_scale.sources.cells.open_source` (a source from its command-line
spelling) and the obs-filter language (:mod:`~sampleclr_scale.sources.obs_filter`).
Nothing here writes.
"""

from sampleclr_scale.sources.cells import CellSource, H5adSource, SomaSource, open_source
from sampleclr_scale.sources.obs_filter import Filter, parse_filter

__all__ = ["CellSource", "Filter", "H5adSource", "SomaSource", "open_source", "parse_filter"]
