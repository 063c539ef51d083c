"""Base of the losses of the two views of the whole global batch (VICReg, Barlow Twins).

The views of all ranks are gathered with :func:`gather_with_grad` and every rank computes
the loss of the whole global batch. The gather's backward sums the gradient over ranks
(``world_size`` identical copies) and DDP divides by ``world_size``, so the averaged
gradients equal those of a 1-process run on the concatenated batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sampleclr_scale.errors import InputError
from sampleclr_scale.losses.gather import global_views, upcast_views


class GlobalBatchLoss(nn.Module):
    """A loss of the gathered views ``Z_a, Z_b``, with non-negative finite weights.

    Subclasses set ``name`` and ``needs`` (why the global batch needs 2 rows) and
    implement :meth:`global_loss`.

    Parameters
    ----------
    defaults : str
        The paper's settings, suggested when a weight is refused.
    **weights : float
        The loss's weights and stabilisers, kept as attributes of the same names.
    """

    name = "pairwise loss"
    needs = "to compute it"

    def __init__(self, defaults: str, **weights: float) -> None:
        super().__init__()
        for key, value in weights.items():
            if not 0 <= value < float("inf"):
                raise InputError(
                    f"{self.name} {key} must be a non-negative finite number, got {value!r}",
                    f"use the paper's defaults {defaults}",
                )
            setattr(self, key, value)
        self._weights = tuple(weights)

    def forward(self, z_a: Tensor, z_b: Tensor, donor_index: Tensor | None,
                batch_index: Tensor | None = None) -> Tensor:
        """Loss of the global batch; the donor ids and batch codes are not used.

        Parameters
        ----------
        z_a, z_b : Tensor
            ``[b, D]`` local representations of the two views (same ``b`` on every rank).
        donor_index, batch_index : Tensor or None
            Ignored (the call signature of every objective).

        Returns
        -------
        Tensor
            Scalar loss, identical on every rank; float32 (half inputs upcast) or float64.
        """
        z_a, z_b = upcast_views(z_a, z_b, self.name)
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            Z_a, Z_b = global_views(z_a, z_b, self.name, self.needs)
            return self.global_loss(Z_a, Z_b)

    def global_loss(self, Z_a: Tensor, Z_b: Tensor) -> Tensor:
        """The loss of the ``[B, D]`` views of the whole global batch."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={getattr(self, key)}" for key in self._weights)
