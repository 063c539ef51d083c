"""The training loop's device paths, on CPU: device-resident bags train exactly as streamed
ones, bf16 autocast, torch.compile, and the choices the defaults make (tests/test_gpu.py
runs them on CUDA)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from sampleclr_scale.config import TrainConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.train import setup
from sampleclr_scale.train.artifact import load_model
from sampleclr_scale.train.driver import train

RUN = {
    "preset": "small",
    "loader": {"batch_size": 4, "cells_per_view": 24, "min_cells_per_view": 12, "seed": 3},
    "epochs": 2,
    "supervised_epochs": 1,
    "supervised_min_steps": 0,
    "freeze_epochs": 0,
    "tasks": [{"column": "severity", "kind": "ordinal"}],
    "standardize": "batch",
    "patience": None,
    "workers": 1,
    "log_every": 100,
    "seed": 2,
}
LOSSES = ("train_loss", "val_loss", "val_contrastive", "val_severity_accuracy")


def run_in_process(store: str, out, **changes) -> tuple[list[dict], dict]:
    """Train ``RUN`` with ``changes`` in this process; its history and final weights."""
    values = {**RUN, **changes}
    if "loader" in changes:
        values["loader"] = {**RUN["loader"], **changes["loader"]}
    result = train(store, str(out), TrainConfig.from_mapping(values), in_process=True)
    return result.history, load_model(result.run_dir)[0].state_dict()


@pytest.fixture(scope="module")
def streamed(batch_store, tmp_path_factory) -> tuple[list[dict], dict]:
    """The run with streamed bags (what ``resident: auto`` does on CPU)."""
    return run_in_process(batch_store, tmp_path_factory.mktemp("runs") / "streamed")


def test_resident_bags_train_to_the_same_weights(batch_store, streamed, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sampleclr_scale.loading.resident")
    history, weights = run_in_process(batch_store, tmp_path / "resident",
                                      loader={"resident": "always"})
    assert "resident on cpu" in caplog.text  # the features were loaded, not streamed
    assert len(history) == len(streamed[0]) == 3
    for ours, theirs in zip(history, streamed[0], strict=True):
        assert {k: ours.get(k) for k in LOSSES} == {k: theirs.get(k) for k in LOSSES}
    for name, value in streamed[1].items():
        assert torch.equal(weights[name], value), name


def test_bf16_autocast_trains_the_float32_model(batch_store, streamed, tmp_path):
    history, weights = run_in_process(batch_store, tmp_path / "bf16", precision="bf16")
    assert all(math.isfinite(h[k]) for h in history for k in ("train_loss", "val_loss"))
    assert history[0]["train_loss"] != streamed[0][0]["train_loss"]  # bf16 arithmetic
    assert all(w.dtype == streamed[1][name].dtype for name, w in weights.items())


@pytest.mark.slow  # inductor compiles for minutes on 2 CPU cores; tests/test_gpu.py on CUDA
def test_compiled_model_trains_as_the_eager_one(batch_store, streamed, tmp_path):
    history, _ = run_in_process(batch_store, tmp_path / "compiled", compile=True,
                                epochs=1, supervised_epochs=0)
    assert history[0]["train_loss"] == pytest.approx(streamed[0][0]["train_loss"], rel=1e-4)


def test_precision_auto_is_bf16_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    config = TrainConfig()
    assert setup.autocast_dtype(config, cpu) is None
    assert setup.autocast_dtype(config, cuda) is torch.bfloat16
    assert setup.autocast_dtype(TrainConfig(precision="fp32"), cuda) is None
    assert setup.autocast_dtype(TrainConfig(precision="bf16"), cpu) is torch.bfloat16
    assert config.loader.resident == "auto" and not config.compile


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_use_gpu_without_a_gpu_is_refused_in_process(batch_store, tmp_path):
    with pytest.raises(InputError, match="sees no CUDA GPU"):
        run_in_process(batch_store, tmp_path / "gpu", use_gpu=True)
    assert not (tmp_path / "gpu").exists()
