"""`train` builds the prior its loss names into a store that has none.

The default loss is X-CLR with the GloScope prior, so ``ingest`` then ``train`` works
without the prior stage; a store with a prior keeps it, and one where it cannot be built
gets an error that says how to build it apart or to train without one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sampleclr_scale.config import TrainConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.ingest.stage import ingest
from sampleclr_scale.prior.build import build_prior
from sampleclr_scale.prior.config import PriorConfig
from sampleclr_scale.prior.storage import available_priors, load_prior, save_prior
from sampleclr_scale.simulate import cohorts as synthetic
from sampleclr_scale.train.driver import train
from tests.conftest import ingest_config

ONE_EPOCH = {"preset": "small", "workers": 1, "epochs": 1, "log_every": 100,
             "loader": {"batch_size": 8, "cells_per_view": 16}}


def _bare_copy(store_path: str, tmp_path) -> str:
    """The store without any prior (the shared one may have one from another test)."""
    copy = tmp_path / "bags.zarr"
    shutil.copytree(store_path, copy, ignore=shutil.ignore_patterns("priors"))
    return str(copy)


@pytest.mark.ray
def test_train_builds_the_default_prior_and_keeps_one_that_is_there(store_path, ray_cluster,
                                                                    tmp_path):
    store = _bare_copy(store_path, tmp_path)
    assert available_priors(store) == []
    train(store, str(tmp_path / "run"), TrainConfig.from_mapping(ONE_EPOCH), in_process=True)
    assert available_priors(store) == ["gloscope"]
    assert load_prior(store, "gloscope").params["k"] == PriorConfig(kind="gloscope").k

    # a prior built with other settings is the one the next run uses, unchanged
    save_prior(store, build_prior(store, PriorConfig(kind="gloscope", k=10, n_pcs=5)))
    train(store, str(tmp_path / "again"), TrainConfig.from_mapping(ONE_EPOCH),
          in_process=True)
    assert load_prior(store, "gloscope").params["k"] == 10

    # a run refused for its settings builds nothing; nor does a run without a prior
    other = _bare_copy(store_path, tmp_path / "other")
    with pytest.raises(InputError, match="in-process run has one worker"):
        train(other, str(tmp_path / "two"),
              TrainConfig.from_mapping({**ONE_EPOCH, "workers": 2}), in_process=True)
    assert available_priors(other) == []
    train(other, str(tmp_path / "plain"),
          TrainConfig.from_mapping({**ONE_EPOCH, "loss": {"prior": None}}), in_process=True)
    assert available_priors(other) == []


@pytest.mark.ray
def test_a_prior_that_cannot_be_built_is_a_clear_error(ray_cluster, tmp_path):
    # donors of 12-20 cells: GloScope's default k = 25 needs more
    spec = synthetic.CohortSpec(n_donors=16, min_cells=12, max_cells=20, n_genes=30, seed=3)
    soma = tmp_path / "small.soma"
    synthetic.write_soma(spec, soma)
    store = tmp_path / "bags.zarr"
    ingest(ingest_config(str(soma), store, min_cells=10))
    with pytest.raises(InputError, match=r"loss\.prior gloscope") as err:
        train(str(store), str(tmp_path / "run"), TrainConfig.from_mapping(ONE_EPOCH),
              in_process=True)
    assert "k = 25" in err.value.problem and "loss.prior: null" in err.value.fix
    assert not (tmp_path / "run" / "model.pt").exists()
    assert available_priors(str(store)) == []


def test_a_store_that_cannot_be_written_is_refused_before_a_prior_is_built(
        store_path, tmp_path, locked):
    bare = Path(_bare_copy(store_path, tmp_path))
    store = locked.read_only(bare)
    built = locked.run("prior", "--store", str(store), "--kind", "gloscope")
    assert built.returncode == 2, built.stderr
    assert f"error: Permission denied: {store}\n" in built.stderr
    assert "fix: check that you may" in built.stderr and "Traceback" not in built.stderr
    assert "Ray instance" not in built.stderr  # refused before the build, which starts Ray

    run = tmp_path / "run"
    trained = locked.run("train", "--store", str(store), "--out", str(run),
                             "--workers", "1")
    assert trained.returncode == 2, trained.stderr
    assert (f"error: loss.prior gloscope: the store has no gloscope prior and it could not "
            f"be written there: Permission denied: {store}\n") in trained.stderr
    assert "sampleclr-scale prior --store" in trained.stderr
    assert "loss.prior: null" in trained.stderr and "Traceback" not in trained.stderr
    # nothing was written: no run, and the store as it was
    assert not run.exists()
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == sorted(
        p.relative_to(bare) for p in bare.rglob("*"))
