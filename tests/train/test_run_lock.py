"""One training run per output at a time, and an --out that a run may use."""

from __future__ import annotations

import threading
import time

import pytest

from sampleclr_scale.config import TrainConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.train.artifact import MODEL_FILE
from sampleclr_scale.train.driver import CONFIG_FILE, train

TINY = {"preset": "small", "loader": {"batch_size": 4, "cells_per_view": 16, "seed": 1},
        "epochs": 3, "workers": 1, "log_every": 100, "seed": 1}


def test_a_second_run_on_the_same_out_is_refused(store_path, tmp_path):
    run = tmp_path / "run"
    config = TrainConfig.from_mapping(TINY)
    errors: list[BaseException] = []

    def first() -> None:
        try:
            train(store_path, str(run), config, in_process=True)
        except BaseException as err:  # reported below
            errors.append(err)

    thread = threading.Thread(target=first)
    thread.start()
    deadline = time.monotonic() + 60
    while not (run / CONFIG_FILE).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (run / CONFIG_FILE).exists() and thread.is_alive()  # the first run is training
    with pytest.raises(InputError, match=r"(?s)another run is writing .*run: pid \d+ .*"
                                         r"holds the lock .*\.run\.lock.*fix: wait"):
        train(store_path, str(run), config, resume=True, in_process=True)
    thread.join()
    assert not errors, errors
    assert (run / MODEL_FILE).is_file()
    assert not (tmp_path / ".run.lock").exists()  # released
    # once the first has finished, the run is free again (and complete: nothing to resume)
    with pytest.raises(InputError, match="already exists"):
        train(store_path, str(run), config, in_process=True)


def test_resume_of_nothing_is_refused(store_path, tmp_path):
    with pytest.raises(InputError, match=r"(?s)--resume: .* holds no training run"):
        train(store_path, str(tmp_path / "empty"), TrainConfig.from_mapping(TINY),
              resume=True, in_process=True)
    assert not (tmp_path / "empty" / CONFIG_FILE).exists()


def test_an_out_in_the_store_or_a_file_is_refused(store_path, tmp_path):
    config = TrainConfig.from_mapping(TINY)
    with pytest.raises(InputError, match=r"lies inside .*which this stage reads"):
        train(store_path, f"{store_path}/runs/r", config, in_process=True)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(InputError, match=r"is a file, not a folder"):
        train(store_path, str(tmp_path / "file"), config, in_process=True)
    assert (tmp_path / "file").read_text() == "mine"


def test_a_store_replaced_during_training_is_noticed(soma_uri, tmp_path):
    from sampleclr_scale.ingest.stage import ingest
    from sampleclr_scale.store.bag_store import BagStore
    from sampleclr_scale.train.driver import check_store_unchanged
    from tests.conftest import ingest_config

    path = tmp_path / "s.zarr"
    ingest(ingest_config(soma_uri, path))
    store = BagStore(path)  # what a run opened when it started
    check_store_unchanged(store)
    ingest(ingest_config(soma_uri, path, seed=4, overwrite=True))  # replaced meanwhile
    with pytest.raises(InputError, match=r"(?s)was replaced while this run trained.*its "
                                         r"model is not written"):
        check_store_unchanged(store)
