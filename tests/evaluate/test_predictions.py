"""Supervised predictions: a model trained in this process on ordinal severity,
classification of disease and regression of age embeds the test cohort; its predictions
are checked against the heads run directly on the same cells, written back with the
embeddings, and scored by `evaluate` as scikit-learn and scipy score them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score

from sampleclr_scale.config import TrainConfig
from sampleclr_scale.embed import writeback
from sampleclr_scale.embed.config import EmbedConfig
from sampleclr_scale.embed.embedder import embed
from sampleclr_scale.embed.predictions import ordinal_probabilities
from sampleclr_scale.evaluate import EvaluateConfig, evaluate, headline, report
from sampleclr_scale.evaluate.predictions import task_scores
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.composition import composition_features, donor_type_counts
from sampleclr_scale.train.artifact import load_model
from sampleclr_scale.train.driver import train

RUN = "sup"
TASKS = {"severity": "ordinal", "disease": "classification", "age": "regression"}
TRAIN = {
    "preset": "small",
    "loader": {"batch_size": 4, "cells_per_view": 32, "seed": 1},
    "epochs": 1,
    "supervised_epochs": 2,
    "supervised_min_steps": 0,
    "freeze_epochs": 0,
    "tasks": [{"column": column, "kind": kind} for column, kind in TASKS.items()],
    "patience": None,
    "workers": 1,
    "log_every": 100,
    "seed": 2,
}
EMBED = EmbedConfig(cells=50, batch_donors=5, workers=2, run_name=RUN)


@pytest.fixture(scope="module")
def supervised(store_path, soma_uri, ray_cluster, tmp_path_factory):
    """A copy of the store and the experiment, a supervised run trained in this process,
    and its embedding written back into both."""
    root = tmp_path_factory.mktemp("predictions")
    store = root / "bags.zarr"
    shutil.copytree(store_path, store)
    experiment = root / "exp"
    shutil.copytree(soma_uri, experiment)
    run = root / "run"
    train(str(store), str(run), TrainConfig.from_mapping(TRAIN), in_process=True)
    result = embed(store, run, root / "emb", EMBED, write_back=str(experiment))
    return {"root": root, "store": store, "soma": str(experiment), "run": run,
            "result": result, "predictions": pd.read_parquet(result.predictions)}


def _heads_on_the_chosen_cells(supervised) -> dict[str, np.ndarray]:
    """Each head's outputs ``[n_donors, k]``, the model run on each donor's chosen cells."""
    store = BagStore(supervised["store"])
    model, _ = load_model(supervised["run"])
    # the heads read each donor's composition (the run has a composition channel)
    assert model.config.head_composition == tuple(store.categories("cell_type"))
    composition = torch.from_numpy(composition_features(
        donor_type_counts(store, "cell_type"), store.donor_batch))
    cells = pd.read_parquet(supervised["result"].cell_weights)
    features = store.features[:]
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in TASKS}
    for donor, chosen in cells.groupby("donor_index", sort=True):
        x = torch.from_numpy(features[chosen["store_row"].to_numpy()])[None]
        with torch.no_grad():
            out = model(x, torch.ones(x.shape[:2], dtype=torch.bool),
                        composition=composition[[donor]])
        for name in TASKS:
            outputs[name].append(out.task_outputs[name][0].numpy())
    return {name: np.stack(rows) for name, rows in outputs.items()}


def _ordinal_reference(logits: np.ndarray) -> np.ndarray:
    """P(y = k) from cumulative logits logit P(y > k), one donor and one level at a time."""
    n, thresholds = logits.shape
    p = np.zeros((n, thresholds + 1))
    for i in range(n):
        for k in range(thresholds + 1):
            above_previous = 1.0 if k == 0 else 1.0 / (1.0 + np.exp(-logits[i, k - 1]))
            above = 0.0 if k == thresholds else 1.0 / (1.0 + np.exp(-logits[i, k]))
            p[i, k] = above_previous - above
    return p


def _probabilities(predictions: pd.DataFrame, task: str, classes: list) -> np.ndarray:
    return predictions[[f"{task}_p_{value}" for value in classes]].to_numpy()


def test_ordinal_probabilities_match_a_plain_loop():
    rng = np.random.default_rng(0)
    logits = -np.sort(rng.normal(0.0, 3.0, size=(50, 4)), axis=1)  # non-increasing
    np.testing.assert_allclose(ordinal_probabilities(logits), _ordinal_reference(logits),
                               rtol=1e-12, atol=1e-15)
    p = ordinal_probabilities(np.array([[40.0, 0.0, -40.0]]))  # certainly above 0, below 2
    np.testing.assert_allclose(p, [[0.0, 0.5, 0.5, 0.0]], atol=1e-15)


def test_ordinal_scores_skip_missing_labels_and_count_in_levels():
    task = {"column": "grade", "kind": "ordinal", "classes": ["a-low", "b-mid", "c-high"]}
    truth = pd.Series(["a-low", "b-mid", None, "c-high", "c-high", "a-low"])
    predicted = pd.Series(["a-low", "c-high", "b-mid", "b-mid", "c-high", "b-mid"])
    got = task_scores(task, predicted, truth)
    level = {value: code for code, value in enumerate(task["classes"])}
    y, p = truth[truth.notna()], predicted[truth.notna()]
    assert got["kind"] == "ordinal" and got["n"] == 5
    assert got["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert got["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert got["mae"] == pytest.approx(np.mean(np.abs(y.map(level) - p.map(level))))
    assert got["spearman"] == pytest.approx(stats.spearmanr(y.map(level),
                                                            p.map(level)).statistic)
    nobody = task_scores(task, predicted[:2], pd.Series([None, None]))
    assert nobody == {"kind": "ordinal", "n": 0, "accuracy": None, "macro_f1": None,
                      "mae": None, "spearman": None}


@pytest.mark.ray
def test_predictions_equal_the_heads_on_the_same_cells(supervised):
    store = BagStore(supervised["store"])
    predictions = supervised["predictions"]
    heads = _heads_on_the_chosen_cells(supervised)
    assert predictions["donor_index"].tolist() == list(range(store.n_donors))
    assert predictions["donor"].tolist() == store.donors["donor"].tolist()

    severity = sorted(store.donors["severity"].unique().tolist())
    logits = heads["severity"].astype(np.float64)
    np.testing.assert_allclose(_probabilities(predictions, "severity", severity),
                               _ordinal_reference(logits), atol=1e-6)
    levels = (1.0 / (1.0 + np.exp(-logits)) > 0.5).sum(axis=1)  # P(y > k) above one half
    assert predictions["severity_pred"].tolist() == [severity[k] for k in levels]

    disease = sorted(store.donors["disease"].unique().tolist())
    expected = torch.softmax(torch.from_numpy(heads["disease"]).double(), dim=1).numpy()
    np.testing.assert_allclose(_probabilities(predictions, "disease", disease), expected,
                               atol=1e-6)
    assert predictions["disease_pred"].tolist() == [disease[k] for k in
                                                    heads["disease"].argmax(axis=1)]

    # regression in the original units: the training donors' mean and (population) std
    age = store.donors["age"].to_numpy(np.float64)[store.split_donors("train")]
    age = age[~np.isnan(age)]
    np.testing.assert_allclose(predictions["age_pred"],
                               heads["age"][:, 0] * age.std() + age.mean(), rtol=1e-5)


@pytest.mark.ray
def test_probabilities_sum_to_one(supervised):
    store = BagStore(supervised["store"])
    predictions = supervised["predictions"]
    for task in ("severity", "disease"):
        classes = sorted(store.donors[task].unique().tolist())
        p = _probabilities(predictions, task, classes)
        assert (p >= 0).all() and (p <= 1).all()
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    assert [c for c in predictions.columns if c.startswith("age")] == ["age_pred"]


@pytest.mark.ray
def test_the_h5ad_and_the_provenance_carry_the_predictions(supervised):
    import anndata

    predictions = supervised["predictions"]
    obs = anndata.read_h5ad(supervised["result"].h5ad).obs
    for column in predictions.columns.drop(["donor_index", "donor"]):
        np.testing.assert_array_equal(np.asarray(obs[column]), predictions[column].to_numpy())
    tasks = json.loads(supervised["result"].provenance.read_text())["tasks"]
    assert {t["column"]: t["kind"] for t in tasks} == TASKS


@pytest.mark.ray
def test_the_write_back_carries_the_predictions(supervised):
    predictions = supervised["predictions"]
    columns = predictions.columns.drop(["donor_index", "donor"])
    for target in (supervised["soma"], supervised["store"]):
        donors, _ = writeback.read_back(target, RUN)
        assert donors["donor_index"].tolist() == predictions["donor_index"].tolist()
        pd.testing.assert_frame_equal(donors[columns], predictions[columns],
                                      check_dtype=False)
    assert (supervised["store"] / "embeddings" / RUN / "predictions.parquet").is_file()


@pytest.mark.ray
@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")  # the reference's
def test_evaluate_scores_held_out_predictions_as_sklearn_and_scipy(supervised, monkeypatch):
    monkeypatch.setattr(report, "_umap_module", lambda: None)  # maps by PCA, faster
    store = BagStore(supervised["store"])
    out = supervised["root"] / "report"
    metrics = evaluate([f"{RUN}={supervised['result'].out}"], str(supervised["store"]),
                       str(out), EvaluateConfig(seeds=1))
    held = store.split_donors("validation")
    truth = store.donors.iloc[held].reset_index(drop=True)
    predicted = supervised["predictions"].iloc[held].reset_index(drop=True)
    scores = metrics["predictions"][RUN]
    assert scores["n_donors"] == len(held) and set(scores["tasks"]) == set(TASKS)
    for task, kind in TASKS.items():
        got = scores["tasks"][task]
        y, p = truth[task], predicted[f"{task}_pred"]
        assert got["kind"] == kind and got["n"] == len(held)
        if kind != "regression":
            assert got["accuracy"] == pytest.approx(accuracy_score(y, p))
            assert got["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
        if kind != "classification":
            assert got["mae"] == pytest.approx(np.mean(np.abs(y - p)))
            rho = stats.spearmanr(y, p).statistic
            assert got["spearman"] == (None if np.isnan(rho) else pytest.approx(rho))
        assert set(got) == {"kind", "n", *(("accuracy", "macro_f1") if kind != "regression"
                                           else ()),
                            *(("mae", "spearman") if kind != "classification" else ())}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["predictions"] == json.loads(json.dumps(metrics["predictions"]))
    text = (out / "report.md").read_text()
    table = text[text.index("## Supervised predictions (held-out donors)"):]
    assert f"| {RUN} | severity | ordinal | {len(held)} |" in table
    line = headline(metrics).split("\n\n")[-1]
    assert line.startswith(f"held-out predictions of {RUN} ({len(held)} validation donors): "
                           f"severity accuracy {scores['tasks']['severity']['accuracy']:.3f}, ")
    assert "; disease accuracy " in line and "; age MAE " in line and "\n" not in line
