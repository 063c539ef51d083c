"""Supervised task losses for the SampleCLR heads: classification, ordinal, regression.

Missing labels are skipped: integer label ``-1`` (classification, ordinal) or ``NaN``
(regression). Each loss is the mean over the rows that have a label. A batch where every
label is missing gives a loss of exactly zero that is still connected to the predictions
(zero gradients flow back), so every parameter of a head takes part in the backward and
DDP does not wait for gradients that never come.

Under DDP each rank averages over its own labelled rows; when ranks hold different
numbers of labelled rows, the DDP average weights rows of sparsely labelled ranks more
than a 1-process run would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sampleclr_scale.errors import InputError

MISSING_LABEL = -1
"""Integer label of a donor without a label (classification and ordinal tasks)."""

TASK_KINDS = ("classification", "ordinal", "regression")


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over ``C`` classes, skipping missing labels.

    Parameters
    ----------
    logits : Tensor
        ``[b, C]`` class logits.
    labels : Tensor
        ``[b]`` integer classes in ``0..C-1``, or ``-1`` for a missing label.

    Returns
    -------
    Tensor
        Scalar mean cross-entropy over the labelled rows; 0 (with a gradient path) when
        no row is labelled.
    """
    _check_class_labels(logits, labels, n_classes=logits.shape[-1], task="classification")
    labelled = labels != MISSING_LABEL
    per_row = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
    return _masked_mean(per_row, labelled)


def ordinal_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cumulative-logit ordinal loss over ``C`` ordered classes, skipping missing labels.

    Output ``k`` of the head is the logit of ``y > k`` for ``k = 0..C-2``; the loss of a
    row is the binary cross-entropy summed over the ``C - 1`` thresholds (SampleCLR,
    eq. 5).

    Parameters
    ----------
    logits : Tensor
        ``[b, C-1]`` cumulative logits.
    labels : Tensor
        ``[b]`` integer ordered classes in ``0..C-1``, or ``-1`` for a missing label.

    Returns
    -------
    Tensor
        Scalar mean over the labelled rows; 0 (with a gradient path) when none is labelled.
    """
    _check_class_labels(logits, labels, n_classes=logits.shape[-1] + 1, task="ordinal")
    labelled = labels != MISSING_LABEL
    thresholds = torch.arange(logits.shape[1], device=logits.device)
    targets = (labels.unsqueeze(1) > thresholds).to(logits.dtype)
    per_row = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1)
    return _masked_mean(per_row, labelled)


def ordinal_predict(logits: Tensor) -> Tensor:
    """Ordered class predicted from cumulative logits: how many of them are positive.

    Parameters
    ----------
    logits : Tensor
        ``[b, C-1]`` cumulative logits (``logit(y > k)``).

    Returns
    -------
    Tensor
        ``[b]`` int64 classes in ``0..C-1``.
    """
    return (logits > 0).sum(dim=-1)


def regression_loss(
    predictions: Tensor, targets: Tensor, mean: float = 0.0, std: float = 1.0
) -> Tensor:
    """Mean squared error on standardised targets, skipping missing (NaN) targets.

    The head predicts in standardised units; ``mean`` and ``std`` are the target's
    statistics over the training donors (a prediction ``p`` means ``p * std + mean``).

    Parameters
    ----------
    predictions : Tensor
        ``[b]`` or ``[b, 1]`` predictions.
    targets : Tensor
        ``[b]`` floating-point targets in the original units, ``NaN`` when missing.
    mean, std : float
        Standardisation of the targets: ``(targets - mean) / std``.

    Returns
    -------
    Tensor
        Scalar mean squared error over the labelled rows; 0 (with a gradient path) when
        none is labelled.
    """
    if predictions.ndim == 2 and predictions.shape[1] == 1:
        predictions = predictions.squeeze(1)
    if predictions.ndim != 1 or targets.shape != predictions.shape:
        raise InputError(
            f"regression predictions must be [b] or [b, 1] with targets [b], got "
            f"{tuple(predictions.shape)} and {tuple(targets.shape)}",
            "give the regression head one output and pass one target per donor",
        )
    if not targets.is_floating_point():
        raise InputError(
            f"regression targets must be floating point (NaN = missing), got {targets.dtype}",
            "convert the targets to float and mark missing ones with NaN",
        )
    if not 0 < std < float("inf"):
        raise InputError(
            f"regression std must be positive and finite, got {std!r}",
            "pass the standard deviation of the target over the training donors",
        )
    labelled = ~torch.isnan(targets)
    standardised = torch.where(labelled, (targets - mean) / std, 0.0)
    return _masked_mean((predictions - standardised).pow(2), labelled)


_LOSS_OF_KIND: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "classification": classification_loss,
    "ordinal": ordinal_loss,
    "regression": regression_loss,
}


class TaskLoss(nn.Module):
    """Weighted sum of the supervised task losses of SampleCLR.

    SampleCLR ("Great patients embed alike: contrastive learning for sample
    representation from single-cell data", ICLR 2026 submission), supervised module:
    classification (cross-entropy), ordinal regression (cumulative BCE) and regression
    (MSE), several tasks at once, missing labels skipped.

    Parameters
    ----------
    tasks : Mapping[str, tuple[str, float]]
        ``{name: (kind, weight)}``, ``kind`` one of ``"classification"``, ``"ordinal"``,
        ``"regression"``, ``weight >= 0``.
    target_stats : Mapping[str, tuple[float, float]], optional
        ``{name: (mean, std)}`` of regression targets over the training donors; regression
        tasks not listed use ``(0, 1)`` (targets already standardised).
    """

    def __init__(
        self,
        tasks: Mapping[str, tuple[str, float]],
        target_stats: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        super().__init__()
        target_stats = dict(target_stats or {})
        if not tasks:
            raise InputError("TaskLoss needs at least one task", "pass {name: (kind, weight)}")
        for name, (kind, weight) in tasks.items():
            if kind not in TASK_KINDS:
                raise InputError(
                    f"task {name!r} has unknown kind {kind!r}",
                    f"use one of {', '.join(TASK_KINDS)}",
                )
            if not 0 <= weight < float("inf"):
                raise InputError(
                    f"task {name!r} has weight {weight!r}", "use a non-negative finite weight"
                )
        stray = sorted(n for n in target_stats if tasks.get(n, ("",))[0] != "regression")
        if stray:
            raise InputError(
                f"target_stats given for {stray}, which are not regression tasks",
                "give (mean, std) only for tasks of kind 'regression'",
            )
        self.tasks = dict(tasks)
        self.target_stats = target_stats
        self._losses: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
            name: partial(regression_loss, mean=target_stats[name][0], std=target_stats[name][1])
            if name in target_stats
            else _LOSS_OF_KIND[kind]
            for name, (kind, _) in tasks.items()
        }

    def forward(
        self, predictions: Mapping[str, Tensor], labels: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted total and per-task losses.

        Parameters
        ----------
        predictions : Mapping[str, Tensor]
            Head outputs by task name (other keys are ignored).
        labels : Mapping[str, Tensor]
            Labels by task name, missing ones marked ``-1`` or ``NaN``.

        Returns
        -------
        tuple
            ``(total, per_task)``: the scalar ``sum_t weight_t * loss_t`` and the dict of
            unweighted per-task losses (still attached to the graph).
        """
        absent = sorted(n for n in self.tasks if n not in predictions or n not in labels)
        if absent:
            raise InputError(
                f"no predictions or labels for tasks {absent}",
                "pass one prediction tensor and one label tensor per configured task",
            )
        per_task = {
            name: loss(predictions[name], labels[name]) for name, loss in self._losses.items()
        }
        total = sum(weight * per_task[name] for name, (_, weight) in self.tasks.items())
        return total, per_task

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, target_stats={self.target_stats}"


def _masked_mean(per_row: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``per_row`` over ``mask``; 0 with a gradient path when the mask is empty."""
    return torch.where(mask, per_row, 0.0).sum() / mask.sum().clamp_min(1)


def _check_class_labels(logits: Tensor, labels: Tensor, n_classes: int, task: str) -> None:
    if logits.ndim != 2 or labels.shape != (logits.shape[0],) or logits.shape[1] == 0:
        raise InputError(
            f"{task} logits must be [b, {'C-1' if task == 'ordinal' else 'C'}] with labels "
            f"[b], got {tuple(logits.shape)} and {tuple(labels.shape)}",
            "pass one row of head outputs and one label per donor",
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise InputError(
            f"{task} labels must be integer class codes, got {labels.dtype}",
            f"encode classes as 0..C-1 (int64) and missing labels as {MISSING_LABEL}",
        )
    if labels.numel() and (labels.min() < MISSING_LABEL or labels.max() >= n_classes):
        raise InputError(
            f"{task} labels must lie in 0..{n_classes - 1} or be {MISSING_LABEL} (missing), "
            f"got [{int(labels.min())}, {int(labels.max())}]",
            f"check the label encoding against the head's {n_classes} classes",
        )
