"""Recipes: every YAML in pipelines/ validates, and the Census recipes run end to end
offline against Census-shaped local copies: the PBMC recipe, and the paper's cohorts
(COMBAT, Stephenson, OneK1K, HLCA) from a copy holding their datasets."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cellxgene_census
import numpy as np
import pandas as pd
import pytest
import yaml

from sampleclr_scale.cli import main
from sampleclr_scale.config import IngestConfig, TrainConfig, read_yaml
from sampleclr_scale.embed import writeback
from sampleclr_scale.embed.config import EmbedConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.evaluate import EvaluateConfig
from sampleclr_scale.evaluate.spare import ordered_values
from sampleclr_scale.ingest.cohort import DONOR_SEPARATOR
from sampleclr_scale.ingest.stage import ingest
from sampleclr_scale.pipeline import STORE_DIR, PipelineConfig, _merge, run_pipeline
from sampleclr_scale.prior.config import PriorConfig
from sampleclr_scale.store.bag_store import BagStore
from tests.conftest import PAPER_DATASETS

PIPELINES = Path(__file__).parents[1] / "pipelines"
RECIPES = sorted(PIPELINES.glob("*.yaml"))
PBMC = PIPELINES / "census_pbmc_covid.yaml"
PAPER_STUDIES = dict(zip(("census_combat", "census_stephenson", "census_onek1k", "census_hlca"),
                         PAPER_DATASETS, strict=False))  # the 5th (HLCA core): none
"""The paper's recipes and the dataset of the fake Census each must select."""
PAPER_SHRINK = {"min_cells": 20, "val_fraction": 0.3}
"""Ingest settings for the fake's 12 donors per study (samples of 30-160 cells)."""


def shrunk_recipe(path: Path, **ingest_settings: Any) -> dict[str, Any]:
    """The recipe at ``path`` cut to a test cohort: ``ingest_settings`` over its ingest
    keys (PCA to 8 of the copies' 20-30 genes), views and embeddings of 32 cells, one
    frozen epoch, no progress lines."""
    values = read_yaml(path)
    assert values["ingest"]["features"] == "pca:50"  # each recipe's choice (its comment)
    values["ingest"] = {**values["ingest"], "features": "pca:8", **ingest_settings}
    values["train"] = _merge(values["train"], {"loader": {"cells_per_view": 32},
                                               "freeze_epochs": 1, "log_every": 1000})
    values["embed"] = {**values["embed"], "cells": 32}
    return values


def paper_recipe(name: str, census_uri: str) -> PipelineConfig:
    """Paper recipe ``name``, shrunk, reading the fake Census at ``census_uri``."""
    values = shrunk_recipe(PIPELINES / f"{name}.yaml", **PAPER_SHRINK)
    return PipelineConfig.from_mapping(values, where=name).with_source(f"census:{census_uri}")


def test_there_are_recipes():
    assert PBMC in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(path):
    recipe = PipelineConfig.from_yaml(path)
    assert isinstance(recipe.ingest_config(STORE_DIR), IngestConfig)
    assert isinstance(recipe.evaluate_config(), EvaluateConfig)
    for model, entry in recipe.models.items():
        assert isinstance(recipe.train_config(model), TrainConfig)
        for label, mode in entry.labels(model).items():
            assert recipe.embed_config(label, mode).run_name == label
    # the same, straight from the YAML mappings with the stage configs alone
    raw = read_yaml(path)
    IngestConfig.from_mapping({**raw.get("ingest", {}), "source": raw["source"], "out": "x"})
    TrainConfig.from_mapping(raw.get("train", {}))
    EmbedConfig.from_mapping(raw.get("embed", {}))
    EvaluateConfig.from_mapping(raw.get("evaluate", {}))


def test_census_recipe_settings():
    recipe = PipelineConfig.from_yaml(PBMC)
    ingest = recipe.ingest_config(STORE_DIR)
    assert ingest.donor_key == ["dataset_id", "donor_id"] and ingest.primary_only
    assert recipe.write_back and recipe.prior.kind == "gloscope"
    assert recipe.evaluate_config().trajectory is None


@pytest.mark.parametrize(("change", "message"), [
    ({"write_back": None}, "Census is read-only"),
    ({"write_back": "none"}, "write_back: false"),
    ({"write_back": True}, "write_back"),
    ({"ingest": {"out": "elsewhere"}}, "ingest cannot set"),
    ({"prior": "pseudobulk"}, "gloscope prior"),
    ({"train": {"epochs": 0}}, "epochs"),
    ({"evaluate": {"relevent": {}}}, "relevent"),
    ({"models": {"bad name": {}}}, "cannot name"),
])
def test_bad_recipes_are_refused(change, message):
    values = read_yaml(PBMC)
    values.update(change)
    with pytest.raises(InputError, match=message):
        PipelineConfig.from_mapping(values)


def test_a_census_recipe_may_write_nothing_back():
    values = read_yaml(PBMC)
    values["write_back"] = False
    assert PipelineConfig.from_mapping(values).write_back is False


def test_a_recipe_without_a_prior_builds_the_ones_its_models_name():
    values = {**read_yaml(PBMC), "prior": None}
    recipe = PipelineConfig.from_mapping(values)  # the models name gloscope
    assert [p.kind for p in recipe.priors()] == ["gloscope"]
    assert recipe.priors()[0] == PriorConfig(kind="gloscope")  # the defaults
    values["train"] = {**values["train"], "loss": {"prior": None}}
    assert PipelineConfig.from_mapping(values).priors() == []
    values["prior"] = "pseudobulk"  # built, and no model needs another
    assert [p.kind for p in PipelineConfig.from_mapping(values).priors()] == ["pseudobulk"]


def test_model_settings_merge_over_shared_ones():
    assert _merge({"loss": {"tau": 0.1, "prior": "gloscope"}, "epochs": 3},
                  {"loss": {"tau": 0.2}}) == {"loss": {"tau": 0.2, "prior": "gloscope"},
                                               "epochs": 3}


@pytest.mark.ray
def test_census_recipe_offline_end_to_end(census_uri, ray_cluster, tmp_path, capsys):
    # the real recipe, shrunk to the 24-donor test cohort (60-400 cells per donor)
    values = shrunk_recipe(PBMC, min_cells=40)
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump(values))
    census_files = {p: p.stat().st_mtime_ns for p in Path(census_uri).rglob("*")}

    out = tmp_path / "pbmc"
    assert main(["pipeline", str(tiny), "--out", str(out), "--source", f"census:{census_uri}",
                 "--workers", "2", "--epochs", "2"]) == 0
    assert "report:" in capsys.readouterr().out

    store = BagStore(out / STORE_DIR)
    assert store.attrs["source"].startswith("census:")
    assert store.attrs["donor_key"] == ["dataset_id", "donor_id"]
    assert store.attrs["ingest"]["primary_only"] is True
    assert store.attrs["counts"]["cells"] == store.n_cells
    assert set(store.donors["disease"]) <= {"COVID-19", "normal"}

    run = out / "runs" / "sampleclr_disease"
    assert (run / "model.pt").exists()
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 4  # 2 contrastive + 2 supervised (--epochs 2)
    assert (out / "embeddings" / "sampleclr_disease" / "donor_embeddings.parquet").exists()

    # written back into a new local experiment under OUT, keyed by Census soma_joinid;
    # the Census copy is untouched
    donors, weights = writeback.read_back(out / "census_results.soma", "sampleclr_disease")
    assert len(donors) == store.n_donors
    assert np.isin(weights.coords[0], store.source_joinid()).all()
    assert {p: p.stat().st_mtime_ns for p in Path(census_uri).rglob("*")} == census_files

    metrics = json.loads((out / "report" / "metrics.json").read_text())
    scores = metrics["methods"]["sampleclr_disease"]["mean"]
    assert {"information/disease", "batch/dataset_id", "batch/assay", "batch/sex"} <= set(
        scores)
    assert "trajectory" not in scores
    assert "disease" in (out / "report" / "report.md").read_text()


@pytest.mark.ray
def test_a_recipe_runs_into_a_bucket(soma_uri, ray_cluster, bucket, tmp_path, capsys):
    """OUT may be a URI: every stage writes there, a re-run finds every output and skips
    its stage, and the report's address is printed as a URI."""
    import fsspec

    from sampleclr_scale.pipeline import run_pipeline

    recipe = PipelineConfig.from_mapping({
        "name": "tiny", "source": soma_uri,
        "ingest": {"features": "obsm:scvi", "min_cells": 40, "meta": ["disease", "severity"],
                   "cell_columns": ["cell_type"]},
        "train": {"workers": 1, "epochs": 1, "supervised_epochs": 0, "patience": None,
                  "log_every": 1000,
                  "loader": {"batch_size": 4, "cells_per_view": 32}},
        "embed": {"cells": 32, "workers": 1},
        "evaluate": {"relevant": {"disease": "categorical"}, "technical": {},
                     "trajectory": None},
        "write_back": str(tmp_path / "results.soma"),
    })
    out = f"{bucket}/cohort"
    run_pipeline(recipe, out, in_process=True)
    printed = capsys.readouterr().out
    assert f"report: {out}/report/report.md" in printed
    fs = fsspec.filesystem("s3")
    written = {path.removeprefix(out.removeprefix("s3://") + "/").split("/")[0]
               for path in fs.find(out)}
    assert written == {"bags.zarr", "runs", "embeddings", "report"}
    store = BagStore(f"{out}/{STORE_DIR}")
    assert fs.exists(f"{out}/runs/sampleclr/model.pt")
    assert fs.exists(f"{out}/embeddings/sampleclr/donor_embeddings.parquet")
    metrics = json.loads(fs.cat(f"{out}/report/metrics.json"))
    assert metrics["n_donors"] == store.n_donors

    modified = {path: info["LastModified"] for path, info in fs.find(out, detail=True).items()
                if "/report/" not in path}
    run_pipeline(recipe, out, in_process=True)
    fs.invalidate_cache()
    again = {path: info["LastModified"] for path, info in fs.find(out, detail=True).items()
             if "/report/" not in path}
    assert again == modified  # ingest, train and embed were skipped


# ---- the paper's cohorts --------------------------------------------------------------


@pytest.fixture(scope="module")
def paper_stores(paper_census_uri, tmp_path_factory) -> Callable[[str], BagStore]:
    """The bag store each paper recipe ingests from the fake Census (once, on first use)."""
    root = tmp_path_factory.mktemp("paper_stores")

    @functools.cache
    def store(name: str) -> BagStore:
        ingest(paper_recipe(name, paper_census_uri).ingest_config(str(root / name)))
        return BagStore(root / name)

    return store


def _selected_samples(census_uri: str, config: IngestConfig) -> list[str]:
    """The samples ``config`` should select, grouped from ``cellxgene_census.get_obs``."""
    with cellxgene_census.open_soma(uri=census_uri) as census:
        obs = cellxgene_census.get_obs(census, "homo_sapiens", value_filter=config.obs_filter,
                                       column_names=config.donor_key)
    obs = obs[~obs["donor_id"].isin(config.drop_donors)]
    sizes = obs.groupby(config.donor_key, observed=True).size()
    kept = sizes[sizes >= config.min_cells].index
    return sorted(DONOR_SEPARATOR.join(map(str, key)) for key in kept)


def test_the_paper_recipes_are_there():
    assert set(PAPER_STUDIES) <= {p.stem for p in RECIPES} and len(PAPER_STUDIES) == 4


@pytest.mark.parametrize("name", PAPER_STUDIES)
def test_paper_recipe_ingests_its_study(name, paper_stores, paper_census_uri):
    recipe = paper_recipe(name, paper_census_uri)
    study, store = PAPER_STUDIES[name], paper_stores(name)
    donors = store.donors
    # the cohort the filter selects: every real donor (sample) of the study's dataset
    # with enough cells, and nothing of the other datasets
    assert sorted(donors["donor"]) == _selected_samples(paper_census_uri,
                                                        recipe.ingest_config(STORE_DIR))
    assert set(donors["dataset_id"]) == {study.dataset_id}
    assert set(donors["disease"]) <= set(study.diseases)
    assert len(donors) >= 10 and set(donors["split"]) == {"train", "validation"}
    # the donor table holds every covariate evaluated and every task's labels
    recipe.evaluate_config().check_columns(donors, name)
    tasks = {t.column for model in recipe.models for t in recipe.train_config(model).tasks}
    assert tasks <= set(donors.columns)


def test_onek1k_development_stage_ranks_are_age_ranks(paper_stores):
    store = paper_stores("census_onek1k")
    _, classes = store.labels("development_stage", "ordinal")  # the ordinal task's classes
    ages = [int(stage.removesuffix("-year-old stage")) for stage in classes]
    assert ages == sorted(ages) and len(ages) > 5
    stages = store.donors["development_stage"]
    years = stages.str.removesuffix("-year-old stage").astype(int)
    ranks = pd.Series(ordered_values(stages))  # what the trajectory and the SPARE score see
    assert ranks.rank(method="dense").equals(years.rank(method="dense"))


def test_hlca_samples_are_donors_at_one_location(paper_stores):
    donors = paper_stores("census_hlca").donors
    per_donor = donors.groupby("donor_id")
    assert per_donor["tissue"].nunique().max() == 2  # two locations, two samples
    assert per_donor["split"].nunique().max() == 1  # a donor on one side of the split
    assert donors.groupby("batch")[["assay", "suspension_type"]].nunique().max().max() == 1
    assert set(donors["tissue_general"]) == {"lung"}


@pytest.mark.ray
@pytest.mark.parametrize("name", PAPER_STUDIES)
def test_paper_recipe_runs_end_to_end(name, paper_census_uri, ray_cluster, tmp_path):
    recipe = paper_recipe(name, paper_census_uri)
    out = tmp_path / name
    metrics = run_pipeline(recipe, out, workers=1, epochs=1, in_process=True)
    (model,) = recipe.models
    donors, _ = writeback.read_back(out / recipe.write_back, model)
    assert len(donors) == BagStore(out / STORE_DIR).n_donors
    evaluation = recipe.evaluate_config()
    scores = metrics["methods"][model]["mean"]
    assert {*(f"information/{c}" for c in evaluation.relevant),
            *(f"batch/{c}" for c in evaluation.technical)} <= set(scores)
    assert ("trajectory" in scores) == (evaluation.trajectory is not None)
