"""Recipes: every YAML in pipelines/ validates, and the Census PBMC recipe runs end to end
offline against a Census-shaped local copy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from sampleclr_scale.cli import main
from sampleclr_scale.config import IngestConfig, TrainConfig, read_yaml
from sampleclr_scale.data.store import BagStore
from sampleclr_scale.embed import writeback
from sampleclr_scale.embed.config import EmbedConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.evaluate import EvaluateConfig
from sampleclr_scale.pipeline import STORE_DIR, PipelineConfig, _merge

RECIPES = sorted((Path(__file__).parents[1] / "pipelines").glob("*.yaml"))
PBMC = Path(__file__).parents[1] / "pipelines" / "census_pbmc_covid.yaml"


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


def test_model_settings_merge_over_shared_ones():
    assert _merge({"loss": {"tau": 0.1, "prior": "gloscope"}, "epochs": 3},
                  {"loss": {"tau": 0.2}}) == {"loss": {"tau": 0.2, "prior": "gloscope"},
                                               "epochs": 3}


@pytest.mark.ray
def test_census_recipe_offline_end_to_end(census_uri, ray_cluster, tmp_path, capsys):
    # the real recipe, shrunk to the 24-donor test cohort (60-400 cells per donor)
    values = read_yaml(PBMC)
    values["ingest"]["min_cells"] = 40
    values["train"] = _merge(values["train"], {"loader": {"cells_per_view": 32},
                                               "freeze_epochs": 1, "log_every": 1000})
    values["embed"] = {**values["embed"], "cells": 32}
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
