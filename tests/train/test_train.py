"""Training with a real local Ray cluster: 2 gloo workers, checkpoints, fault recovery."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sampleclr_scale.config import LoaderConfig, TrainConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.ingest.stage import ingest
from sampleclr_scale.loading.loader import DonorBagDataset, make_loader
from sampleclr_scale.model import flatten_views, split_views
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.train.artifact import MODEL_FILE, load_model
from sampleclr_scale.train.checkpoint import STATE_FILE, Position, TrainState, cpu_copy
from sampleclr_scale.train.driver import METRICS_FILE, STORE_FILE, train
from sampleclr_scale.train.schedule import unfrozen_ramp, warmup_cosine
from sampleclr_scale.train.worker import FAULT_MARKER
from tests.conftest import ingest_config

RUN = {
    "preset": "small",
    # the paper's aggregator: on this tiny cohort donors are told apart mostly by their own
    # offsets, which the default (centred bags) ignores by design
    "model": {"pooling": "cells", "center": False},
    "loader": {"batch_size": 4, "cells_per_view": 32, "seed": 1},
    # donor identity, which the checks below ask for: InfoNCE (a prior's soft targets
    # would pull a donor's views toward its neighbours')
    "loss": {"prior": None},
    "epochs": 6,
    "supervised_epochs": 2,
    "supervised_min_steps": 0,
    "freeze_epochs": 1,
    "tasks": [{"column": "severity", "kind": "ordinal"}],
    "optim": {"lr": 3e-3, "warmup_epochs": 1},
    "patience": None,
    "workers": 2,
    "log_every": 100,
    "seed": 4,
}


@pytest.fixture(scope="module")
def reference_run(store_path, ray_cluster, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "reference"
    return train(store_path, str(run), TrainConfig.from_mapping(RUN))


@pytest.mark.ray
def test_two_workers_learn_donor_identity(reference_run, store_path):
    history = reference_run.history
    stage1 = [h for h in history if h["stage"] == 1]
    assert len(stage1) == RUN["epochs"] and len(history) == RUN["epochs"] + 2
    assert stage1[-1]["train_loss"] < 0.8 * stage1[0]["train_loss"]
    assert [json.loads(line) for line in
            (reference_run.run_dir / METRICS_FILE).read_text().splitlines()] == history
    assert "val_severity_accuracy" in history[-1] and "val_severity_accuracy" not in stage1[0]

    # two different subsamples of a donor embed closer to each other than to other donors
    model, artifact = load_model(reference_run.run_dir)
    assert artifact["tasks"][0].classes == tuple(sorted(BagStore(store_path).donors
                                                       ["severity"].unique()))
    dataset = DonorBagDataset(store_path, LoaderConfig(batch_size=16, cells_per_view=32,
                                                       seed=99), rank=0, world_size=1)
    batch = next(iter(make_loader(dataset)))
    with torch.no_grad():
        out_a, out_b = split_views(model(*flatten_views(batch.cells, batch.mask),
                                         with_heads=False))
    z_a = torch.nn.functional.normalize(out_a.z, dim=1)
    z_b = torch.nn.functional.normalize(out_b.z, dim=1)
    similarity = z_a @ z_b.T
    own = similarity.diagonal()
    off = ~torch.eye(len(own), dtype=torch.bool)
    mean_other = (similarity * off).sum(dim=1) / off.sum(dim=1)
    nearest_other = similarity.masked_fill(~off, -2).max(dim=1).values
    assert (own > mean_other).float().mean() >= 0.9
    # top-1 retrieval: chance is 1/16; 4x chance (the balanced sampler's faster draws,
    # a different random stream, gave 6/16 where the old stream gave 8/16)
    assert (own > nearest_other).float().mean() >= 0.25


@pytest.mark.ray
def test_one_process_on_the_global_batch_trains_as_two_workers(reference_run, store_path,
                                                               tmp_path):
    # The same loop in this process (no Ray) with one worker's batch = the global batch:
    # the same donors per step, the same views, the same loss and gradients (DDP), so the
    # same training losses in every epoch of both stages, up to float rounding. (The
    # validation batches are cut per worker, so validation losses differ.)
    single = {**RUN, "workers": 1, "loader": {**RUN["loader"], "batch_size": 8}}
    result = train(store_path, str(tmp_path / "single"), TrainConfig.from_mapping(single),
                   in_process=True)
    assert len(result.history) == len(reference_run.history)
    for local, ray_run in zip(result.history, reference_run.history, strict=True):
        for key in ("stage", "epoch", "global_step"):
            assert local[key] == ray_run[key]
        for key in ("train_loss", "lr"):
            assert local[key] == pytest.approx(ray_run[key], rel=1e-4, abs=1e-7), key
    _, artifact = load_model(result.run_dir)
    _, ray_artifact = load_model(reference_run.run_dir)
    assert artifact["balance"] == ray_artifact["balance"] == "cell_type"  # loader: auto
    assert artifact["standardize"] is ray_artifact["standardize"] is None  # no batch key
    with pytest.raises(InputError, match="in-process run has one worker"):
        train(store_path, str(tmp_path / "two"), TrainConfig.from_mapping(RUN),
              in_process=True)


@pytest.mark.ray
def test_failed_worker_resumes_to_identical_weights(reference_run, store_path, tmp_path):
    run = tmp_path / "faulty"
    storage = tmp_path / "checkpoints"  # checkpoints go through a URI (pyarrow file system)
    config = TrainConfig.from_mapping({**RUN, "fail_at_step": 7, "checkpoint_every": 1,
                                       "storage_path": storage.as_uri()})
    result = train(store_path, str(run), config)
    assert (run / FAULT_MARKER).exists()  # the failure really happened
    assert list((storage / "faulty").glob("checkpoint_*"))
    reference, _ = load_model(reference_run.run_dir)
    recovered, _ = load_model(result.run_dir)
    for (name, a), (_, b) in zip(reference.state_dict().items(),
                                 recovered.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for ours, theirs in zip(result.history, reference_run.history, strict=True):
        assert ours["val_loss"] == theirs["val_loss"]


@pytest.mark.ray
def test_existing_run_needs_resume(reference_run, store_path):
    config = TrainConfig.from_mapping(RUN)
    with pytest.raises(InputError, match=r"(?s)already exists.*--resume"):
        train(store_path, str(reference_run.run_dir), config)
    changed = TrainConfig.from_mapping({**RUN, "epochs": 7})
    with pytest.raises(InputError, match=r"other settings: \['epochs'\]"):
        train(store_path, str(reference_run.run_dir), changed, resume=True)
    again = train(store_path, str(reference_run.run_dir), config, resume=True)  # finished
    assert again.history == reference_run.history


def test_a_run_resumes_only_on_its_own_store(store_path, soma_uri, tmp_path):
    # issue #11: --resume on another store mixed the two stores' data with status 0
    config = TrainConfig.from_mapping({**RUN, "workers": 1, "epochs": 1, "supervised_epochs": 0})
    run = str(tmp_path / "run")
    train(store_path, run, config, in_process=True)
    other = str(tmp_path / "other.zarr")  # the same cohort, ingested with another seed
    ingest(ingest_config(soma_uri, other, seed=11))
    with pytest.raises(InputError, match=rf"(?s)started on the store {store_path} .*not on "
                                         rf"{other} .*mix their data.*--store {store_path}"):
        train(other, run, config, resume=True, in_process=True)

    copy = tmp_path / "copy.zarr"  # a copy has the same fingerprint: it may resume there
    shutil.copytree(store_path, copy)
    assert BagStore(copy).fingerprint == BagStore(store_path).fingerprint
    assert len(train(str(copy), run, config, resume=True, in_process=True).history) == 1

    (tmp_path / "run" / STORE_FILE).unlink()  # a run started before runs recorded stores
    with pytest.raises(InputError, match="does not record the store"):
        train(store_path, run, config, resume=True, in_process=True)


def test_store_without_the_label_column(store_path, tmp_path):
    config = TrainConfig.from_mapping({**RUN, "tasks": [{"column": "bmi", "kind": "regression"}]})
    with pytest.raises(InputError, match="no donor column 'bmi'"):
        train(store_path, str(tmp_path / "r"), config)
    assert not (tmp_path / "r").exists()


def test_unknown_prior_and_unknown_keys():
    with pytest.raises(InputError, match=r"loss\.prior"):
        TrainConfig.from_mapping({"loss": {"prior": "euclid"}})
    with pytest.raises(InputError, match=r"epoch.*Extra inputs"):
        TrainConfig.from_mapping({"epoch": 3})
    with pytest.raises(InputError, match=r"loader\.batchsize"):
        TrainConfig.from_mapping({"loader": {"batchsize": 3}})


@pytest.mark.parametrize(("setting", "key"), [
    ({"loader": {"balance_strength": 1.5}}, r"loader\.balance_strength"),
    ({"loader": {"balance_strength": -0.1}}, r"loader\.balance_strength"),
    ({"optim": {"head_lr_scale": 0}}, r"optim\.head_lr_scale"),
    ({"batch_adversary": -1.0}, r"batch_adversary")])
def test_out_of_range_view_balance_head_rate_and_adversary_are_refused(setting, key):
    with pytest.raises(InputError, match=key):
        TrainConfig.from_mapping(setting)


@pytest.mark.parametrize(("workers", "batch_size"), [(1, 1), (1, 2), (2, 1)])
def test_a_global_batch_of_one_donor_is_refused(workers, batch_size):
    # one donor per step has no negatives: the loss is 0 and the run "succeeded"
    values = {"workers": workers, "loader": {"batch_size": batch_size}}
    if workers * batch_size >= 2:
        assert TrainConfig.from_mapping(values).global_batch == 2
        return
    with pytest.raises(InputError, match=r"global batch of 1 donor \(workers 1 x "
                       r"loader\.batch_size 1\).*workers x loader\.batch_size is at least 2"):
        TrainConfig.from_mapping(values)


def test_more_workers_than_donors_can_feed(store_path, tmp_path):
    config = TrainConfig.from_mapping({**RUN, "workers": 8})
    with pytest.raises(InputError, match="8 workers x 4 donors per batch need 32 training"):
        train(store_path, str(tmp_path / "r"), config)


@pytest.mark.parametrize(("workers", "per_worker"), [(1, 32), (2, 16), (3, 10), (4, 8),
                                                     (64, 1)])
def test_an_unset_batch_is_32_donors_a_step_whatever_the_workers(workers, per_worker):
    config = TrainConfig.from_mapping({"workers": workers})
    assert config.loader.batch_size is None
    assert config.worker_batch == per_worker and config.global_batch == workers * per_worker
    assert config.learning_rate == pytest.approx(1e-3 * np.sqrt(config.global_batch / 32))
    # the run's saved config resolves the same way on resume
    again = TrainConfig.model_validate_json(config.model_dump_json())
    assert again.loader.batch_size is None and again.worker_batch == per_worker
    # a set batch is per worker, as before
    assert TrainConfig.from_mapping({"workers": workers, "loader": {"batch_size": 32}}
                                    ).global_batch == 32 * workers


def test_learning_rate_scales_with_the_global_batch():
    base = {"optim": {"lr": 1e-3, "reference_batch": 32}}
    sqrt = TrainConfig.from_mapping({**base, "workers": 4, "loader": {"batch_size": 32}})
    assert sqrt.global_batch == 128 and np.isclose(sqrt.learning_rate, 2e-3)
    linear = TrainConfig.from_mapping({"optim": {"lr": 1e-3, "lr_scaling": "linear"},
                                       "workers": 4, "loader": {"batch_size": 32}})
    assert np.isclose(linear.learning_rate, 4e-3)


def test_warmup_cosine_schedule():
    values = [warmup_cosine(s, 4, 12) for s in range(12)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0 and all(a > b for a, b in itertools.pairwise(values[4:]))
    assert np.isclose(warmup_cosine(12, 4, 12), 0.0)


@pytest.mark.parametrize(("unfreeze", "warmup", "expected"), [
    (0, 4, [1.0] * 8),                                     # no freezing: the stage's own warm-up
    (3, 4, [0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]),   # frozen 3 steps, then warms up again
    (3, 0, [1.0] * 8),                                     # no warm-up asked
])
def test_an_unfrozen_backbone_warms_up_again(unfreeze, warmup, expected):
    assert [unfrozen_ramp(s, unfreeze, warmup) for s in range(8)] == expected


def _local_worker_env() -> str | None:
    import os

    import ray

    from sampleclr_scale.cluster import ensure_ray

    ensure_ray()
    try:
        return ray.get(ray.remote(lambda: os.environ.get("MALLOC_ARENA_MAX")).remote())
    finally:
        ray.shutdown()


def test_a_local_ray_gives_its_processes_two_malloc_arenas(monkeypatch):
    """With glibc's default a worker's memory grows with the epochs (see cluster.py)."""
    from sampleclr_scale.bench import run_in_child

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert run_in_child(_local_worker_env) == "2"


@pytest.mark.parametrize("setting", [{"standardize": "batch"},
                                     {"loss": {"negatives": "same_batch"}}])
def test_batch_aware_settings_need_a_batch_keyed_store(store_path, tmp_path, setting):
    config = TrainConfig.from_mapping({**RUN, **setting})
    with pytest.raises(InputError, match="need the donors' technical batches"):
        train(store_path, str(tmp_path / "run"), config)
    assert not (tmp_path / "run").exists()  # refused before anything is written


# --- files that are loaded ---------------------------------------------------------------


class _RunsCode:
    """Unpickling it writes ``marker``: what a crafted model or checkpoint file can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "code ran")


@pytest.mark.parametrize(("file", "load", "what"), [
    (MODEL_FILE, load_model, "trained model"),
    (STATE_FILE, TrainState.load, "training checkpoint"),
])
def test_a_crafted_model_or_checkpoint_is_refused_without_running_code(file, load, what,
                                                                       tmp_path):
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model_config": _RunsCode(marker), "position": {}}, run / file)
    with pytest.raises(InputError, match=rf"(?s)run/{file} is not a {what} written by "
                       r"sampleclr-scale.*fix: train"):
        load(run)
    assert not marker.exists()


def test_a_checkpoint_round_trips_as_plain_data(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    state = TrainState(model=model.state_dict(), optimizer=optimizer.state_dict(),
                       scheduler=scheduler.state_dict(), position=Position(2, 5, 1, 3, 40),
                       best_loss=0.25, best_model=cpu_copy(model.state_dict()), bad_epochs=1,
                       history=[{"epoch": np.int64(4), "train_loss": np.float32(0.5)}])
    state.save(tmp_path)
    loaded = TrainState.load(tmp_path)  # weights_only: tensors and plain data only
    assert loaded.position == state.position and loaded.best_loss == 0.25
    assert loaded.history == [{"epoch": 4, "train_loss": 0.5}]
    assert type(loaded.history[0]["epoch"]) is int
    for weights in (loaded.model, loaded.best_model):
        assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    resumed = torch.optim.AdamW(model.parameters(), lr=1e-3)
    resumed.load_state_dict(loaded.optimizer)
    torch.optim.lr_scheduler.LambdaLR(resumed, lambda step: 0.5).load_state_dict(
        loaded.scheduler)
    assert resumed.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert all(torch.equal(resumed.state[p]["exp_avg"], optimizer.state[p]["exp_avg"])
               for p in model.parameters())
