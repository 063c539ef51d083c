"""The bag store: the format every stage after ingest reads.

- :mod:`~sampleclr_scale.store.bag_store`: :class:`BagStore`, reading a store (layout,
  schema version, donor table, codes);
- :mod:`~sampleclr_scale.store.manifest`: the files ingest wrote, checked on open;
- :mod:`~sampleclr_scale.store.feature_spec`: what defines a store's feature space;
- :mod:`~sampleclr_scale.store.batches`: technical batches and their feature statistics;
- :mod:`~sampleclr_scale.store.pseudobulk`: each donor's mean features;
- :mod:`~sampleclr_scale.store.composition`: cell-type composition as log-ratios and the
  composition channel of donor embeddings;
- :mod:`~sampleclr_scale.store.channel_weight`: the channel's weight, fitted to a donor
  prior.
"""

from sampleclr_scale.store.bag_store import BagStore

__all__ = ["BagStore"]
