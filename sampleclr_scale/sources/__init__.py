"""Reading cells from where they live: a SOMA experiment, CELLxGENE Census, an ``.h5ad``.

Owns the :class:`~sampleclr_scale.sources.cells.CellSource` interface, its implementations,
:func:`~sampleclr_scale.sources.cells.open_source` (a source from its command-line
spelling) and the obs-filter language (:mod:`~sampleclr_scale.sources.obs_filter`).
Nothing here writes.
"""
