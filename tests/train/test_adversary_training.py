"""A run with a batch adversary: the adversary's loss is trained, validation leaves it out,
and the trained model embeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sampleclr_scale.config import TrainConfig
from sampleclr_scale.model import SampleCLR
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.train.artifact import load_model
from sampleclr_scale.train.driver import train

RUN = {"preset": "small", "loader": {"batch_size": 8, "cells_per_view": 32, "seed": 1},
       "epochs": 3, "patience": None, "workers": 1, "log_every": 100, "seed": 1}


@pytest.fixture(scope="module")
def runs(batch_store, tmp_path_factory) -> dict[float, tuple]:
    """The same run without and with a batch adversary of weight 1."""
    out = {}
    for weight in (0.0, 1.0):
        run = tmp_path_factory.mktemp("adversary") / "run"
        result = train(batch_store, str(run), TrainConfig.from_mapping(
            {**RUN, "batch_adversary": weight}), in_process=True)
        out[weight] = (result, *load_model(run))
    return out


def test_the_training_loss_adds_the_adversarys_and_validation_leaves_it_out(runs,
                                                                            batch_store):
    n_batches = len(BagStore(batch_store).batch_labels)
    (plain, *_), (adversarial, *_) = runs[0.0], runs[1.0]
    first_plain, first = plain.history[0], adversarial.history[0]
    # the first epoch: both at the untrained contrastive loss, the adversary near chance
    extra = first["train_loss"] - first_plain["train_loss"]
    assert 0.5 * math.log(n_batches) < extra < 1.5 * math.log(n_batches), extra
    for metrics in adversarial.history:
        assert metrics["val_loss"] == pytest.approx(metrics["val_contrastive"])


def test_the_adversary_is_trained_and_saved_with_the_model(runs, batch_store):
    _, model, _ = runs[1.0]
    store = BagStore(batch_store)
    assert model.config.batch_adversary == len(store.batch_labels)
    torch.manual_seed(1)
    untrained = SampleCLR(model.config)
    changed = [not torch.equal(p, q) for p, q in zip(
        model.adversary_parameters(), untrained.adversary_parameters(), strict=True)]
    assert all(changed)
    cells = torch.from_numpy(store.donor_rows(0).astype(np.float32))[None]
    out = model.eval()(cells, torch.ones(cells.shape[:2], dtype=torch.bool))
    assert out.batch_logits.shape == (1, len(store.batch_labels))
    assert runs[0.0][1].adversary is None
