"""Bad input: each case names the problem and the fix, and loses nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import zarr

from sampleclr_scale.cli import main
from sampleclr_scale.config import IngestConfig, LoaderConfig, TrainConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.ingest.stage import ingest
from sampleclr_scale.loading.loader import DonorBagDataset
from sampleclr_scale.store.bag_store import BagStore
from tests.conftest import ingest_config


def test_source_that_does_not_exist(tmp_path):
    with pytest.raises(InputError, match="does not exist") as err:
        ingest(ingest_config(str(tmp_path / "nowhere"), tmp_path / "s.zarr"))
    assert "fix:" in str(err.value)


def test_directory_that_is_not_a_soma_experiment(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match=r"(?s)cannot open .* as a SOMA experiment"):
        ingest(ingest_config(str(tmp_path / "plain"), tmp_path / "s.zarr"))


def test_file_that_is_not_h5ad(tmp_path):
    fake = tmp_path / "fake.h5ad"
    fake.write_text("not hdf5")
    with pytest.raises(InputError, match=r"(?s)is not an .h5ad"):
        ingest(ingest_config(str(fake), tmp_path / "s.zarr"))


@pytest.mark.parametrize("source", ["soma_uri", "h5ad_path"])
def test_missing_donor_column(source, request, tmp_path):
    uri = request.getfixturevalue(source)
    with pytest.raises(InputError, match=r"--donor-key names obs column\(s\) \['patient'\]"):
        ingest(ingest_config(uri, tmp_path / "s.zarr", donor_key=["patient"]))


@pytest.mark.parametrize("source", ["soma_uri", "h5ad_path"])
def test_missing_obsm_name(source, request, tmp_path):
    uri = request.getfixturevalue(source)
    with pytest.raises(InputError, match=r"(?s)no cell embedding .* named 'umap'.*use one of"):
        ingest(ingest_config(uri, tmp_path / "s.zarr", features="obsm:umap"))
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("source", ["soma_uri", "h5ad_path"])
def test_empty_cohort_after_filtering(source, request, tmp_path):
    uri = request.getfixturevalue(source)
    with pytest.raises(InputError, match=r"(?s)no cell of .* passes the obs filter"):
        ingest(ingest_config(uri, tmp_path / "s.zarr", obs_filter="tissue == 'brain'"))


def test_all_donors_below_minimum(soma_uri, tmp_path):
    with pytest.raises(InputError, match=r"(?s)all .* donors have fewer than --min-cells 100000"):
        ingest(ingest_config(soma_uri, tmp_path / "s.zarr", min_cells=100_000))


@pytest.mark.parametrize("expr", ["disease == ", "tissue = 'blood'", "(a and"])
def test_filter_that_does_not_parse(expr, soma_uri, tmp_path):
    with pytest.raises(InputError, match="does not parse"):
        ingest(ingest_config(soma_uri, tmp_path / "s.zarr", obs_filter=expr))


def test_filter_on_unknown_column(soma_uri, tmp_path):
    with pytest.raises(InputError, match=r"--obs-filter names obs column\(s\) \['organ'\]"):
        ingest(ingest_config(soma_uri, tmp_path / "s.zarr", obs_filter="organ == 'lung'"))


def test_store_with_another_schema_version(store_path, tmp_path):
    copy = tmp_path / "old.zarr"
    shutil.copytree(store_path, copy)
    zarr.open_group(str(copy), mode="r+").attrs["schema_version"] = 0
    with pytest.raises(InputError, match=r"(?s)schema version 0.*reads version 1") as err:
        BagStore(copy)
    assert "re-run `sampleclr-scale ingest`" in str(err.value)


def test_not_a_store(tmp_path):
    with pytest.raises(InputError, match="is not a bag store"):
        BagStore(tmp_path)


def test_views_larger_than_any_donor(store_path):
    largest = int(BagStore(store_path).cells_per_donor.max())
    with pytest.raises(InputError, match=rf"larger than any donor .*{largest} cells"):
        DonorBagDataset(store_path, LoaderConfig(cells_per_view=largest + 1))


def test_missing_label_column(store_path):
    with pytest.raises(InputError, match="no donor column 'bmi'"):
        DonorBagDataset(store_path, LoaderConfig(cells_per_view=10), tasks={"bmi": "regression"})


def test_unknown_config_key():
    with pytest.raises(InputError, match=r"(?s)batchsize.*Extra inputs are not permitted"):
        LoaderConfig.from_mapping({"batchsize": 3})
    with pytest.raises(InputError, match="features"):
        IngestConfig.from_mapping({"source": "a", "out": "b", "features": "genes"})


def test_model_overrides_are_checked_with_the_config():
    """A typo under ``model:`` fails when the config is read, for every preset the run may
    take, not when the run starts."""
    with pytest.raises(InputError, match=r"model \(preset small\): n_head: Extra inputs"):
        TrainConfig.from_mapping({"model": {"n_head": 4}})
    with pytest.raises(InputError, match=r"model \(preset large\): encoder_layers"):
        TrainConfig.from_mapping({"preset": "large", "model": {"encoder_layers": 0}})
    assert TrainConfig.from_mapping({"model": {"n_heads": 4}}).model == {"n_heads": 4}


def test_cli_prints_problem_and_fix(tmp_path, capsys):
    status = main(["ingest", str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert status == 2
    assert "error: source" in err and "does not exist" in err and "fix:" in err
    assert "Traceback" not in err


def test_cli_ingest(h5ad_path, tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    status = main(["ingest", h5ad_path, "--out", str(out), "--donor-key", "dataset_id",
                   "donor_id", "--features", "obsm:scvi", "--min-cells", "40", "--meta",
                   "disease", "severity", "--primary-only", "--obs-filter",
                   "tissue == 'blood'"])
    assert status == 0
    summary = json.loads(capsys.readouterr().out)
    store = BagStore(out)
    assert summary["donors"] == store.n_donors and summary["cells"] == store.n_cells
    assert store.attrs["ingest"]["obs_filter"] == "tissue == 'blood'"


def test_an_unknown_key_names_the_config_file_it_is_in(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("epoch: 3\n")
    status = main(["train", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "r"),
                   "--config", str(config), "--workers", "2"])
    err = capsys.readouterr().err
    assert status == 2
    assert f"error: {config}: not a valid TrainConfig: epoch: Extra inputs" in err
    assert "fix: valid keys: [" in err and "'epochs'" in err and "command line" not in err


def test_a_bad_command_line_option_names_the_command_line(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("epochs: 3\n")
    status = main(["train", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "r"),
                   "--config", str(config), "--workers", "0"])
    err = capsys.readouterr().err
    assert status == 2
    assert "error: command line: not a valid TrainConfig: workers: Input should be" in err
    assert str(config) not in err


def _denied(err: str, path: Path) -> bool:
    """Whether ``err`` is the command line's error for a denied ``path``, with its fix."""
    return (f"error: Permission denied: {path}" in err and "fix: check that you may" in err
            and "Traceback" not in err)


def test_an_output_in_a_read_only_folder_is_a_clear_error(h5ad_path, locked):
    folder = locked.read_only()
    ran = locked.run("ingest", h5ad_path, "--out", str(folder / "store"), "--min-cells", "40")
    assert ran.returncode == 2 and _denied(ran.stderr, folder), ran.stderr
    assert not list(folder.iterdir())


@pytest.mark.parametrize("source", ["h5ad_path", "soma_uri"])
def test_an_unreadable_source_is_a_clear_error(source, request, locked, tmp_path):
    copy = locked.unreadable(request.getfixturevalue(source))
    ran = locked.run("ingest", str(copy), "--out", str(tmp_path / "store"))
    assert ran.returncode == 2 and _denied(ran.stderr, copy), ran.stderr
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(("command", "config", "positional"), [
    ("ingest", "sampleclr_scale.config:IngestConfig", {"source", "out"}),
    ("train", "sampleclr_scale.config:TrainConfig", {"store", "out", "resume"}),
    ("prior", "sampleclr_scale.prior.config:PriorConfig", {"store"}),
    ("embed", "sampleclr_scale.embed.config:EmbedConfig",
     {"store", "checkpoint", "out", "write_back"}),
])
def test_every_stage_option_is_a_config_field(command, config, positional):
    """A stage's options reach its config by name: an option that is not a field (or is
    spelt differently) would be silently dropped."""
    import importlib

    from sampleclr_scale.cli import build_parser

    module, name = config.split(":")
    fields = set(getattr(importlib.import_module(module), name).model_fields)
    stage = build_parser()._subparsers._group_actions[0].choices[command]
    options = {action.dest for action in stage._actions} - {"help", "config"} - positional
    assert options and options <= fields, options - fields
