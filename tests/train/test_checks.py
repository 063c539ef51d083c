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


def test_a_boolean_is_no_number_of_epochs():
    with pytest.raises(InputError, match="epochs"):
        TrainConfig.from_mapping({**TINY, "epochs": True})


def test_settings_that_would_fail_in_a_worker_fail_first(store_path, tmp_path):
    for settings, message in (
            ({"loader": {**TINY["loader"], "balance": "nope"}}, r"no per-cell codes for "
                                                                r"column 'nope'"),
            ({"model": {"encoder_hidden": 10_000_000}}, r"(?s)would have [\d,]+ parameters.*"
                                                        r"fix: choose smaller")):
        with pytest.raises(InputError, match=message):
            train(store_path, str(tmp_path / "run"), TrainConfig.from_mapping(
                {**TINY, **settings}), in_process=True)
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", [
    [1, 2], {"model_config": {}, "tasks": []}, "shapes"])
def test_a_damaged_model_is_an_input_error(store_path, tmp_path, content):
    from sampleclr_scale.model import ModelConfig, SampleCLR
    from sampleclr_scale.storage import Location
    from sampleclr_scale.store.bag_store import BagStore
    from sampleclr_scale.train.artifact import MODEL_FILE, load_model, save_model

    if content == "shapes":  # the weights of another architecture
        config = ModelConfig.preset("small", input_dim=BagStore(store_path).dim)
        other = ModelConfig.preset("large", input_dim=BagStore(store_path).dim)
        save_model(tmp_path, model_config=config, state_dict=SampleCLR(other).state_dict(),
                   tasks=[], train_config={}, store=store_path, history=[])
    else:
        Location(tmp_path / MODEL_FILE).write_torch(content)
    with pytest.raises(InputError, match=r"(?s)is not a trained model that this "
                                         r"sampleclr-scale reads.*fix: train it again"):
        load_model(tmp_path)


@pytest.mark.parametrize("option", ["--workers", "--epochs"])
def test_demo_refuses_zero_workers_or_negative_epochs(tmp_path, capsys, option):
    from sampleclr_scale.cli import main

    value = "0" if option == "--workers" else "-1"
    assert main(["demo", "--out", str(tmp_path / "d"), option, value]) == 2
    err = capsys.readouterr().err
    assert f"demo {option} {value}: it needs at least 1" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("name", ["zarr.json", "..", ".", "x" * 300, "a\nb", "a\\b"])
def test_cell_columns_that_cannot_name_a_folder_are_refused_first(soma_uri, tmp_path, name):
    with pytest.raises(InputError, match=r"(?s)cannot name the Zarr array.*fix: rename"):
        ingest(ingest_config(soma_uri, tmp_path / "s.zarr", cell_columns=[name]))
    assert not (tmp_path / "s.zarr").exists()


def test_object_storage_without_credentials_is_a_one_line_error(monkeypatch, capsys,
                                                                 tmp_path):
    import fsspec

    from sampleclr_scale.cli import main

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    try:
        assert main(["check", "s3://no-such-bucket/s.zarr"]) == 2
    finally:
        fsspec.get_filesystem_class("s3").clear_instance_cache()
    err = capsys.readouterr().err
    assert "no credentials for object storage" in err and "Traceback" not in err


def test_a_name_too_long_or_a_file_in_the_path_is_a_one_line_error(store_path, tmp_path,
                                                                    capsys):
    from sampleclr_scale.cli import main

    (tmp_path / "file").write_text("mine")
    (tmp_path / "t.yaml").write_text("loader: {batch_size: 4, cells_per_view: 16}\n")
    for out, problem in ((tmp_path / ("r" * 300), "name too long"),
                         (tmp_path / "file" / "run", "is a file, not a folder")):
        assert main(["train", "--store", store_path, "--out", str(out), "--workers", "1",
                     "--config", str(tmp_path / "t.yaml")]) == 2
        err = capsys.readouterr().err
        assert problem in err and "fix:" in err and "Traceback" not in err, err
    assert (tmp_path / "file").read_text() == "mine"



def test_a_batch_adversary_without_batches_is_refused(store_path, tmp_path):
    config = TrainConfig.from_mapping({**TINY, "batch_adversary": 1.0})
    with pytest.raises(InputError, match=r"(?s)batch_adversary need the donors' technical "
                                         r"batches.*fix: re-ingest with --batch-key"):
        train(store_path, str(tmp_path / "run"), config, in_process=True)
    assert not (tmp_path / "run").exists()


def test_a_batch_adversary_over_one_batch_is_refused(soma_uri, tmp_path):
    # one site's donors only, with the site as batch: nothing to tell apart
    store = tmp_path / "s.zarr"
    ingest(ingest_config(soma_uri, store, batch_key=["dataset_id"],
                         obs_filter="dataset_id == 'site-0'", stratify=None))
    config = TrainConfig.from_mapping({**TINY, "batch_adversary": 1.0})
    with pytest.raises(InputError, match=r"(?s)training donors of .* are all in one batch.*"
                                         r"fix: set batch_adversary: 0"):
        train(str(store), str(tmp_path / "run"), config, in_process=True)
    assert not (tmp_path / "run").exists()
