"""Evaluation stage: SPARE metrics against hand-computed values, baselines on a real bag
store against direct computations, and the whole `evaluate` on embedding directories
written here the way the embed stage writes them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sampleclr_scale.errors import InputError
from sampleclr_scale.evaluate import EvaluateConfig, evaluate, headline, read_embeddings, report
from sampleclr_scale.evaluate.baselines import (
    cell_types,
    composition,
    gloscope_distances,
    random_vectors,
)
from sampleclr_scale.evaluate.spare import (
    _kernel,
    _transitions,
    batch_mixing_score,
    cosine_distances,
    diffusion_pseudotime,
    information_score,
    knn_predict,
    replicate_score,
    spare_scores,
    spare_total,
    trajectory_score,
)
from sampleclr_scale.prior.graph import PriorGraph
from sampleclr_scale.prior.storage import save_prior
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.pseudobulk import donor_means

# Six donors with distinct distances, so every neighbour order is unambiguous.
D6 = np.array([
    [0.00, 0.10, 0.90, 0.50, 0.60, 0.80],
    [0.10, 0.00, 0.70, 0.40, 0.95, 0.85],
    [0.90, 0.70, 0.00, 0.20, 0.30, 0.35],
    [0.50, 0.40, 0.20, 0.00, 0.15, 0.45],
    [0.60, 0.95, 0.30, 0.15, 0.00, 0.25],
    [0.80, 0.85, 0.35, 0.45, 0.25, 0.00],
])

# k = 3, self excluded, weight 1/d. Labels A A A B B B.
# donor  neighbours (distance)      labels  weighted votes              prediction
#   0    1 (.10) 3 (.50) 4 (.60)    A B B   A 10       B 2 + 5/3        A  (unweighted: B)
#   1    0 (.10) 3 (.40) 2 (.70)    A B A   A 10+10/7  B 5/2            A
#   2    3 (.20) 4 (.30) 5 (.35)    B B B   B                           B
#   3    4 (.15) 2 (.20) 1 (.40)    B A A   A 5 + 5/2  B 20/3           A
#   4    3 (.15) 5 (.25) 2 (.30)    B B A   A 10/3     B 20/3 + 4       B
#   5    4 (.25) 2 (.35) 3 (.45)    B A B   A 20/7     B 4 + 20/9       B
LABELS = list("AAABBB")
PREDICTED = list("AABABB")
# A: TP 2 (0, 1) FP 1 (3) FN 1 (2) -> F1 2/3; B: TP 2 (4, 5) FP 1 (2) FN 1 (3) -> F1 2/3.
# Macro-F1 2/3, L = 2 classes: (2/3 - 1/2) / (1 - 1/2) = 1/3.
CATEGORICAL_SCORE = 1 / 3

# Continuous labels y = 0..5, weighted means over the same neighbours:
#   0: (10*1 + 2*3 + 5/3*4) / (41/3)           = 68/41
#   1: (10*0 + 5/2*3 + 10/7*2) / (195/14)      = 29/39
#   2: (5*3 + 10/3*4 + 20/7*5) / (235/21)      = 179/47
#   3: (20/3*4 + 5*2 + 5/2*1) / (85/6)         = 47/17
#   4: (20/3*3 + 4*5 + 10/3*2) / 14            = 10/3
#   5: (4*4 + 20/7*2 + 20/9*3) / (572/63)      = 447/143
MEANS = [68 / 41, 29 / 39, 179 / 47, 47 / 17, 10 / 3, 447 / 143]
# Prediction ranks 2 1 6 3 5 4 vs truth 1..6: sum d^2 = 1+1+9+1+0+4 = 16,
# rho = 1 - 6*16 / (6*35) = 19/35.
SPEARMAN = 19 / 35


def _line(n: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.arange(float(n))
    return x, np.abs(x[:, None] - x[None, :])


# ---- information retention, batch mixing, total -----------------------------------


def test_categorical_knn_matches_hand_computation():
    assert knn_predict(D6, LABELS, k=3, kind="categorical").tolist() == PREDICTED
    assert information_score(D6, LABELS, "categorical") == pytest.approx(CATEGORICAL_SCORE)


def test_distance_weighting_decides_against_the_majority():
    # Donor 0's neighbours vote A, B, B; the near A (d = .1) outweighs both Bs.
    assert knn_predict(D6, LABELS, k=3)[0] == "A"
    equal = D6.copy()
    equal[0, [1, 3, 4]] = equal[[1, 3, 4], 0] = 0.5  # the same neighbours, equal weights
    assert knn_predict(equal, LABELS, k=3)[0] == "B"


def test_continuous_knn_matches_hand_computation():
    y = np.arange(6.0)
    np.testing.assert_allclose(knn_predict(D6, y, k=3, kind="continuous"), MEANS, rtol=1e-6)
    assert information_score(D6, y, "continuous") == pytest.approx(SPEARMAN)
    assert information_score(D6, y, "ordinal") == pytest.approx(SPEARMAN)


def test_leave_one_out_excludes_the_donor_itself():
    # Pairs of close donors with opposite labels: with itself as neighbour every donor
    # would be right (score 1); without, every prediction is wrong.
    positions = np.array([0.0, 1.0, 5.0, 6.0, 10.0, 11.0])
    D = np.abs(positions[:, None] - positions[None, :])
    labels = list("ABABAB")
    assert knn_predict(D, labels, k=1).tolist() == list("BABABA")
    assert information_score(D, labels, "categorical", k=1) == 0.0  # F1 0 -> -1 -> clipped


def test_negative_spearman_is_clipped_to_zero():
    positions = np.array([0.0, 1.0, 5.0, 6.0, 10.0, 11.0])
    D = np.abs(positions[:, None] - positions[None, :])
    y = np.array([0.0, 5.0, 1.0, 4.0, 2.0, 3.0])  # each partner predicts 5 - y: rho = -1
    np.testing.assert_allclose(knn_predict(D, y, k=1, kind="continuous"), 5.0 - y)
    assert information_score(D, y, "continuous", k=1) == 0.0


def test_missing_labels_are_neither_predicted_nor_neighbours():
    y = np.array([0.0, 1.0, 2.0, 3.0, 4.0, np.nan])
    predicted = knn_predict(D6, y, k=3, kind="continuous")
    assert np.isnan(predicted[5])
    # Donor 4 without donor 5: 3 (.15, y 3), 2 (.30, y 2), 0 (.60, y 0)
    # -> (20/3*3 + 10/3*2 + 5/3*0) / (35/3) = 16/7 (10/3 with donor 5).
    assert predicted[4] == pytest.approx(16 / 7, rel=1e-6)
    sub = np.ix_(range(5), range(5))
    np.testing.assert_allclose(predicted[:5], knn_predict(D6[sub], y[:5], 3, "continuous"))
    labels = [*LABELS[:5], None]
    categorical = knn_predict(D6, labels, k=3)
    assert categorical[5] is None
    assert categorical[:5].tolist() == knn_predict(D6[sub], LABELS[:5], k=3).tolist()
    assert information_score(D6, labels, "categorical") == information_score(
        D6[sub], LABELS[:5], "categorical")


def test_batch_mixing_is_one_minus_information():
    assert batch_mixing_score(D6, LABELS, "categorical") == pytest.approx(1 - CATEGORICAL_SCORE)


def test_single_class_and_constant_predictions_score_zero():
    assert information_score(D6, ["A"] * 6, "categorical") == 0.0
    assert information_score(D6, np.ones(6), "continuous") == 0.0
    assert information_score(D6, [1.0, *[np.nan] * 5], "continuous") == 0.0


def test_total_formula():
    assert spare_total(0.5, 0.4, 0.3) == pytest.approx((0.5 + 0.5 * 0.4 + 0.3) / 2.5)
    assert spare_total(0.5, 0.4, None) == pytest.approx((0.5 + 0.5 * 0.4) / 1.5)


def test_cosine_distances():
    Z = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    expected = np.array([[0, 0, 1, 2], [0, 0, 1, 2], [1, 1, 0, 1], [2, 2, 1, 0]], float)
    np.testing.assert_allclose(cosine_distances(Z), expected, atol=1e-12)


# ---- trajectory --------------------------------------------------------------------


def test_pseudotime_along_a_line_follows_the_position():
    x, D = _line(20)
    pseudotime = diffusion_pseudotime(D, root=0, k=5)
    assert pseudotime[0] == 0.0 and np.all(np.diff(pseudotime) > 0)
    assert trajectory_score(D, x, root=0, k=5) == pytest.approx(1.0)
    assert trajectory_score(D, -x, root=0, k=5) == 0.0  # rho = -1, clipped


def test_pseudotime_equals_accumulated_transitions():
    # DPT via the eigen-decomposition vs M = (I - T + phi0 phi0^T)^-1 - I (Haghverdi 2016).
    rng = np.random.default_rng(0)
    D = cosine_distances(rng.normal(size=(15, 4)))
    T = _transitions(_kernel(D, 5))
    phi0 = np.linalg.eigh(T)[1][:, -1]
    M = np.linalg.inv(np.eye(15) - T + np.outer(phi0, phi0)) - np.eye(15)
    np.testing.assert_allclose(diffusion_pseudotime(D, 3, k=5), np.linalg.norm(M - M[3], axis=1),
                               atol=1e-8)


def test_pseudotime_is_infinite_off_the_root_component():
    positions = np.array([0.0, 1.0, 2.0, 100.0, 101.0, 102.0])
    D = np.abs(positions[:, None] - positions[None, :])
    pseudotime = diffusion_pseudotime(D, root=0, k=2)
    assert np.all(np.isfinite(pseudotime[:3])) and np.all(np.isinf(pseudotime[3:]))


# ---- replicates ----------------------------------------------------------------------


def test_replicate_score():
    _, D = _line(6)
    assert replicate_score(D, ["a", "a", "b", "b", "c", "c"]) == 1.0  # pairs are nearest
    # D6: donors 3 and 4 each have one donor nearer than the replicate (rank 2, score
    # 1 - 1/4); the other four have their replicate nearest: (4 + 2 * 0.75) / 6.
    assert replicate_score(D6, ["a", "a", "b", "b", "c", "c"]) == pytest.approx(5.5 / 6)
    assert replicate_score(D, list("abcdef")) is None
    assert replicate_score(D, [None, None, "b", "c", np.nan, "d"]) is None


def test_spare_scores_bundles_everything():
    donors = pd.DataFrame({"label": LABELS, "y": np.arange(6.0), "site": list("xyxyxy"),
                           "person": ["a", "a", "b", "b", "c", "c"]})
    config = EvaluateConfig(relevant={"label": "categorical", "y": "continuous"},
                            technical={"site": "categorical"}, trajectory="y",
                            replicate_column="person", trajectory_k=3)
    scores = spare_scores(D6, donors, config)
    assert scores["information"] == pytest.approx({"label": CATEGORICAL_SCORE, "y": SPEARMAN})
    assert scores["information_mean"] == pytest.approx((CATEGORICAL_SCORE + SPEARMAN) / 2)
    assert scores["batch"]["site"] == batch_mixing_score(D6, donors["site"], "categorical")
    assert scores["trajectory"] == trajectory_score(D6, donors["y"], 0, 3)
    assert scores["replicate"] == pytest.approx(5.5 / 6)
    assert scores["total"] == pytest.approx(spare_total(
        scores["information_mean"], scores["batch_mean"], scores["trajectory"]))


# ---- config ------------------------------------------------------------------------


def test_unknown_covariate_is_an_input_error(store_path):
    donors = BagStore(store_path).donors
    EvaluateConfig().check_columns(donors, store_path)  # the defaults fit the cohort
    with pytest.raises(InputError, match="'bmi' is not a column") as err:
        EvaluateConfig(relevant={"bmi": "continuous"}).check_columns(donors, store_path)
    assert "--meta bmi" in err.value.fix
    with pytest.raises(InputError, match="declared continuous"):
        EvaluateConfig(relevant={"disease": "continuous"}).check_columns(donors, store_path)
    with pytest.raises(InputError, match="both relevant and technical"):
        EvaluateConfig.from_mapping({"relevant": {"sex": "categorical"}})
    with pytest.raises(InputError, match="relevnt"):
        EvaluateConfig.from_mapping({"relevnt": {}})


# ---- baselines -----------------------------------------------------------------------


def test_composition_fractions(store_path):
    store = BagStore(store_path)
    fractions = composition(store)
    types = store.cell_table(["cell_type"])["cell_type"].astype(str).to_numpy()
    names = sorted(set(types))
    np.testing.assert_allclose(fractions.sum(axis=1), 1.0)
    ptr = store.donor_ptr
    for i in (0, store.n_donors - 1):
        own = types[ptr[i] : ptr[i + 1]]
        np.testing.assert_allclose(fractions[i], [np.mean(own == t) for t in names])
    with pytest.raises(InputError, match="no column 'tissue'"):
        composition(store, "tissue")


def test_cell_types_from_the_stored_codes_equal_the_cell_tables(store_path):
    store = BagStore(store_path)
    codes, names = cell_types(store)  # from codes/cell_type
    types = store.cell_table(["cell_type"])["cell_type"].astype(str).to_numpy()
    assert names == sorted(set(types))
    assert np.array_equal(np.array(names, dtype=object)[codes], types)


def test_random_vectors_reproducible():
    assert np.array_equal(random_vectors(5, 3, seed=1), random_vectors(5, 3, seed=1))
    assert not np.array_equal(random_vectors(5, 3, seed=1), random_vectors(5, 3, seed=2))


def _store_with_gloscope(store_path: str, root: Path) -> tuple[str, np.ndarray]:
    """A copy of the store holding a dense gloscope prior of known divergences."""
    copy = root / "with_prior.zarr"
    shutil.copytree(store_path, copy)
    n = BagStore(copy).n_donors
    rng = np.random.default_rng(5)
    D = rng.uniform(0.5, 20.0, size=(n, n))
    D = (D + D.T) / 2
    np.fill_diagonal(D, 0.0)
    rows, cols = np.indices((n, n)).reshape(2, -1)
    save_prior(str(copy), PriorGraph(n_donors=n, rows=rows, cols=cols,
                                     values=np.exp(-D / 5.0).ravel().astype(np.float32),
                                     kind="gloscope", params={"mode": "dense", "scale": 5.0}))
    return str(copy), D


def test_gloscope_distances(store_path, tmp_path):
    bare = tmp_path / "bare.zarr"  # the shared store gets one from a default training run
    shutil.copytree(store_path, bare, ignore=shutil.ignore_patterns("priors"))
    assert gloscope_distances(str(bare)) is None  # no prior built
    copy, D = _store_with_gloscope(store_path, tmp_path)
    np.testing.assert_allclose(gloscope_distances(copy), D, rtol=1e-5, atol=1e-5)


# ---- the evaluation stage ----------------------------------------------------------


def _write_embedding(path: Path, store: BagStore, Z: np.ndarray, seed: int,
                     run_dir: Path | None = None, heads: int = 2) -> Path:
    """An embedding directory as the embed stage writes it, donors in shuffled order."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    order = rng.permutation(store.n_donors)
    z = pa.FixedSizeListArray.from_arrays(pa.array(Z[order].astype(np.float32).ravel()),
                                          Z.shape[1])
    pq.write_table(pa.table({"donor_index": pa.array(order, pa.int64()),
                             "donor": store.donors["donor"].to_numpy()[order].tolist(),
                             "z": z}), path / "donor_embeddings.parquet")
    ptr = store.donor_ptr
    rows = [rng.choice(np.arange(ptr[i], ptr[i + 1]), size=min(40, ptr[i + 1] - ptr[i]),
                       replace=False) for i in range(store.n_donors)]
    donor = np.repeat(np.arange(store.n_donors), [len(r) for r in rows])
    columns = {"donor_index": pa.array(donor, pa.int64()),
               "store_row": pa.array(np.concatenate(rows), pa.int64())}
    for h in range(heads):
        w = rng.random(len(donor))
        columns[f"head_{h}"] = pa.array((w / np.bincount(donor, w)[donor]).astype(np.float32))
    pq.write_table(pa.table(columns), path / "cell_weights.parquet")
    if run_dir is not None:
        (path / "provenance.json").write_text(json.dumps({"checkpoint": str(run_dir)}))
    return path


def _write_run(path: Path) -> Path:
    path.mkdir(parents=True)
    records = [{"stage": 1 if e < 3 else 2, "epoch": e, "train_loss": 3.0 - 0.3 * e,
                "val_loss": 3.1 - 0.25 * e} for e in range(5)]
    records[-1]["val_severity_accuracy"] = 0.5
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def no_umap(monkeypatch):
    """Maps by PCA: importing umap-learn takes seconds."""
    monkeypatch.setattr(report, "_umap_module", lambda: None)


def _check_held_out(saved: dict, store: BagStore, config: EvaluateConfig,
                    vectors: list[np.ndarray], built: tuple[str, np.ndarray] | None, text: str,
                    held_out: str) -> None:
    """The held-out block of test_evaluate_end_to_end: SPARE on the validation donors
    alone, recomputed here from the vectors (or divergences) of those donors only."""
    validation = store.split_donors("validation")
    assert saved["n_held_out"] == len(validation) >= config.k + 2  # 5 in the fixture
    held_donors = store.donors.iloc[validation].reset_index(drop=True)
    reference = {
        ("sampleclr", f"sampleclr_seed{seed}"): cosine_distances(
            Z.astype(np.float32)[validation]) for seed, Z in enumerate(vectors)}
    reference[("pseudobulk", "pseudobulk")] = cosine_distances(donor_means(store)[validation])
    reference[("random", "random_seed1")] = cosine_distances(
        random_vectors(store.n_donors, 9, seed=1)[validation])
    if built is not None:
        reference[("gloscope", "gloscope")] = built[1][np.ix_(validation, validation)]
    for (method, run), D in reference.items():
        expected = {key: value if value is None else pytest.approx(value, abs=1e-9)
                    for key, value in spare_scores(D, held_donors, config).items()}
        assert saved["methods"][method]["held_out"]["runs"][run]["scores"] == expected, run
    totals = [spare_scores(reference[("sampleclr", f"sampleclr_seed{seed}")], held_donors,
                           config)["total"] for seed in (0, 1)]
    sampleclr = saved["methods"]["sampleclr"]["held_out"]
    assert sampleclr["mean"]["total"] == pytest.approx(np.mean(totals))
    assert sampleclr["std"]["total"] == pytest.approx(np.std(totals, ddof=1))
    for method in saved["methods"].values():
        assert set(method["held_out"]) == {"mean", "std", "runs"}
        assert set(method["held_out"]["mean"]) == set(saved["columns"])
    assert saved["held_out_trajectory_root"] == held_donors["donor"].iloc[
        int(np.argmin(held_donors["severity"]))]
    assert "held_out" not in saved["skipped"]
    # the second table, after the main one and before the figures
    heading = f"## Held-out donors (validation split, {len(validation)} donors)"
    assert text.index("## Scores") < text.index(heading) < text.index("## Donor maps")
    held_table = text[text.index(heading):text.index("## Donor maps")]
    assert "| sampleclr | 2 |" in held_table and "| pseudobulk | 1 |" in held_table
    assert held_out.startswith(f"held-out total ({len(validation)} validation donors): "
                               "sampleclr ")
    assert len(held_out.splitlines()) == 1


def test_evaluate_end_to_end(store_path, tmp_path, no_umap):
    built = _store_with_gloscope(store_path, tmp_path)
    store_dir = store_path if built is None else built[0]
    store = BagStore(store_dir)
    rng = np.random.default_rng(0)
    severity = store.donors["severity"].to_numpy(np.float64)[:, None]
    base = donor_means(store)
    run_dir = _write_run(tmp_path / "run")
    emb, vectors = [], []
    for seed in (0, 1):
        Z = np.hstack([base, 2.0 * severity]) + 0.05 * rng.normal(size=(store.n_donors, 9))
        emb.append(str(_write_embedding(tmp_path / f"sampleclr_seed{seed}", store, Z, seed,
                                        run_dir)))
        vectors.append(Z)
    config = EvaluateConfig(seeds=2)
    out = tmp_path / "report"
    metrics = evaluate(emb, store_dir, str(out), config)

    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    expected = {"sampleclr", "pseudobulk", "composition", "random"}
    if "cell_type" in store.code_columns:
        expected |= {"composition_clr", "celltype_pseudobulk"}
        if store.donor_batch is not None:
            expected |= {"composition_clr_centred", "celltype_pseudobulk_centred",
                         "celltype_standardized", "pseudobulk_centred"}
    assert set(saved["methods"]) == expected | ({"gloscope"} if built else set())
    confounding = saved["confounding"]["table"]
    assert set(confounding) == set(config.relevant)
    assert set(confounding["severity"]) == set(config.technical)
    assert "## Confounding" in (out / "report.md").read_text()
    assert saved["confounding"]["meaning"][0] in (out / "report.md").read_text()
    sampleclr, random = saved["methods"]["sampleclr"], saved["methods"]["random"]
    assert sampleclr["n_runs"] == 2 and set(sampleclr["runs"]) == {"sampleclr_seed0",
                                                                   "sampleclr_seed1"}
    assert random["n_runs"] == 2 and random["std"] is not None
    assert saved["methods"]["pseudobulk"]["std"] is None
    for method in saved["methods"].values():
        assert set(method["mean"]) == set(saved["columns"])
        assert 0.0 <= method["mean"]["total"] <= 1.0
    assert sampleclr["mean"]["information/severity"] > random["mean"]["information/severity"]
    assert sampleclr["mean"]["trajectory"] > random["mean"]["trajectory"]
    assert saved["map_method"] == "pca"

    # cell weights: each donor's weights normalised to mean 1, so the overall mean is 1
    table = saved["cell_weights"]["sampleclr"]
    cells = pd.Series(table["cells"])
    for head in ("head_0", "head_1"):
        mean = pd.Series(table["mean_weight"][head])
        assert (mean * cells[mean.index]).sum() / cells.sum() == pytest.approx(1.0, rel=1e-5)
    # training curves found through provenance.json
    assert saved["training"]["run"]["epochs"] == 5

    text = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == len(config.columns) + 2  # maps, one heatmap, one training curve
    for link in links:
        assert link.endswith(".png") and (out / link).is_file()
    assert "| sampleclr | 2 |" in text
    table, _, held_out = headline(metrics).partition("\n\n")  # the table, then held-out
    lines = table.splitlines()
    assert lines[0].split() == ["method", "information", "batch", "trajectory", "total"]
    assert [line.split()[0] for line in lines[1:]] == list(saved["methods"])

    _check_held_out(saved, store, config, vectors, built, text, held_out)


def test_evaluate_validation_split_and_names(store_path, tmp_path, no_umap):
    store = BagStore(store_path)
    Z = donor_means(store)
    emb = _write_embedding(tmp_path / "emb", store, Z, seed=0)
    out = tmp_path / "report"
    config = EvaluateConfig(split="validation", seeds=1, relevant={"severity": "ordinal"},
                            technical={}, trajectory=None)
    metrics = evaluate([f"mine={emb}"], store_path, str(out), config)
    assert metrics["n_donors"] == len(store.split_donors("validation"))
    assert next(iter(metrics["methods"])) == "mine"
    assert metrics["columns"] == ["information/severity", "information", "total"]
    # the same vectors as the pseudobulk baseline score the same
    assert metrics["methods"]["mine"]["mean"] == pytest.approx(
        metrics["methods"]["pseudobulk"]["mean"], abs=1e-6)
    # the scores already are the held-out ones: no second block, nothing skipped
    assert metrics["n_held_out"] is None and "held_out" not in metrics["skipped"]
    assert all("held_out" not in method for method in metrics["methods"].values())
    assert "Held-out donors" not in (out / "report.md").read_text()


def test_too_few_validation_donors_skip_the_held_out_block(store_path, tmp_path, no_umap):
    store = BagStore(store_path)
    emb = _write_embedding(tmp_path / "emb", store, donor_means(store), seed=0)
    out = tmp_path / "report"
    n = len(store.split_donors("validation"))  # 5 in the fixture; k = n - 1 needs n + 1
    config = EvaluateConfig(k=n - 1, seeds=1, relevant={"severity": "ordinal"}, technical={},
                            trajectory=None)
    metrics = evaluate([f"mine={emb}"], store_path, str(out), config)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n_held_out"] is None
    assert saved["skipped"]["held_out"] == (f"{n} validation donors; scoring held-out "
                                            f"donors needs at least k + 2 = {n + 1}")
    assert all("held_out" not in method for method in saved["methods"].values())
    assert saved["methods"]["mine"]["mean"]["total"] > 0  # all donors are still scored
    text = (out / "report.md").read_text()
    assert "Held-out donors" not in text
    assert f"Not evaluated: held_out ({n} validation donors;" in text
    assert "held-out" not in headline(metrics)


def test_bad_embeddings_are_input_errors(store_path, tmp_path):
    store = BagStore(store_path)
    Z = np.ones((store.n_donors, 3))
    emb = _write_embedding(tmp_path / "emb", store, Z, seed=0)
    index, read = read_embeddings(emb)
    assert read.dtype == np.float32 and read.shape == (store.n_donors, 3)
    assert sorted(index) == list(range(store.n_donors))
    config = EvaluateConfig()
    with pytest.raises(InputError, match=r"no donor_embeddings\.parquet"):
        evaluate([str(tmp_path)], store_path, str(tmp_path / "out"), config)
    with pytest.raises(InputError, match="bad method name"):
        evaluate([f"random={emb}"], store_path, str(tmp_path / "out"), config)
    with pytest.raises(InputError, match=r"has no metrics\.jsonl"):
        evaluate([str(emb)], store_path, str(tmp_path / "out"), config, run_dirs=[str(emb)])
    table = pq.read_table(emb / "donor_embeddings.parquet")
    pq.write_table(table.slice(1), emb / "donor_embeddings.parquet")
    with pytest.raises(InputError, match="lacks 1 scored donors"):
        evaluate([str(emb)], store_path, str(tmp_path / "out"), config)
