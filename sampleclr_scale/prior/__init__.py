"""Donor x donor prior similarities for X-CLR: one package, one module per concern.

- :mod:`~sampleclr_scale.prior.config`: :class:`PriorConfig`, the stage's settings.
- :mod:`~sampleclr_scale.prior.similarity`: the math (cosine of mean features, GloScope's
  kNN KL divergence), pure numpy.
- :mod:`~sampleclr_scale.prior.graph`: :class:`PriorGraph`, a symmetric COO graph.
- :mod:`~sampleclr_scale.prior.build`: :func:`build_prior` from a bag store (Ray tasks).
- :mod:`~sampleclr_scale.prior.storage`: saving and loading priors inside the store.

The package imports nothing itself, so the pure math stays importable without Ray.
"""
