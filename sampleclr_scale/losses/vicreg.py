"""VICReg: variance-invariance-covariance regularisation of two views, over the global batch.

The views of all ranks are gathered and every rank computes the loss of the whole global
batch (:class:`GlobalBatchLoss`), so DDP's averaged gradients equal those of a 1-process
run on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sampleclr_scale.losses.configs import VICRegConfig
from sampleclr_scale.losses.pairwise import GlobalBatchLoss


def vicreg_invariance(z_a: Tensor, z_b: Tensor) -> Tensor:
    """Invariance term: mean squared difference of the two views.

    Parameters
    ----------
    z_a, z_b : Tensor
        ``[n, D]`` representations of the two views.

    Returns
    -------
    Tensor
        Scalar ``mean_{i,d} (z_a - z_b)_{id}^2``.
    """
    return F.mse_loss(z_a, z_b)


def vicreg_variance(z: Tensor, eps: float = 1e-4) -> Tensor:
    """Variance term: hinge on the per-dimension standard deviation over the batch.

    Parameters
    ----------
    z : Tensor
        ``[n, D]`` representations, ``n >= 2``.
    eps : float
        Added to the (unbiased) variance before the square root, for stability.

    Returns
    -------
    Tensor
        Scalar ``mean_d max(0, 1 - sqrt(var_d(z) + eps))``.
    """
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(1.0 - std).mean()


def vicreg_covariance(z: Tensor) -> Tensor:
    """Covariance term: squared off-diagonal covariances, divided by the dimension.

    Parameters
    ----------
    z : Tensor
        ``[n, D]`` representations, ``n >= 2``.

    Returns
    -------
    Tensor
        Scalar ``sum_{d != e} C_de^2 / D`` with ``C`` the unbiased covariance matrix.
    """
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (z.shape[0] - 1)
    return (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / z.shape[1]


class VICRegLoss(GlobalBatchLoss):
    """VICReg loss between two views, over the global batch of all ranks.

    Bardes, Ponce and LeCun 2022, "VICReg: Variance-Invariance-Covariance Regularization
    for Self-Supervised Learning" (ICLR). As in the authors' code, the variance term is
    averaged over the two views and the covariance term summed:
    ``lambda_ * inv + mu * (var(z_a) + var(z_b)) / 2 + nu * (cov(z_a) + cov(z_b))``.
    Called as every objective, ``loss(z_a, z_b, donor_index, batch_index=None)``; the
    ids are not used.

    Parameters
    ----------
    lambda_ : float
        Weight of the invariance term.
    mu : float
        Weight of the variance term.
    nu : float
        Weight of the covariance term.
    eps : float
        Stabiliser of the standard deviation in the variance term.
    """

    name = "VICReg"
    needs = "for its variance terms"


    @classmethod
    def from_config(cls, config: VICRegConfig, prior: Tensor | None = None) -> VICRegLoss:
        """The loss of ``config`` (``TrainConfig.loss``); it takes no prior."""
        return cls(lambda_=config.lambda_, mu=config.mu, nu=config.nu, eps=config.eps)

    def __init__(
        self, lambda_: float = 25.0, mu: float = 25.0, nu: float = 1.0, eps: float = 1e-4
    ) -> None:
        super().__init__("lambda_=25, mu=25, nu=1, eps=1e-4", lambda_=lambda_, mu=mu, nu=nu,
                         eps=eps)

    def global_loss(self, Z_a: Tensor, Z_b: Tensor) -> Tensor:
        """The weighted VICReg terms of the ``[B, D]`` global views."""
        variance = (vicreg_variance(Z_a, self.eps) + vicreg_variance(Z_b, self.eps)) / 2
        covariance = vicreg_covariance(Z_a) + vicreg_covariance(Z_b)
        invariance = vicreg_invariance(Z_a, Z_b)
        return self.lambda_ * invariance + self.mu * variance + self.nu * covariance
