"""Held-out scores of the supervised heads' predictions (an embedding's ``predictions.parquet``).

For each embedding with predictions (a model with supervised heads), per task, over the
held-out donors (the store's validation split, never seen by a head in training) whose
donor-table label is one of the model's classes (classification, ordinal) or a number
(regression):

- classification and ordinal: ``accuracy`` and ``macro_f1`` (over the classes present in
  the labels or the predictions, as scikit-learn's ``f1_score(average="macro")``);
- ordinal and regression: ``mae`` (ordinal: in levels, the distance between the class
  positions; regression: in the target's units) and ``spearman`` (scipy's ``spearmanr``;
  None when undefined: fewer than 2 donors, or every label or prediction the same).

Each task's entry holds its ``kind``, ``n`` (the donors scored; every score is None when
it is 0) and its scores. The tasks (kind,
classes) are read from the embedding's ``provenance.json`` (``tasks``), the prediction
of a task from its column ``<task>_pred``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from sampleclr_scale.embed.config import PREDICTIONS_PARQUET, PROVENANCE_FILE
from sampleclr_scale.embed.predictions import predicted_column
from sampleclr_scale.errors import InputError
from sampleclr_scale.evaluate.spare import macro_f1, spearman
from sampleclr_scale.storage import Location
from sampleclr_scale.store.bag_store import BagStore


def prediction_scores(named: list[tuple[str, Location]], bag: BagStore, held: np.ndarray
                      ) -> dict[str, Any]:
    """Held-out scores of every embedding that has predictions.

    Parameters
    ----------
    named : list of (str, Location)
        The embeddings: name and directory.
    bag : BagStore
        The store they were made from.
    held : np.ndarray
        Positions of the held-out donors in the store's donor table.

    Returns
    -------
    dict
        Embedding name -> ``n_donors`` (held-out donors) and ``tasks`` (task ->
        :func:`task_scores`); embeddings without predictions are absent.
    """
    truth = bag.donors.iloc[held].reset_index(drop=True)
    scores = {}
    for name, path in named:
        predictions = _held_out_predictions(path, bag, held)
        if predictions is None:
            continue
        scores[name] = {"n_donors": len(held), "tasks": {
            task["column"]: task_scores(task, predictions[predicted_column(task["column"])],
                                        truth[task["column"]])
            for task in _tasks(path)}}
    return scores


def task_scores(task: dict[str, Any], predicted: pd.Series, truth: pd.Series
                ) -> dict[str, str | float | int | None]:
    """The scores of one task's predictions against the donors' labels.

    Parameters
    ----------
    task : dict
        ``column``, ``kind`` and ``classes`` (code order) of the task, as in provenance.
    predicted : pd.Series
        The predicted classes, levels (their values) or regression values.
    truth : pd.Series
        The donors' labels (missing ones are skipped), aligned with ``predicted``.

    Returns
    -------
    dict
        ``kind``, ``n`` and the scores of the task's kind (see the module docstring).
    """
    kind = task["kind"]
    if kind == "regression":
        y = pd.to_numeric(truth, errors="coerce").to_numpy(np.float64)
        p = predicted.to_numpy(np.float64)
    else:
        y, p = _positions(truth, task["classes"]), _positions(predicted, task["classes"])
    known = ~np.isnan(y) & ~np.isnan(p)
    y, p = y[known], p[known]
    n = len(y)
    scores: dict[str, str | float | int | None] = {"kind": kind, "n": n}
    if kind != "regression":
        codes = y.astype(np.int64), p.astype(np.int64)
        scores["accuracy"] = float(np.mean(y == p)) if n else None
        scores["macro_f1"] = macro_f1(*codes, len(task["classes"])) if n else None
    if kind != "classification":
        scores["mae"] = float(np.mean(np.abs(y - p))) if n else None
        scores["spearman"] = spearman(y, p, undefined=None)
    return scores


def _positions(values: pd.Series, classes: list[Any]) -> np.ndarray:
    """Each value's position among ``classes`` (float), NaN for a missing or other value."""
    lookup = {value: float(code) for code, value in enumerate(classes)}
    return np.array([lookup.get(v, np.nan) if pd.notna(v) else np.nan for v in values],
                    dtype=np.float64)


def _held_out_predictions(emb_dir: Location, bag: BagStore, held: np.ndarray
                          ) -> pd.DataFrame | None:
    """The held-out donors' rows of ``predictions.parquet``, in the order of ``held``,
    checked against the store's donors; None without the file."""
    path = emb_dir / PREDICTIONS_PARQUET
    if not path.is_file():
        return None
    table = path.read_parquet().to_pandas()
    index = table["donor_index"].to_numpy()
    names = bag.donors["donor"].to_numpy()
    if (not np.array_equal(np.sort(index), np.arange(bag.n_donors))
            or table["donor"].tolist() != names[index].tolist()):
        raise InputError(f"the donors of {path} are not those of bag store {bag.location}",
                         "evaluate with the bag store that was embedded")
    return table.set_index("donor_index").loc[held].reset_index(drop=True)


def _tasks(emb_dir: Location) -> list[dict[str, Any]]:
    """The tasks of an embedding's model, from its provenance."""
    path = emb_dir / PROVENANCE_FILE
    tasks = json.loads(path.read_text()).get("tasks") if path.is_file() else None
    if tasks is None:
        raise InputError(f"{emb_dir} has {PREDICTIONS_PARQUET} but no tasks in "
                         f"{PROVENANCE_FILE}", "re-run `sampleclr-scale embed`")
    return tasks
