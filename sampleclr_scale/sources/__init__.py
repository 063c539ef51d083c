"""Reading cells from where they live: a SOMA experiment, CELLxGENE Census, an ``.h5ad``.

- :mod:`~sampleclr_scale.sources.base`: the :class:`CellSource` interface;
- :mod:`~sampleclr_scale.sources.soma`, :mod:`~sampleclr_scale.sources.h5ad`,
  :mod:`~sampleclr_scale.sources.census`: one kind of source each;
- :mod:`~sampleclr_scale.sources.registry`: every kind, and :func:`open_source` (a source
  from its command-line spelling);
- :mod:`~sampleclr_scale.sources.obs_filter`: the obs-filter language.

Nothing here writes.
"""

from sampleclr_scale.sources.base import CellSource
from sampleclr_scale.sources.h5ad import H5adSource
from sampleclr_scale.sources.obs_filter import Filter, parse_filter
from sampleclr_scale.sources.registry import SOURCE_KINDS, SourceKind, open_source
from sampleclr_scale.sources.soma import SomaSource

__all__ = ["SOURCE_KINDS", "CellSource", "Filter", "H5adSource", "SomaSource", "SourceKind",
           "open_source", "parse_filter"]
