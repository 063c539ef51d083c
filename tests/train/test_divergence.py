"""NaN is never published: a diverged training stops with its last good state and writes
no model, embed refuses non-finite weights and vectors, evaluate refuses NaN vectors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sampleclr_scale.config import TrainConfig
from sampleclr_scale.embed.config import EmbedConfig
from sampleclr_scale.embed.embedder import _check_finite, embed
from sampleclr_scale.errors import InputError
from sampleclr_scale.evaluate.config import EvaluateConfig
from sampleclr_scale.evaluate.run import evaluate
from sampleclr_scale.model import ModelConfig, SampleCLR
from sampleclr_scale.storage import Location
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.train.artifact import MODEL_FILE, save_model
from sampleclr_scale.train.driver import train
from sampleclr_scale.train.session import LocalSession
from sampleclr_scale.train.worker import DIVERGED_FILE, Worker
from tests.evaluate.test_evaluate import _write_embedding

TINY = {"preset": "small", "loader": {"batch_size": 4, "cells_per_view": 16, "seed": 1},
        "epochs": 2, "workers": 1, "log_every": 100, "seed": 1,
        "optim": {"warmup_epochs": 0}}
EXPLODING = {**TINY, "optim": {"lr": 1e30, "warmup_epochs": 0}}  # weights overflow


def test_a_non_finite_learning_rate_is_refused():
    for lr in (math.inf, math.nan):
        with pytest.raises(InputError, match="lr"):
            TrainConfig.from_mapping({**TINY, "optim": {"lr": lr}})


def test_a_diverged_run_writes_no_model(store_path, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(InputError, match=r"(?s)training diverged in stage 1, epoch 0 .*nan.*"
                                         r"No model was written.*fix: train into a new "
                                         r"--out with a lower optim.lr"):
        train(store_path, str(run), TrainConfig.from_mapping(EXPLODING), in_process=True)
    assert not (run / MODEL_FILE).exists()


@pytest.mark.ray
def test_a_diverged_ray_run_writes_no_model(store_path, ray_cluster, tmp_path):
    run = tmp_path / "run"
    config = TrainConfig.from_mapping({**EXPLODING, "workers": 2, "epochs": 1})
    with pytest.raises(InputError, match=r"training diverged in stage 1, epoch 0"):
        train(store_path, str(run), config)
    assert not (run / MODEL_FILE).exists()


def test_the_worker_stops_at_non_finite_weights_keeping_the_last_good_state(store_path,
                                                                            tmp_path):
    session = LocalSession()
    worker = Worker(TrainConfig.from_mapping(TINY), store_path, Location(tmp_path), session)
    worker._end_epoch({**worker._train_epoch(), **worker._validate()})  # one good epoch
    good = {k: v.clone() for k, v in session.latest.best_model.items()}
    with torch.no_grad():
        next(worker.model.parameters()).fill_(math.nan)  # what an exploding step leaves
    worker.fit()  # returns: the run stopped
    record = json.loads((tmp_path / DIVERGED_FILE).read_text())
    assert record["epoch"] == 1 and "train_loss = nan" in record["reason"]
    assert len(session.latest.history) == 1  # nothing reported after the good epoch
    for name, value in session.latest.best_model.items():  # what the driver would publish
        assert torch.equal(value, good[name]) and bool(torch.isfinite(value).all()), name


def test_embed_refuses_a_model_with_nan_weights(store_path, tmp_path):
    config = ModelConfig.preset("small", input_dim=BagStore(store_path).dim)
    weights = SampleCLR(config).state_dict()
    next(iter(weights.values())).fill_(math.nan)
    run = tmp_path / "run"
    run.mkdir()
    save_model(run, model_config=config, state_dict=weights, tasks=[], train_config={},
               store=store_path, history=[])
    with pytest.raises(InputError, match=r"(?s)has NaN or infinite weights.*diverged"):
        embed(store_path, run, tmp_path / "emb", EmbedConfig(), write_back=False)
    assert not (tmp_path / "emb").exists()


def test_embed_never_publishes_a_non_finite_vector(store_path):
    store = BagStore(store_path)
    z = np.ones((store.n_donors, 4), np.float32)
    _check_finite(store, z, {"severity": np.ones((store.n_donors, 2))}, "run")  # fine
    z[2, 1] = np.inf
    with pytest.raises(InputError, match=r"gives 1 donors a NaN or infinite embedding"):
        _check_finite(store, z, {}, "run")
    z[2, 1] = 0
    with pytest.raises(InputError, match="NaN or infinite"):
        _check_finite(store, z, {"severity": np.full((store.n_donors, 2), np.nan)}, "run")


def test_evaluate_refuses_nan_vectors(store_path, tmp_path):
    store = BagStore(store_path)
    Z = np.full((store.n_donors, 4), np.nan)
    emb = _write_embedding(tmp_path / "emb", store, Z, seed=0)
    with pytest.raises(InputError, match=r"(?s)column z of .* holds NaN or infinite"):
        evaluate([str(emb)], store_path, str(tmp_path / "report"), EvaluateConfig())
    assert not (tmp_path / "report").exists()
