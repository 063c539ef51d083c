"""VICReg: variance-invariance-covariance regularisation of two views, over the global batch.

The views of all ranks are gathered with :func:`gather_with_grad` and every rank computes
the loss of the whole global batch. The gather's backward sums the gradient over ranks
(``world_size`` identical copies) and DDP divides by ``world_size``, so the averaged
gradients equal those of a 1-process run on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sampleclr_scale.errors import InputError
from sampleclr_scale.losses.gather import global_views, upcast_views


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


class VICRegLoss(nn.Module):
    """VICReg loss between two views, over the global batch of all ranks.

    Bardes, Ponce and LeCun 2022, "VICReg: Variance-Invariance-Covariance Regularization
    for Self-Supervised Learning" (ICLR). As in the authors' code, the variance term is
    averaged over the two views and the covariance term summed:
    ``lambda_ * inv + mu * (var(z_a) + var(z_b)) / 2 + nu * (cov(z_a) + cov(z_b))``.

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

    def __init__(
        self, lambda_: float = 25.0, mu: float = 25.0, nu: float = 1.0, eps: float = 1e-4
    ) -> None:
        super().__init__()
        for name, value in (("lambda_", lambda_), ("mu", mu), ("nu", nu), ("eps", eps)):
            if not 0 <= value < float("inf"):
                raise InputError(
                    f"VICReg {name} must be a non-negative finite number, got {value!r}",
                    "use the paper's defaults lambda_=25, mu=25, nu=1, eps=1e-4",
                )
        self.lambda_, self.mu, self.nu, self.eps = lambda_, mu, nu, eps

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """Loss of the global batch.

        Parameters
        ----------
        z_a, z_b : Tensor
            ``[b, D]`` local representations of the two views (same ``b`` on every rank).

        Returns
        -------
        Tensor
            Scalar loss, identical on every rank; float32 (half inputs upcast) or float64.
        """
        z_a, z_b = upcast_views(z_a, z_b, "VICReg")
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            Z_a, Z_b = global_views(z_a, z_b, "VICReg", "for its variance terms")
            variance = (vicreg_variance(Z_a, self.eps) + vicreg_variance(Z_b, self.eps)) / 2
            covariance = vicreg_covariance(Z_a) + vicreg_covariance(Z_b)
            return (
                self.lambda_ * vicreg_invariance(Z_a, Z_b)
                + self.mu * variance
                + self.nu * covariance
            )

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}, mu={self.mu}, nu={self.nu}, eps={self.eps}"
