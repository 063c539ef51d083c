"""Simulated cohorts with known ground truth, written as real SOMA experiments and h5ad
files (the tests, the demo and the quality benchmark use them).

- :mod:`~sampleclr_scale.simulate.spec`: what a cohort is (:class:`CohortSpec`, the
  scenarios, :class:`CensusDataset`) and its :func:`ground_truth`;
- :mod:`~sampleclr_scale.simulate.model`: the generative model of the cells;
- :mod:`~sampleclr_scale.simulate.site_effects`: per-(site, cell type) shifts, per-(site,
  feature) gains, confounded site assignment;
- :mod:`~sampleclr_scale.simulate.cohorts`: the biology in words, the donor table, the
  cells as AnnData chunks, and the writers (h5ad, SOMA, a Census-shaped collection).
"""
