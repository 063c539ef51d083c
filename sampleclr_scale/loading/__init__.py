"""Training-time reading: donor bags from a bag store into torch.

- :mod:`~sampleclr_scale.loading.schedule`: which donors each rank and worker takes;
- :mod:`~sampleclr_scale.loading.views`: which cells form a donor's two views (one view
  draw per module, chosen by :func:`~sampleclr_scale.loading.views.open_view_draw`);
- :mod:`~sampleclr_scale.loading.readers`: row readers of the store's arrays;
- :mod:`~sampleclr_scale.loading.loader`: :class:`DonorBagDataset`, streaming batches;
- :mod:`~sampleclr_scale.loading.resident`: the same batches from device memory.
"""
