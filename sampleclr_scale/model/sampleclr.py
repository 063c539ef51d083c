"""The SampleCLR model: cell-importance aggregator, encoder, optional supervised heads."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from sampleclr_scale.errors import InputError
from sampleclr_scale.model.adversary import BatchAdversary
from sampleclr_scale.model.aggregator import CellImportanceAggregator
from sampleclr_scale.model.blocks import ResidualMLP
from sampleclr_scale.model.config import ModelConfig
from sampleclr_scale.model.heads import SupervisedHeads


class SampleCLROutput(NamedTuple):
    """What :class:`SampleCLR` returns for a batch of bags.

    SampleCLR ("Great patients embed alike: contrastive learning for sample representation
    from single-cell data", ICLR 2026 submission), Figure 2: representation ``z_i``, cell
    importances ``I_h`` and supervised predictions ``y_hat_i``.
    """

    z: Tensor
    """``[B, output_dim]`` sample representations."""
    weights: Tensor
    """``[B, m, H]`` cell-importance weights, zero at padded cells."""
    task_outputs: dict[str, Tensor]
    """Supervised head outputs by task name (empty without heads)."""
    batch_logits: Tensor | None = None
    """``[B, n_batches]`` the batch adversary's logits (None without an adversary)."""


class SampleCLR(nn.Module):
    """Sample representation from a bag of cells, trained contrastively.

    SampleCLR ("Great patients embed alike: contrastive learning for sample representation
    from single-cell data", ICLR 2026 submission), section 4 and Algorithm 1:
    ``a = Concat_h(sum_i w_h(X)_i X_i)`` (cell-importance aggregator), ``z = f(a)``
    (residual MLP encoder), ``y_hat = s(z)`` (optional supervised heads).

    Parameters
    ----------
    config : ModelConfig
        Architecture and supervised tasks.

    Notes
    -----
    With ``norm="batchnorm"`` in train mode a bag's ``z`` depends on the other bags of
    the forward pass (and, under DDP without ``SyncBatchNorm``, on the rank's share of
    the batch); ``"layernorm"`` and ``"none"`` keep each bag independent. When the
    backbone is frozen (stage 2), put it in eval mode as well if it uses BatchNorm, so
    the running statistics stay fixed.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.aggregator = CellImportanceAggregator(
            config.input_dim, config.n_heads, config.aggregator_hidden,
            config.aggregator_layers, config.norm, config.weighting, config.dropout,
            config.pooling, config.cell_dim, config.cell_hidden, config.cell_layers,
            config.center,
        )
        self.encoder = ResidualMLP(
            self.aggregator.output_dim, config.encoder_hidden, config.output_dim,
            config.encoder_layers, config.norm, config.dropout,
        )
        self.heads = SupervisedHeads(
            config.tasks, config.output_dim + len(config.head_composition),
            config.head_hidden, config.head_layers, config.dropout,
        )
        self.adversary = (BatchAdversary(config.output_dim, config.batch_adversary,
                                         config.head_hidden, config.head_layers)
                          if config.batch_adversary else None)

    def forward(self, cells: Tensor, mask: Tensor, *, with_heads: bool = True,
                composition: Tensor | None = None) -> SampleCLROutput:
        """Represent each bag.

        Parameters
        ----------
        cells : Tensor
            ``[B, m, d]`` float cell features (one view per row).
        mask : Tensor
            ``[B, m]`` bool, True for real cells; every bag needs at least one.
        with_heads : bool
            Run the supervised heads. Pass False when their outputs are not used in the
            loss (stage 1), so DDP does not wait for gradients of unused parameters.
        composition : Tensor, optional
            ``[B, K]`` each bag's donor composition over ``config.head_composition``,
            read by the heads beside z; required for heads when K > 0.

        Returns
        -------
        SampleCLROutput
            ``z`` ``[B, output_dim]``, ``weights`` ``[B, m, H]``, ``task_outputs``, and
            ``batch_logits`` with a batch adversary (whatever ``with_heads``).
        """
        aggregated, weights = self.aggregator(cells, mask)
        z = self.encoder(aggregated)
        batch_logits = None if self.adversary is None else self.adversary(z)
        return SampleCLROutput(z, weights, self._task_outputs(z, with_heads, composition),
                               batch_logits)

    def _task_outputs(self, z: Tensor, with_heads: bool, composition: Tensor | None
                      ) -> dict[str, Tensor]:
        """The supervised heads' outputs (none when not asked for or without heads)."""
        if not with_heads or not len(self.heads):
            return {}
        if not self.config.head_composition:
            return self.heads(z)
        if composition is None:
            raise ValueError("the heads read the donors' composition: pass composition")
        return self.heads(torch.cat([z, composition.to(z.dtype)], dim=-1))

    def encode_views(self, cells: Tensor, mask: Tensor, *, with_heads: bool = True,
                     composition: Tensor | None = None
                     ) -> tuple[SampleCLROutput, SampleCLROutput]:
        """Represent both views of each bag in one forward pass over ``2B`` bags.

        Under DDP, call the wrapped model instead, so DDP sees the forward:
        ``split_views(ddp_model(*flatten_views(cells, mask)))``.

        Parameters
        ----------
        cells : Tensor
            ``[B, 2, m, d]`` two views per bag.
        mask : Tensor
            ``[B, 2, m]`` bool masks of the views.
        with_heads : bool
            Run the supervised heads (see :meth:`forward`).
        composition : Tensor, optional
            ``[B, K]`` each bag's donor composition (see :meth:`forward`).

        Returns
        -------
        tuple[SampleCLROutput, SampleCLROutput]
            The outputs of the first and of the second views, ``B`` rows each.
        """
        return split_views(self(*flatten_views(cells, mask), with_heads=with_heads,
                                composition=both_views(composition)))

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of the aggregator and the encoder (frozen early in stage 2)."""
        return [*self.aggregator.parameters(), *self.encoder.parameters()]

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the supervised heads (empty without tasks)."""
        return list(self.heads.parameters())

    def adversary_parameters(self) -> list[nn.Parameter]:
        """Parameters of the batch adversary (empty without one)."""
        return [] if self.adversary is None else list(self.adversary.parameters())

    def n_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (scalars), optionally only those with ``requires_grad``."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def flatten_views(cells: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Two views per bag as ``2B`` bags: rows ``2i`` and ``2i + 1`` are bag ``i``'s views.

    SampleCLR ("Great patients embed alike: contrastive learning for sample representation
    from single-cell data", ICLR 2026 submission), Algorithm 1: both subsamples of every
    sample go through the same network.

    Parameters
    ----------
    cells : Tensor
        ``[B, 2, m, d]`` two views per bag.
    mask : Tensor
        ``[B, 2, m]`` bool masks.

    Returns
    -------
    tuple[Tensor, Tensor]
        ``cells`` ``[2B, m, d]`` and ``mask`` ``[2B, m]``.
    """
    if cells.ndim != 4 or cells.shape[1] != 2 or mask.shape != cells.shape[:3]:
        raise InputError(
            f"two-view bags must be cells [B, 2, m, d] with mask [B, 2, m], got "
            f"{tuple(cells.shape)} and {tuple(mask.shape)}",
            "pass the loader's two-view batch (or call forward on one view [B, m, d])",
        )
    return cells.flatten(0, 1), mask.flatten(0, 1)


def both_views(per_bag: Tensor | None) -> Tensor | None:
    """A per-bag tensor (``[B, ...]``) for the ``2B`` bags of :func:`flatten_views`."""
    return None if per_bag is None else per_bag.repeat_interleave(2, dim=0)


def split_views(out: SampleCLROutput) -> tuple[SampleCLROutput, SampleCLROutput]:
    """Undo :func:`flatten_views` on a model output: (first views, second views).

    Parameters
    ----------
    out : SampleCLROutput
        Output for ``2B`` bags ordered as :func:`flatten_views` orders them.

    Returns
    -------
    tuple[SampleCLROutput, SampleCLROutput]
        The outputs of the first and of the second views, ``B`` rows each.
    """
    return _rows(out, 0), _rows(out, 1)


def _rows(out: SampleCLROutput, start: int) -> SampleCLROutput:
    """Every second row of each tensor of ``out``, from ``start``."""
    return SampleCLROutput(
        out.z[start::2],
        out.weights[start::2],
        {name: value[start::2] for name, value in out.task_outputs.items()},
        None if out.batch_logits is None else out.batch_logits[start::2],
    )
