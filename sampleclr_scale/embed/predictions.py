"""The supervised heads' outputs as predictions: classes, ordinal levels, values.

One row per donor (``predictions.parquet`` of an embedding folder, and the same columns in
the donor ``.h5ad``'s obs). Per supervised task, in the model's task order (a task is named
by its donor-table column, e.g. ``severity``):

- classification: ``<task>_pred``, the predicted class as its value in the donor table
  (the class of the largest logit), and ``<task>_p_<class>`` (float64), the softmax
  probability of each class, in the classes' sorted order;
- ordinal: ``<task>_pred``, the predicted level's value: the number of cumulative logits
  above 0 (:func:`~sampleclr_scale.losses.tasks.ordinal_predict`, the rule of training's
  validation accuracy: the median of the predicted distribution, which can differ from
  its most probable level), and ``<task>_p_<level>`` (float64), ``P(y = k)`` from the
  head's cumulative logits ``l_k = logit P(y > k)`` (:func:`ordinal_probabilities`);
- regression: ``<task>_pred`` (float64) in the target's original units, the head's
  standardised output times the training donors' standard deviation plus their mean.

Probability columns are named with ``str(class)``; a model without supervised heads has
no predictions (and its embedding folder no ``predictions.parquet``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy.special import expit, softmax

from sampleclr_scale.errors import InputError

if TYPE_CHECKING:
    from sampleclr_scale.train.setup import TaskInfo

PREDICTED_SUFFIX = "_pred"


def predicted_column(task: str) -> str:
    """The column of a task's predicted class, level or value: ``<task>_pred``."""
    return f"{task}{PREDICTED_SUFFIX}"


def probability_column(task: str, value: object) -> str:
    """The column of the probability of one class or level: ``<task>_p_<value>``."""
    return f"{task}_p_{value}"


def prediction_columns(tasks: Sequence[TaskInfo]) -> list[str]:
    """Every prediction column of a model's tasks, in table order."""
    columns = []
    for task in tasks:
        columns.append(predicted_column(task.column))
        if task.kind != "regression":
            columns += [probability_column(task.column, value) for value in task.classes]
    return columns


def check_prediction_columns(tasks: Sequence[TaskInfo], taken: Iterable[str], where: str
                             ) -> None:
    """Refuse prediction columns that repeat or clash with the donor table's (``taken``).

    Raises
    ------
    InputError
        Naming the clashing columns.
    """
    columns = prediction_columns(tasks)
    clashes = sorted({c for c in columns if columns.count(c) > 1} | (set(columns) & set(taken)))
    if clashes:
        raise InputError(f"the predictions of the model in {where} would be written as "
                         f"columns {clashes}, which repeat or are donor-table columns",
                         "rename the donor-table column (re-ingest), or the classes")


def ordinal_probabilities(logits: np.ndarray) -> np.ndarray:
    """``P(y = k)`` ``[b, C]`` from cumulative logits ``[b, C - 1]``.

    Output ``k`` of the ordinal head is ``l_k = logit P(y > k)``, non-increasing in ``k``
    (:class:`~sampleclr_scale.model.heads.OrdinalHead`), so with ``P(y > -1) = 1`` and
    ``P(y > C - 1) = 0``: ``P(y = k) = P(y > k - 1) - P(y > k)``, that is
    ``1 - sigmoid(l_0)``, ``sigmoid(l_{k-1}) - sigmoid(l_k)``, ``sigmoid(l_{C-2})``:
    non-negative, summing to 1.
    """
    above = expit(np.asarray(logits, dtype=np.float64))
    rows = len(above)
    cumulative = np.hstack([np.ones((rows, 1)), above, np.zeros((rows, 1))])
    return cumulative[:, :-1] - cumulative[:, 1:]


def task_predictions(task: TaskInfo, outputs: np.ndarray) -> dict[str, np.ndarray]:
    """The prediction columns of one task from its head's outputs ``[b, k]``.

    Parameters
    ----------
    task
        The task, with its classes (code order) or target statistics.
    outputs
        Class logits ``[b, C]``, cumulative logits ``[b, C - 1]`` or the standardised
        regression output ``[b, 1]``.

    Returns
    -------
    dict
        Column name -> values (see the module docstring).
    """
    if task.kind == "regression":
        values = np.asarray(outputs, dtype=np.float64)[:, 0] * task.std + task.mean
        return {predicted_column(task.column): values}
    if task.kind == "ordinal":
        import torch

        from sampleclr_scale.losses.tasks import ordinal_predict

        probabilities = ordinal_probabilities(outputs)
        codes = ordinal_predict(torch.from_numpy(np.asarray(outputs))).numpy()
    else:
        probabilities = softmax(np.asarray(outputs, dtype=np.float64), axis=1)
        codes = np.asarray(outputs).argmax(axis=1)
    columns = {predicted_column(task.column): np.asarray(list(task.classes))[codes]}
    for code, value in enumerate(task.classes):
        columns[probability_column(task.column, value)] = probabilities[:, code]
    return columns


def predictions_table(donors: pd.DataFrame, tasks: Sequence[TaskInfo],
                      outputs: Mapping[str, np.ndarray]) -> pd.DataFrame | None:
    """``donor_index``, ``donor`` and every task's prediction columns; None without tasks.

    Parameters
    ----------
    donors
        ``donor_index`` and ``donor`` of every donor, in the order of ``outputs``' rows.
    tasks
        The model's tasks.
    outputs
        Head outputs by task name, ``[n_donors, k]``.
    """
    if not tasks:
        return None
    table = donors[["donor_index", "donor"]].reset_index(drop=True)
    for task in tasks:
        for name, values in task_predictions(task, outputs[task.column]).items():
            table[name] = values
    return table
