"""Barlow Twins: redundancy reduction between two views, over the global batch.

The views of all ranks are gathered (:class:`GlobalBatchLoss`), so the batch
standardisation and the cross-correlation use the global batch (as the authors' code does
with synchronised batch norm), every rank computes the same loss, and DDP's averaged
gradients equal those of a 1-process run on the concatenated batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sampleclr_scale.losses.configs import BarlowConfig
from sampleclr_scale.losses.pairwise import GlobalBatchLoss


def barlow_cross_correlation(z_a: Tensor, z_b: Tensor, eps: float = 1e-5) -> Tensor:
    """Cross-correlation of two batch-standardised views.

    Parameters
    ----------
    z_a, z_b : Tensor
        ``[n, D]`` representations of the two views.
    eps : float
        Added to the biased batch variance, as ``BatchNorm1d(affine=False)`` does in the
        authors' code.

    Returns
    -------
    Tensor
        ``[D, D]`` matrix ``C = A^T B / n``, ``A, B`` the views with each dimension
        centred and divided by ``sqrt(var + eps)`` over the batch.
    """
    return _standardise(z_a, eps).T @ _standardise(z_b, eps) / z_a.shape[0]


def barlow_invariance(c: Tensor) -> Tensor:
    """Invariance term: ``sum_d (1 - C_dd)^2`` of a cross-correlation matrix ``C``."""
    return (1.0 - c.diagonal()).pow(2).sum()


def barlow_redundancy(c: Tensor) -> Tensor:
    """Redundancy-reduction term: ``sum_{d != e} C_de^2`` of a cross-correlation ``C``."""
    return c.pow(2).sum() - c.diagonal().pow(2).sum()


def _standardise(z: Tensor, eps: float) -> Tensor:
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, correction=0) + eps)


class BarlowTwinsLoss(GlobalBatchLoss):
    """Barlow Twins loss between two views, over the global batch of all ranks.

    Zbontar, Jing, Misra, LeCun and Deny 2021, "Barlow Twins: Self-Supervised Learning via
    Redundancy Reduction" (ICML): ``invariance(C) + lambda_ * redundancy(C)`` with ``C``
    the cross-correlation of the batch-standardised views. Called as every objective,
    ``loss(z_a, z_b, donor_index, batch_index=None)``; the ids are not used.

    Parameters
    ----------
    lambda_ : float
        Weight of the redundancy-reduction term.
    eps : float
        Stabiliser of the batch standardisation.
    """

    name = "Barlow Twins"
    needs = "to standardise"


    @classmethod
    def from_config(cls, config: BarlowConfig, prior: Tensor | None = None) -> BarlowTwinsLoss:
        """The loss of ``config`` (``TrainConfig.loss``); it takes no prior."""
        return cls(lambda_=config.lambda_, eps=config.eps)

    def __init__(self, lambda_: float = 5e-3, eps: float = 1e-5) -> None:
        super().__init__("lambda_=5e-3, eps=1e-5", lambda_=lambda_, eps=eps)

    def global_loss(self, Z_a: Tensor, Z_b: Tensor) -> Tensor:
        """Invariance plus weighted redundancy of the ``[B, D]`` global views."""
        c = barlow_cross_correlation(Z_a, Z_b, self.eps)
        return barlow_invariance(c) + self.lambda_ * barlow_redundancy(c)
