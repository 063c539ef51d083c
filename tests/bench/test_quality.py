"""The quality benchmark's recipe and table (the runs themselves: `bench quality`)."""

from __future__ import annotations

from pathlib import Path

from sampleclr_scale.bench.quality import VARIANTS, quality_recipe, quality_table


def test_every_variant_is_a_valid_training_config_of_one_change():
    recipe = quality_recipe(Path("/nowhere/cohort.soma"), VARIANTS, [0, 1], epochs=4,
                            workers=2)
    assert set(recipe.models) == {f"{v}_seed{s}" for v in VARIANTS for s in (0, 1)}
    default = recipe.train_config("default_seed0")
    paper = recipe.train_config("paper_seed1")
    assert (default.model.get("pooling"), paper.model["pooling"]) == (None, "cells")
    assert paper.loader.balance is None and default.loader.balance == "auto"
    assert default.standardize == "auto" and default.composition_channel == "auto"
    assert recipe.train_config("channel175_seed0").composition_channel == 1.75
    before = recipe.train_config("balanced_seed0")
    assert (before.standardize, before.composition_channel) == ("none", 0.0)
    assert recipe.train_config("standardized_seed0").standardize == "batch"
    typed = recipe.train_config("type_standardized_seed0")
    assert (typed.standardize, typed.composition_channel) == ("batch_cell_type", 0.0)
    assert paper.composition_channel == 0.0
    assert paper.seed == paper.loader.seed == 1 and default.workers == 1
    supervised = recipe.train_config("supervised_seed0")
    assert [t.column for t in supervised.tasks] == ["severity"]
    assert supervised.supervised_epochs == 2 and default.supervised_epochs == 0
    assert recipe.train_config("same_batch_seed0").loss.negatives == "same_batch"
    assert (default.loss.prior, default.loss.tau) == ("gloscope", 0.5)
    prior05 = recipe.train_config("prior05_seed0")
    assert (prior05.loss.prior, prior05.learned_block, prior05.composition_channel) == (
        "gloscope", "unit", 1.5)
    for name in ("infonce", "tau10", "balanced", "same_batch", "paper"):
        assert recipe.train_config(f"{name}_seed1").loss.prior is None, name
    assert recipe.train_config("tau10_seed1").loss.tau == 1.0
    assert recipe.ingest_config("bags.zarr").batch_key == ["dataset_id"]


def test_table_shows_mean_and_std_over_seeds():
    scores = {"information/severity": 0.5, "information": 0.25, "batch": 0.75,
              "trajectory": 0.125, "total": 0.4}
    scenario = {"methods": {
        "default": {"all": {"mean": scores, "std": dict.fromkeys(scores, 0.01)},
                    "held_out": {"mean": scores, "std": None}},
        "pseudobulk": {"all": {"mean": scores, "std": None},
                       "held_out": {"mean": None, "std": None}},
    }}
    lines = quality_table(scenario).splitlines()
    assert lines[0].startswith("| method | severity |") and len(lines) == 4
    assert lines[2] == ("| default | 0.50 ± 0.01 | 0.25 ± 0.01 | 0.75 ± 0.01 | - | 0.12 ± 0.01 "
                        "| 0.40 ± 0.01 | 0.50 | - | 0.40 |")
    assert lines[3].endswith("| 0.40 | - | - | - |")
