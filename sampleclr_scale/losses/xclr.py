"""X-Sample Contrastive loss (X-CLR) over the global batch of all data-parallel ranks.

For local views ``z_a, z_b`` (``[b, D]``, L2-normalised here) and the views gathered from
all ranks ``Z_a, Z_b`` (``[B, D]``, ``B = world_size * b``), the loss of this rank is

    1/2 [CE(z_a Z_b^T / tau, T) + CE(z_b Z_a^T / tau, T)],

CE a soft-target cross-entropy averaged over the ``b`` local rows, with target rows
``T = softmax(S[local donors, global donors] / tau_graph)`` from a prior donor similarity
``S``. Without a prior, ``T`` is one-hot on the positive pair (the other view of the same
bag, the global column of this row's batch position) and the loss is InfoNCE.

With ``negatives="same_batch"`` each row is contrasted only with the columns of its own
technical batch (site, dataset): the other columns are excluded from the softmax of the
logits and get target 0, and the prior targets are a softmax over the allowed columns.
The positive column is always allowed, so every row keeps its positive pair.

Exact under DDP: the columns are gathered with :func:`gather_with_grad`, so the gradient
reaching this rank's embeddings sums the contributions of every rank's rows. DDP averages
gradients over ranks; the average of the per-rank losses (each a mean over ``b`` local
rows) is the mean over all ``B`` rows, so the averaged gradients are those of a 1-process
run on the concatenated batch (``tests/losses/test_distributed_loss.py`` checks this). The
donor ids and batch codes of the columns are gathered with :func:`gather_no_grad`, so the
restriction to the anchor's batch is exact over the global batch too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sampleclr_scale._distributed import rank_and_world_size
from sampleclr_scale.errors import InputError
from sampleclr_scale.losses.configs import Negatives, XCLRConfig
from sampleclr_scale.losses.gather import (
    gather_no_grad,
    gather_with_grad,
    upcast_views,
)


def xclr_targets(prior_rows: Tensor, tau_graph: float, allowed: Tensor | None = None) -> Tensor:
    """Soft X-CLR targets: a softmax over each row of prior similarities.

    Parameters
    ----------
    prior_rows : Tensor
        ``[n, m]`` similarities of ``n`` anchors to ``m`` candidates.
    tau_graph : float
        Graph temperature; smaller values put more mass on the most similar candidate.
    allowed : Tensor, optional
        Bool ``[n, m]``: the candidates each anchor may be compared with (at least one
        per row). The softmax runs over them only; the others get target 0.

    Returns
    -------
    Tensor
        ``[n, m]`` non-negative rows summing to 1.
    """
    logits = prior_rows / tau_graph
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1)


def soft_cross_entropy(logits: Tensor, targets: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Cross-entropy of soft targets against logits, averaged over rows.

    Parameters
    ----------
    logits : Tensor
        ``[n, m]`` unnormalised scores.
    targets : Tensor
        ``[n, m]`` target distributions (rows summing to 1; 0 where not ``allowed``).
    allowed : Tensor, optional
        Bool ``[n, m]``: the columns of each row's softmax (at least one per row). The
        other logits are excluded (set to ``-inf``); they get neither loss nor gradient.

    Returns
    -------
    Tensor
        Scalar ``mean_i( -sum_{j allowed} targets_ij log_softmax_{allowed}(logits)_ij )``.
    """
    if allowed is None:
        return -(targets * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
    log_p = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return -(targets * log_p.masked_fill(~allowed, 0.0)).sum(dim=-1).mean()


def same_batch_mask(row_batch: Tensor, col_batch: Tensor) -> Tensor:
    """Which columns share the technical batch of each row.

    Parameters
    ----------
    row_batch : Tensor
        ``[n]`` integer batch codes of the anchors.
    col_batch : Tensor
        ``[m]`` integer batch codes of the candidates.

    Returns
    -------
    Tensor
        Bool ``[n, m]``, True where ``col_batch[j] == row_batch[i]``.
    """
    return row_batch.unsqueeze(1) == col_batch.to(row_batch.device).unsqueeze(0)


def xclr_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    donor_index: Tensor | None = None,
    prior: Tensor | None = None,
    tau: float = 0.5,
    tau_graph: float = 0.1,
    batch_index: Tensor | None = None,
    negatives: Negatives = "all",
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
        Temperature of the representation similarities (SampleCLR: 0.1; 0.5 here, see
        ``XCLRConfig.tau``).
    tau_graph : float
        Temperature of the prior similarities (SampleCLR: 0.1-0.2).
    batch_index : Tensor, optional
        ``[b]`` integer technical batch codes of the rows, the same on every rank.
        Required with ``negatives="same_batch"``; otherwise only checked, not used.
    negatives : {"all", "same_batch"}
        The candidates of each row: every column of the global batch, or only those of
        the row's own batch (see :class:`XCLRLoss`).

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
        On inconsistent shapes or dtypes, bad settings, a prior without donor ids or
        with donor ids outside it, or ``same_batch`` without batch codes.
    """
    _check_settings(tau, tau_graph, negatives, prior)
    z_a, z_b, restrict = _checked_inputs(z_a, z_b, donor_index, batch_index, prior, negatives)
    if prior is not None:
        _check_donors_in_prior(donor_index, prior.shape[0])  # a device sync: not per step
    return _xclr_loss(z_a, z_b, donor_index, prior, tau, tau_graph, gather=gather_with_grad,
                      batch_index=restrict)


class XCLRLoss(nn.Module):
    """X-Sample Contrastive loss between two views, over the global batch of all ranks.

    Sobal et al. 2024, "X-Sample Contrastive Loss: Improving Contrastive Learning with
    Sample Similarity Graphs"; used on donors, with a GloScope prior, by SampleCLR
    ("Great patients embed alike: contrastive learning for sample representation from
    single-cell data", ICLR 2026 submission). See :func:`xclr_loss` for the formula,
    the DDP behaviour and the treatment of repeated donors.

    ``negatives="same_batch"`` is this project's variant: the softmax of each row runs
    over the donors of its own technical batch only, so that telling donors apart by
    their batch does not lower the loss. The idea is that of conditional contrastive
    learning (Ma, Tsai et al. 2021, "Conditional Contrastive Learning for Improving
    Fairness in Self-Supervised Learning", arXiv:2106.02866: positives and negatives
    drawn with the same value of the attribute to remove) and of CONCORD's dataset-aware
    sampling in single-cell integration (Zhu, Jiang, Thomson & Gartner 2025, "Revealing
    a coherent cell-state landscape across single-cell datasets with CONCORD", Nature
    Biotechnology: mini-batches from one dataset); here the global batch keeps every
    batch and the other batches' columns are masked out.

    Parameters
    ----------
    tau : float
        Temperature of the representation similarities.
    tau_graph : float
        Temperature of the prior similarities.
    prior : Tensor, optional
        ``[n_donors, n_donors]`` donor similarity, kept as a buffer (it follows
        ``.to(device)`` and is saved in the ``state_dict``). ``None``: identity prior
        (InfoNCE). The module trusts the donor ids to index it (a training run checks
        the prior against the store's donors once, when it loads it); :func:`xclr_loss`
        checks their range on every call.
    negatives : {"all", "same_batch"}
        The candidates of each row: the whole global batch, or its own batch.
    """

    prior: Tensor | None


    @classmethod
    def from_config(cls, config: XCLRConfig, prior: Tensor | None = None) -> XCLRLoss:
        """The loss of ``config`` (``TrainConfig.loss``); ``prior`` None is InfoNCE."""
        return cls(tau=config.tau, tau_graph=config.tau_graph, prior=prior,
                   negatives=config.negatives)

    def __init__(
        self,
        tau: float = 0.5,
        tau_graph: float = 0.1,
        prior: Tensor | None = None,
        negatives: Negatives = "all",
    ) -> None:
        super().__init__()
        _check_settings(tau, tau_graph, negatives, prior)
        self.tau, self.tau_graph, self.negatives = tau, tau_graph, negatives
        self.register_buffer("prior", prior)

    def forward(self, z_a: Tensor, z_b: Tensor, donor_index: Tensor | None,
                batch_index: Tensor | None = None) -> Tensor:
        """Loss of this rank's rows; see :func:`xclr_loss` (no host sync)."""
        z_a, z_b, restrict = _checked_inputs(z_a, z_b, donor_index, batch_index, self.prior,
                                             self.negatives)
        return _xclr_loss(z_a, z_b, donor_index, self.prior, self.tau, self.tau_graph,
                          gather=gather_with_grad, batch_index=restrict)

    def extra_repr(self) -> str:
        prior = "identity" if self.prior is None else f"{tuple(self.prior.shape)}"
        return (f"tau={self.tau}, tau_graph={self.tau_graph}, prior={prior}, "
                f"negatives={self.negatives}")


def _xclr_loss(
    z_a: Tensor,
    z_b: Tensor,
    donor_index: Tensor | None,
    prior: Tensor | None,
    tau: float,
    tau_graph: float,
    gather: Callable[[Tensor], Tensor],
    batch_index: Tensor | None = None,
) -> Tensor:
    """:func:`xclr_loss` on checked, upcast views, with the column gather as a parameter.

    ``gather`` is :func:`gather_with_grad` in production; the distributed tests pass
    wrong gathers through it as negative controls. ``batch_index`` given: the negatives
    are restricted to each row's batch.
    """
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        z_a, z_b = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1)
        Z_a, Z_b = gather(z_a), gather(z_b)
        allowed = None
        if batch_index is not None:
            allowed = same_batch_mask(batch_index, gather_no_grad(batch_index)).to(z_a.device)
        targets = _targets(donor_index, prior, tau_graph, allowed, z_a, Z_a.shape[0])
        return 0.5 * (
            soft_cross_entropy(z_a @ Z_b.T / tau, targets, allowed)
            + soft_cross_entropy(z_b @ Z_a.T / tau, targets, allowed)
        )


def _targets(donor_index: Tensor | None, prior: Tensor | None, tau_graph: float,
             allowed: Tensor | None, z: Tensor, n_global: int) -> Tensor:
    """``[b, B]`` targets of the local rows ``z``: one-hot on the positive, or the prior's."""
    if prior is None:
        rank, n_local = rank_and_world_size()[0], z.shape[0]
        positive = rank * n_local + torch.arange(n_local, device=z.device)
        return F.one_hot(positive, n_global).to(z.dtype)
    rows = donor_index.to(prior.device)
    cols = gather_no_grad(donor_index).to(prior.device)
    block = prior[rows.unsqueeze(1), cols.unsqueeze(0)].to(z.device, z.dtype)
    return xclr_targets(block, tau_graph, allowed)


def _check_settings(tau: float, tau_graph: float, negatives: str, prior: Tensor | None) -> None:
    """The settings' checks, once per public entry (the training config checks them too)."""
    for name, value in (("tau", tau), ("tau_graph", tau_graph)):
        if not value > 0 or value == float("inf"):
            raise InputError(
                f"X-CLR {name} must be a positive finite number, got {value!r}",
                f"set {name} to a value like 0.1 (SampleCLR uses tau=0.1, tau_graph=0.1-0.2)",
            )
    if negatives not in get_args(Negatives):
        raise InputError(f"X-CLR negatives must be one of {get_args(Negatives)}, got "
                         f"{negatives!r}", "use 'all', or 'same_batch' with batch codes")
    if prior is not None:
        _check_prior(prior)


def _checked_inputs(
    z_a: Tensor, z_b: Tensor, donor_index: Tensor | None, batch_index: Tensor | None,
    prior: Tensor | None, negatives: str,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Upcast views and checked ids (no host sync); the batch codes that restrict, or None."""
    z_a, z_b = upcast_views(z_a, z_b, "X-CLR")
    n_local = z_a.shape[0]
    if donor_index is not None:
        _check_ids(donor_index, n_local, "donor_index", "the global donor id")
    if batch_index is not None:
        _check_ids(batch_index, n_local, "batch_index", "the technical batch code")
    if prior is not None and donor_index is None:
        raise InputError(
            "an X-CLR prior needs donor_index, the prior row of each bag",
            "pass donor_index=<[b] int64 global donor ids>, or prior=None for InfoNCE",
        )
    if negatives != "same_batch":
        return z_a, z_b, None
    if batch_index is None:
        raise InputError(
            "X-CLR with negatives='same_batch' needs batch_index, the technical batch of "
            "each bag", "pass batch_index=<[b] int64 batch codes> (DonorBatch.batch), or "
            "set loss.negatives: all")
    return z_a, z_b, batch_index


def _check_ids(ids: Tensor, n_local: int, name: str, what: str) -> None:
    dtype = ids.dtype
    integer = not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    if ids.shape != (n_local,) or not integer:
        raise InputError(
            f"{name} must be an integer tensor of shape ({n_local},), got "
            f"{ids.dtype} of shape {tuple(ids.shape)}",
            f"pass {what} (int64) of each row of the views",
        )


def _check_prior(prior: Tensor) -> None:
    if prior.ndim != 2 or prior.shape[0] != prior.shape[1] or not prior.is_floating_point():
        raise InputError(
            f"the X-CLR prior must be a square floating-point [n_donors, n_donors] matrix, "
            f"got {prior.dtype} of shape {tuple(prior.shape)}",
            "pass a donor similarity such as exp(-D / 5) of GloScope distances D, or None "
            "for the identity prior",
        )


def _check_donors_in_prior(donor_index: Tensor, n_donors: int) -> None:
    low, high = int(donor_index.min()), int(donor_index.max())
    if low < 0 or high >= n_donors:
        raise InputError(
            f"donor ids must lie in [0, {n_donors}) (the prior's rows), got [{low}, {high}]",
            "number donors as the prior's rows and columns are numbered",
        )
