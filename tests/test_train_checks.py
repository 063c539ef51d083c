"""Runs that cannot learn, or whose columns would be silently replaced, are refused."""

from __future__ import annotations

import pytest

from sampleclr_scale.config import TrainConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.ingest.stage import ingest
from sampleclr_scale.train.driver import train
from tests.conftest import ingest_config

TINY = {"preset": "small", "loader": {"batch_size": 4, "cells_per_view": 16, "seed": 1},
        "epochs": 1, "workers": 1, "seed": 1}


def test_same_batch_negatives_without_two_donors_in_any_batch_are_refused(soma_uri,
                                                                          tmp_path):
    # every donor its own technical batch: no donor ever has a negative
    store = tmp_path / "s.zarr"
    ingest(ingest_config(soma_uri, store, batch_key=["dataset_id", "donor_id"]))
    config = TrainConfig.from_mapping({**TINY, "loss": {"negatives": "same_batch"}})
    with pytest.raises(InputError, match=r"(?s)no batch of .* has two: no step would have a "
                                         r"negative.*fix: use loss.negatives: all"):
        train(str(store), str(tmp_path / "run"), config, in_process=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("option", "columns"), [
    ("meta", ["disease", "split", "n_cells"]), ("batch_key", ["batch"])])
def test_columns_named_like_the_stores_own_are_refused(soma_uri, tmp_path, option, columns):
    with pytest.raises(InputError, match=rf"(?s)--{option.replace('_', '-')} names .*which the "
                                         r"store's donor table holds itself.*fix: leave"):
        ingest(ingest_config(soma_uri, tmp_path / "s.zarr", **{option: columns}))
    assert not (tmp_path / "s.zarr").exists()
