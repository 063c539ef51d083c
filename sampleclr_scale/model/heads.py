"""Supervised heads on the sample representation: classification, ordinal, regression.

Heads are built from a list of blocks, as lightly builds its projection heads: each
block is a Linear layer with an optional activation and dropout. The heads have no
normalisation, as in the paper's configs (``use_normalization: false``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import NamedTuple

import torch
from torch import Tensor, nn

from sampleclr_scale.errors import InputError
from sampleclr_scale.model.blocks import _check_dropout, _check_positive
from sampleclr_scale.model.config import TaskSpec


class HeadBlock(NamedTuple):
    """One block of an :class:`MLPHead`: ``Linear(in_dim, out_dim)``, activation, dropout.

    SampleCLR ("Great patients embed alike: contrastive learning for sample representation
    from single-cell data", ICLR 2026 submission), section 4: each supervised module s
    is a fully-connected network (blocks in the style of lightly's ``ProjectionHead``).
    """

    in_dim: int
    out_dim: int
    activation: nn.Module | None = None
    dropout: float = 0.0


class MLPHead(nn.Sequential):
    """A fully-connected head made of a list of :class:`HeadBlock`.

    SampleCLR ("Great patients embed alike: contrastive learning for sample representation
    from single-cell data", ICLR 2026 submission), section 4: the supervised module s.

    Parameters
    ----------
    blocks : Sequence[HeadBlock]
        Blocks applied in order.
    """

    def __init__(self, blocks: Sequence[HeadBlock]) -> None:
        layers: list[nn.Module] = []
        for block in blocks:
            layers.append(nn.Linear(block.in_dim, block.out_dim))
            if block.activation is not None:
                layers.append(block.activation)
            if block.dropout > 0:
                layers.append(nn.Dropout(block.dropout))
        super().__init__(*layers)


class ClassificationHead(MLPHead):
    """``C`` class logits, for cross-entropy (SampleCLR, eq. 4).

    SampleCLR ("Great patients embed alike: contrastive learning for sample representation
    from single-cell data", ICLR 2026 submission), section 4.

    Parameters
    ----------
    in_dim : int
        Representation size.
    n_classes : int
        Number of classes C >= 2.
    hidden, n_layers : int
        Hidden width and number of Linear layers (1 = a single Linear).
    dropout : float
        Dropout after each hidden ReLU.
    """

    def __init__(
        self, in_dim: int, n_classes: int, hidden: int = 16, n_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        _check_classes("ClassificationHead", n_classes)
        super().__init__(_mlp_blocks(in_dim, hidden, n_classes, n_layers, dropout))


class RegressionHead(MLPHead):
    """One output ``[b, 1]``, for squared error on a standardised target (SampleCLR, eq. 6).

    SampleCLR ("Great patients embed alike: contrastive learning for sample representation
    from single-cell data", ICLR 2026 submission), section 4.

    Parameters
    ----------
    in_dim : int
        Representation size.
    hidden, n_layers : int
        Hidden width and number of Linear layers (1 = a single Linear).
    dropout : float
        Dropout after each hidden ReLU.
    """

    def __init__(
        self, in_dim: int, hidden: int = 16, n_layers: int = 2, dropout: float = 0.0
    ) -> None:
        super().__init__(_mlp_blocks(in_dim, hidden, 1, n_layers, dropout))


class OrdinalHead(nn.Module):
    """``C - 1`` cumulative logits ``logit P(y > k)`` from one score and ordered thresholds.

    SampleCLR ("Great patients embed alike: contrastive learning for sample representation
    from single-cell data", ICLR 2026 submission), eq. 5: output ``k`` is the logit of
    ``y > k``, trained with binary cross-entropy. The outputs are
    ``logit_k = s(z) - theta_k`` with one MLP score ``s`` and thresholds
    ``theta_0 < theta_1 < ... < theta_{C-2}``: the cumulative-link (proportional odds)
    model of McCullagh ("Regression models for ordinal data", JRSS B 1980), with the
    shared score of CORAL (Cao, Mirjalili and Raschka, "Rank consistent ordinal regression
    for neural networks", Pattern Recognition Letters 2020).

    Why not ``C - 1`` independent logits (the reference code): independent outputs can
    say ``P(y > 2) > P(y > 1)``, so "count the positive logits" and the implied class
    probabilities ``P(y = k)`` can be inconsistent. Here the logits never increase in
    ``k`` by construction (thresholds are a first value plus cumulative softplus gaps;
    strictly decreasing unless a gap rounds to zero), so
    predictions are rank-consistent, the extreme classes (often rare, e.g. the most severe
    patients) share the score learned from all classes, and the head has ``C - 2`` fewer
    output weights per hidden unit. The loss is unchanged (eq. 5).

    Parameters
    ----------
    in_dim : int
        Representation size.
    n_classes : int
        Number of ordered classes C >= 2.
    hidden, n_layers : int
        Hidden width and number of Linear layers of the score MLP.
    dropout : float
        Dropout after each hidden ReLU.
    """

    def __init__(
        self, in_dim: int, n_classes: int, hidden: int = 16, n_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_classes("OrdinalHead", n_classes)
        self.score = MLPHead(_mlp_blocks(in_dim, hidden, 1, n_layers, dropout))
        # Thresholds start evenly spaced one unit apart, centred on 0.
        raw = torch.full((n_classes - 1,), math.log(math.expm1(1.0)))
        raw[0] = -(n_classes - 2) / 2
        self.threshold_params = nn.Parameter(raw)

    @property
    def thresholds(self) -> Tensor:
        """Increasing thresholds ``theta``, ``[C - 1]`` (non-decreasing after rounding)."""
        first, gaps = self.threshold_params[:1], nn.functional.softplus(self.threshold_params[1:])
        return torch.cat([first, first + torch.cumsum(gaps, dim=0)])

    def forward(self, z: Tensor) -> Tensor:
        """Cumulative logits ``[b, C - 1]``, non-increasing along the last dimension.

        Parameters
        ----------
        z : Tensor
            ``[b, in_dim]`` representations.

        Returns
        -------
        Tensor
            ``logit P(y > k)`` for ``k = 0..C-2``.
        """
        return self.score(z) - self.thresholds


class SupervisedHeads(nn.ModuleDict):
    """One head per supervised task, keyed by task name.

    SampleCLR ("Great patients embed alike: contrastive learning for sample representation
    from single-cell data", ICLR 2026 submission), section 4: classification, ordinal
    regression and regression heads on the representation, several tasks at once.

    Parameters
    ----------
    tasks : Sequence[TaskSpec]
        The tasks, with unique names; may be empty.
    in_dim : int
        Representation size.
    hidden, n_layers : int
        Hidden width and number of Linear layers of every head.
    dropout : float
        Dropout after each hidden ReLU.
    """

    def __init__(
        self, tasks: Sequence[TaskSpec], in_dim: int, hidden: int = 16, n_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for task in tasks:
            if task.name in self:
                raise InputError(f"task name {task.name!r} is used twice",
                                 "give every task a unique name")
            head = _make_head(task, in_dim, hidden, n_layers, dropout)
            try:
                self[task.name] = head
            except KeyError:
                raise InputError(f"task name {task.name!r} cannot name a head",
                                 "rename the task (it clashes with a module attribute)") from None

    def forward(self, z: Tensor) -> dict[str, Tensor]:
        """Every head's outputs.

        Parameters
        ----------
        z : Tensor
            ``[b, in_dim]`` representations.

        Returns
        -------
        dict[str, Tensor]
            By task name: ``[b, C]`` class logits, ``[b, C - 1]`` cumulative logits, or
            ``[b, 1]`` regression outputs.
        """
        return {name: head(z) for name, head in self.items()}


def _make_head(task: TaskSpec, in_dim: int, hidden: int, n_layers: int, dropout: float
               ) -> nn.Module:
    """The head of one task."""
    if task.kind == "regression":
        return RegressionHead(in_dim, hidden, n_layers, dropout)
    assert task.n_classes is not None  # TaskSpec guarantees it for these kinds
    if task.kind == "ordinal":
        return OrdinalHead(in_dim, task.n_classes, hidden, n_layers, dropout)
    return ClassificationHead(in_dim, task.n_classes, hidden, n_layers, dropout)


def _mlp_blocks(in_dim: int, hidden: int, out_dim: int, n_layers: int, dropout: float
                ) -> list[HeadBlock]:
    """``n_layers`` Linear layers: ReLU (and dropout) after all but the last."""
    _check_positive("head", in_dim=in_dim, hidden=hidden, out_dim=out_dim, n_layers=n_layers)
    _check_dropout("head", dropout)
    widths = [in_dim] + [hidden] * (n_layers - 1) + [out_dim]
    return [
        HeadBlock(a, b, nn.ReLU(), dropout) if i < n_layers - 1 else HeadBlock(a, b)
        for i, (a, b) in enumerate(pairwise(widths))
    ]


def _check_classes(owner: str, n_classes: int) -> None:
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise InputError(f"{owner}: n_classes must be an integer >= 2, got {n_classes!r}",
                         "pass the number of classes of the task")
