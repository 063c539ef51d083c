"""X-Sample Contrastive loss (X-CLR) over the global batch of all data-parallel ranks.

For local views ``z_a, z_b`` (``[b, D]``, L2-normalised here) and the views gathered from
all ranks ``Z_a, Z_b`` (``[B, D]``, ``B = world_size * b``), the loss of this rank is

    1/2 [CE(z_a Z_b^T / tau, T) + CE(z_b Z_a^T / tau, T)],

CE a soft-target cross-entropy averaged over the ``b`` local rows, with target rows
``T = softmax(S[local donors, global donors] / tau_graph)`` from a prior donor similarity
``S``. Without a prior, ``T`` is one-hot on the positive pair (the other view of the same
bag, the global column of this row's batch position) and the loss is InfoNCE.

Exact under DDP: the columns are gathered with :func:`gather_with_grad`, so the gradient
reaching this rank's embeddings sums the contributions of every rank's rows. DDP averages
gradients over ranks; the average of the per-rank losses (each a mean over ``b`` local
rows) is the mean over all ``B`` rows, so the averaged gradients are those of a 1-process
run on the concatenated batch (``tests/test_distributed_loss.py`` checks this).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sampleclr_scale.errors import InputError
from sampleclr_scale.losses.gather import (
    gather_no_grad,
    gather_with_grad,
    rank_and_world_size,
    upcast_views,
)


def xclr_targets(prior_rows: Tensor, tau_graph: float) -> Tensor:
    """Soft X-CLR targets: a softmax over each row of prior similarities.

    Parameters
    ----------
    prior_rows : Tensor
        ``[n, m]`` similarities of ``n`` anchors to ``m`` candidates.
    tau_graph : float
        Graph temperature; smaller values put more mass on the most similar candidate.

    Returns
    -------
    Tensor
        ``[n, m]`` non-negative rows summing to 1.
    """
    return torch.softmax(prior_rows / tau_graph, dim=-1)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of soft targets against logits, averaged over rows.

    Parameters
    ----------
    logits : Tensor
        ``[n, m]`` unnormalised scores.
    targets : Tensor
        ``[n, m]`` target distributions (rows summing to 1).

    Returns
    -------
    Tensor
        Scalar ``mean_i( -sum_j targets_ij log_softmax(logits)_ij )``.
    """
    return -(targets * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def xclr_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    donor_index: Tensor | None = None,
    prior: Tensor | None = None,
    tau: float = 0.1,
    tau_graph: float = 0.1,
) -> Tensor:
    """X-CLR loss of this rank's rows against the global batch.

    Parameters
    ----------
    z_a, z_b : Tensor
        ``[b, D]`` representations of the two views of this rank's ``b`` bags; row ``i`` of
        both views comes from the same donor. L2-normalised here. Every rank must pass
        the same ``b``.
    donor_index : Tensor, optional
        ``[b]`` integer global donor ids of the rows (rows and columns of ``prior``).
        Required with a prior; without one it is only checked, not used.
    prior : Tensor, optional
        ``[n_donors, n_donors]`` donor similarity (e.g. ``exp(-D / 5)`` from GloScope
        distances). ``None`` is the identity prior: one-hot targets on the positive pair,
        i.e. InfoNCE. With the identity prior, a donor that appears twice in the global
        batch (two bags of one donor) is a false negative for itself; with a prior its
        two bags get the same target weight, so the prior handles it.
    tau : float
        Temperature of the representation similarities (SampleCLR: 0.1).
    tau_graph : float
        Temperature of the prior similarities (SampleCLR: 0.1-0.2).

    Returns
    -------
    Tensor
        Scalar loss, the mean over this rank's ``b`` rows. Computed in float32 (float16
        and bfloat16 inputs are upcast, autocast is off) or float64 for float64 inputs.
        Under DDP the mean of the ranks' losses is the loss of the global batch, and
        DDP's averaged gradients are its gradients.

    Raises
    ------
    InputError
        On inconsistent shapes or dtypes, non-positive temperatures, a prior without
        donor ids, or donor ids outside the prior.
    """
    _check_temperatures(tau, tau_graph)
    z_a, z_b = upcast_views(z_a, z_b, "X-CLR")
    if donor_index is not None:
        _check_donor_index(donor_index, z_a.shape[0])
    if prior is not None:
        _check_prior(prior)
        _check_donors_in_prior(donor_index, prior.shape[0])
    return _xclr_loss(z_a, z_b, donor_index, prior, tau, tau_graph, gather=gather_with_grad)


class XCLRLoss(nn.Module):
    """X-Sample Contrastive loss between two views, over the global batch of all ranks.

    Sobal et al. 2024, "X-Sample Contrastive Loss: Improving Contrastive Learning with
    Sample Similarity Graphs"; used on donors, with a GloScope prior, by SampleCLR
    ("Great patients embed alike: contrastive learning for sample representation from
    single-cell data", ICLR 2026 submission). See :func:`xclr_loss` for the formula,
    the DDP behaviour and the treatment of repeated donors.

    Parameters
    ----------
    tau : float
        Temperature of the representation similarities.
    tau_graph : float
        Temperature of the prior similarities.
    prior : Tensor, optional
        ``[n_donors, n_donors]`` donor similarity, kept as a buffer (it follows
        ``.to(device)`` and is saved in the ``state_dict``). ``None``: identity prior
        (InfoNCE).
    """

    prior: Tensor | None

    def __init__(
        self, tau: float = 0.1, tau_graph: float = 0.1, prior: Tensor | None = None
    ) -> None:
        super().__init__()
        _check_temperatures(tau, tau_graph)
        if prior is not None:
            _check_prior(prior)
        self.tau = tau
        self.tau_graph = tau_graph
        self.register_buffer("prior", prior)

    def forward(self, z_a: Tensor, z_b: Tensor, donor_index: Tensor | None = None) -> Tensor:
        """Loss of this rank's rows; see :func:`xclr_loss`."""
        return xclr_loss(
            z_a,
            z_b,
            donor_index=donor_index,
            prior=self.prior,
            tau=self.tau,
            tau_graph=self.tau_graph,
        )

    def extra_repr(self) -> str:
        prior = "identity" if self.prior is None else f"{tuple(self.prior.shape)}"
        return f"tau={self.tau}, tau_graph={self.tau_graph}, prior={prior}"


def _xclr_loss(
    z_a: Tensor,
    z_b: Tensor,
    donor_index: Tensor | None,
    prior: Tensor | None,
    tau: float,
    tau_graph: float,
    gather: Callable[[Tensor], Tensor],
) -> Tensor:
    """:func:`xclr_loss` on checked, upcast views, with the column gather as a parameter.

    ``gather`` is :func:`gather_with_grad` in production; the distributed tests pass
    wrong gathers through it as negative controls.
    """
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        z_a, z_b = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1)
        Z_a, Z_b = gather(z_a), gather(z_b)
        n_local, n_global = z_a.shape[0], Z_a.shape[0]
        if prior is None:
            rank = rank_and_world_size()[0]
            positive = rank * n_local + torch.arange(n_local, device=z_a.device)
            targets = F.one_hot(positive, n_global).to(z_a.dtype)
        else:
            rows = donor_index.to(prior.device)
            cols = gather_no_grad(donor_index).to(prior.device)
            block = prior[rows.unsqueeze(1), cols.unsqueeze(0)].to(z_a.device, z_a.dtype)
            targets = xclr_targets(block, tau_graph)
        return 0.5 * (
            soft_cross_entropy(z_a @ Z_b.T / tau, targets)
            + soft_cross_entropy(z_b @ Z_a.T / tau, targets)
        )


def _check_temperatures(tau: float, tau_graph: float) -> None:
    for name, value in (("tau", tau), ("tau_graph", tau_graph)):
        if not value > 0 or value == float("inf"):
            raise InputError(
                f"X-CLR {name} must be a positive finite number, got {value!r}",
                f"set {name} to a value like 0.1 (SampleCLR uses tau=0.1, tau_graph=0.1-0.2)",
            )


def _check_donor_index(donor_index: Tensor, n_local: int) -> None:
    dtype = donor_index.dtype
    integer = not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    if donor_index.shape != (n_local,) or not integer:
        raise InputError(
            f"donor_index must be an integer tensor of shape ({n_local},), got "
            f"{donor_index.dtype} of shape {tuple(donor_index.shape)}",
            "pass the global donor id (int64) of each row of the views",
        )


def _check_prior(prior: Tensor) -> None:
    if prior.ndim != 2 or prior.shape[0] != prior.shape[1] or not prior.is_floating_point():
        raise InputError(
            f"the X-CLR prior must be a square floating-point [n_donors, n_donors] matrix, "
            f"got {prior.dtype} of shape {tuple(prior.shape)}",
            "pass a donor similarity such as exp(-D / 5) of GloScope distances D, or None "
            "for the identity prior",
        )


def _check_donors_in_prior(donor_index: Tensor | None, n_donors: int) -> None:
    if donor_index is None:
        raise InputError(
            "an X-CLR prior needs donor_index, the prior row of each bag",
            "pass donor_index=<[b] int64 global donor ids>, or prior=None for InfoNCE",
        )
    low, high = int(donor_index.min()), int(donor_index.max())
    if low < 0 or high >= n_donors:
        raise InputError(
            f"donor ids must lie in [0, {n_donors}) (the prior's rows), got [{low}, {high}]",
            "number donors as the prior's rows and columns are numbered",
        )
