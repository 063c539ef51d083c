"""The ingest stage: a source's cells into a donor-sorted bag store, out of core.

- :mod:`~sampleclr_scale.ingest.cohort`: which donors and cells (obs streamed into the
  on-disk :mod:`~sampleclr_scale.ingest.cell_index`, per-donor counts in
  :mod:`~sampleclr_scale.ingest.donors`, the split in :mod:`~sampleclr_scale.ingest.split`);
- :mod:`~sampleclr_scale.ingest.features`: the cells' features (an obsm embedding, or PCA
  of counts);
- :mod:`~sampleclr_scale.ingest.stage`: :func:`ingest`, the stage itself.
"""
