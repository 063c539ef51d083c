"""The quality benchmark's recipe and table (the runs themselves: `bench quality`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sampleclr_scale.bench.quality import (
    VARIANTS,
    cohort_margins,
    cohort_name,
    margins_table,
    quality_recipe,
    quality_table,
)
from sampleclr_scale.cli import build_parser


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


def _draw(totals: dict[str, tuple[float | None, float | None]],
          std: float | None = None, seeds: int = 1) -> dict:
    """A draw's figures: per method (baselines named like ``base_*``), total on all and
    held-out donors; the learned methods' std over ``seeds`` seeds."""
    def scores(value):
        return None if value is None else {"total": value, "information/severity": value}

    def entry(name, value):
        learned = not (name.startswith("base") or name == "random")
        spread = scores(std) if learned and value is not None else None
        return {"mean": scores(value), "std": spread}

    return {"methods": {
        name: {"kind": "baseline" if name.startswith("base") or name == "random"
               else "sampleclr", "n_runs": seeds if not name.startswith("base") else 1,
               "all": entry(name, a), "held_out": entry(name, h)}
        for name, (a, h) in totals.items()}}


def test_cohort_margins_against_the_best_baseline_of_each_draw():
    draws = [
        _draw({"default": (0.80, 0.70), "base_a": (0.75, 0.72), "base_b": (0.60, 0.50),
               "random": (0.99, 0.99)}),
        _draw({"default": (0.70, 0.90), "base_a": (0.72, 0.80), "base_b": (0.74, 0.85),
               "random": (0.99, 0.99)}),
    ]
    margins = cohort_margins(draws)
    assert list(margins) == ["default"]  # baselines and random vectors are not scored
    expected = {"all": ([0.05, -0.04], 0.005, -0.04),
                "held_out": ([-0.02, 0.05], 0.015, -0.02)}
    for where, (per, mean, worst) in expected.items():
        got = margins["default"][where]
        assert got["per_cohort"] == pytest.approx(per)
        assert (got["mean"], got["worst"]) == (pytest.approx(mean), pytest.approx(worst))


def test_cohort_margins_against_the_one_baseline_best_over_the_draws():
    # over the draws base_a is the best baseline on all donors (0.735 against 0.67) and
    # base_b on held-out donors (0.70 against 0.69), though neither is best in every draw
    draws = [
        _draw({"default": (0.80, 0.70), "base_a": (0.75, 0.58), "base_b": (0.60, 0.55),
               "random": (0.99, 0.99)}, std=0.03, seeds=5),
        _draw({"default": (0.70, 0.90), "base_a": (0.72, 0.80), "base_b": (0.74, 0.85),
               "random": (0.99, 0.99)}, std=0.04, seeds=5),
    ]
    margins = cohort_margins(draws)["default"]
    table = {"all": ("base_a", 0.75 - 0.735), "held_out": ("base_b", 0.80 - 0.70)}
    se = ((0.03 ** 2 / 5 + 0.04 ** 2 / 5) ** 0.5) / 2
    for where, (best, against) in table.items():
        got = margins[where]
        assert got["best_baseline"] == best
        assert got["against_best"] == pytest.approx(against)
        assert got["se"] == pytest.approx(se)
    # the per-draw reading picks each draw's own best: a stricter bar
    assert margins["all"]["mean"] == pytest.approx((0.05 - 0.04) / 2)
    severity = cohort_margins(draws, "information/severity")["default"]
    assert severity["all"]["against_best"] == pytest.approx(0.75 - 0.735)
    line = margins_table({"s": cohort_margins(draws)}).splitlines()[2]
    assert "| +0.015 ± 0.011 (base_a) |" in line and line.endswith("(base_b) |")


def test_a_draw_without_held_out_scores_leaves_the_summary_unknown():
    draws = [_draw({"default": (0.8, 0.7), "base_a": (0.7, 0.6)}),
             _draw({"default": (0.8, None), "base_a": (0.7, 0.6)})]
    held_out = cohort_margins(draws)["default"]["held_out"]
    assert held_out["per_cohort"] == [pytest.approx(0.1), None]
    assert held_out["mean"] is None and held_out["worst"] is None
    assert held_out["against_best"] is None and held_out["se"] is None
    assert margins_table({"shape": cohort_margins(draws)}).splitlines()[2] == (
        "| shape | default | +0.100 +0.100 | +0.100 | +0.100 | +0.100 (base_a) "
        "| +0.100 - | - | - | - |")


def test_cohort_names_keep_the_first_draw_under_the_scenario():
    assert [cohort_name("shape", c) for c in (0, 2)] == ["shape", "shape_cohort2"]


def test_the_command_draws_one_cohort_unless_told_more():
    parse = build_parser().parse_args
    assert parse(["bench", "quality", "--json", "q.json"]).cohorts == [0]
    assert parse(["bench", "quality", "--cohorts", "0", "1", "2", "--json", "q.json"]
                 ).cohorts == [0, 1, 2]
