"""The notebook's face of sampleclr-scale, in the conventions of scvi-tools.

- :class:`~sampleclr_scale.api.model.SampleCLR`: ``setup_anndata``, ``train``,
  ``get_sample_representation``, ``get_cell_weights``, ``save`` / ``load``;
- :mod:`~sampleclr_scale.api.anndata_setup`: an AnnData's keys and features, checked, and
  its ingest into a bag store;
- :func:`~sampleclr_scale.api.datasets.simulated_anndata`: a small simulated cohort.

Every method calls the stages (ingest, train, embed) that the command line runs.
"""

from sampleclr_scale.api.datasets import simulated_anndata
from sampleclr_scale.api.model import SampleCLR

__all__ = ["SampleCLR", "simulated_anndata"]
