"""A write-back that a killed embed left unfinished is finished by the next run."""

from __future__ import annotations

import shutil

import pytest
import torch

from sampleclr_scale.embed import writeback
from sampleclr_scale.embed.config import EmbedConfig
from sampleclr_scale.embed.embedder import complete_write_back, embed
from sampleclr_scale.errors import InputError
from sampleclr_scale.model import ModelConfig, SampleCLR
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.train.artifact import save_model


@pytest.mark.ray
def test_a_soma_write_back_killed_before_its_publish_is_finished(store_path, soma_uri,
                                                                 ray_cluster, tmp_path):
    store, experiment, run = tmp_path / "bags.zarr", str(tmp_path / "exp"), tmp_path / "run"
    shutil.copytree(store_path, store)
    shutil.copytree(soma_uri, experiment)
    torch.manual_seed(0)
    config = ModelConfig.preset("small", input_dim=BagStore(store).dim)
    run.mkdir()
    save_model(run, model_config=config, state_dict=SampleCLR(config).state_dict(), tasks=[],
               train_config={}, store=str(store), history=[])
    settings = EmbedConfig(workers=1, cells=32, run_name="r1")
    out = tmp_path / "emb"
    embed(store, run, out, settings, write_back=False)
    # what embed leaves when killed at the start of the SOMA publish: the store's results
    # written, the experiment's only staged (the real writers, stopped before _publish)
    writeback.write_back_store(out, store, "r1")
    results = writeback._Results(out)
    home, n_obs = writeback._prepare(experiment, results.max_joinid())
    writeback._stage(home, "r1", results, n_obs)
    assert writeback.has_run(store, "r1") and not writeback.has_run(experiment, "r1")
    with pytest.raises(InputError):
        writeback.read_back(experiment, "r1")

    written = complete_write_back(store, run, out, settings, write_back=experiment)
    assert set(written) == {"soma"}  # the store's results were whole already
    donors, _ = writeback.read_back(experiment, "r1")
    assert len(donors) == BagStore(store).n_donors
    assert complete_write_back(store, run, out, settings, write_back=experiment) == {}


def test_a_write_back_into_a_store_a_file_or_a_foreign_folder_is_refused(store_path,
                                                                         tmp_path):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    for target, what in ((store_path, r"a bag store \(a Zarr group\)"),
                         (tmp_path / "file", "a file"),
                         (tmp_path / "folder", "a folder that is not a SOMA experiment")):
        with pytest.raises(InputError, match=rf"--write-back .* is {what}: writing back "
                                             r"would create a SOMA experiment inside it"):
            embed(store_path, tmp_path / "run", tmp_path / "emb", EmbedConfig(run_name="r"),
                  write_back=str(target))
    assert (tmp_path / "file").read_text() == "mine" and not (tmp_path / "emb").exists()
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["notes.txt"]
