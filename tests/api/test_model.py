"""The notebook's SampleCLR: fit on an AnnData (in memory and backed) without Ray, the donor
AnnData, cell weights, save/load, a new cohort, runs of the command line, the docstring
examples."""

from __future__ import annotations

import doctest
import json

import anndata
import numpy as np
import pytest

import sampleclr_scale as scs
from sampleclr_scale import console
from sampleclr_scale.config import IngestConfig, TrainConfig
from sampleclr_scale.embed.config import EmbedConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.stages import embed, ingest, train

FEATURES = {"memory": "scvi", "backed": "pca:8"}
"""The in-memory cohort is read through its obsm embedding, the backed one through a PCA
of its counts (read from disk in row blocks)."""
SETTINGS = dict(epochs=2, supervised_epochs=1, supervised_min_steps=0,
                tasks={"severity": "ordinal"},
                loader={"cells_per_view": 32, "batch_size": 8})


def _cohort(n_donors: int, seed: int) -> anndata.AnnData:
    return scs.simulated_anndata(n_donors=n_donors, min_cells=40, max_cells=120, n_genes=40,
                                 seed=seed)


@pytest.fixture(scope="module", params=["memory", "backed"])
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def cohort(kind, tmp_path_factory) -> anndata.AnnData:
    """16 samples of 40-120 cells, in memory or backed by an .h5ad file."""
    adata = _cohort(16, seed=1)
    if kind == "memory":
        return adata
    path = tmp_path_factory.mktemp("backed") / "cohort.h5ad"
    adata.write_h5ad(path)
    return anndata.read_h5ad(path, backed="r")


@pytest.fixture(scope="module")
def model(kind, cohort, tmp_path_factory) -> scs.SampleCLR:
    """A model fitted in this process; Ray is refused should anything ask for it."""
    scs.SampleCLR.setup_anndata(cohort, sample_key="sample", cell_type_key="cell_type",
                                features=FEATURES[kind], min_cells=20)
    fitted = scs.SampleCLR(cohort, workdir=tmp_path_factory.mktemp("work"), **SETTINGS)
    with pytest.MonkeyPatch.context() as patch:
        for module in ("sampleclr_scale.train.driver", "sampleclr_scale.embed.embedder"):
            patch.setattr(f"{module}.ensure_ray", _no_ray)
        fitted.train()
        fitted.get_sample_representation()
    return fitted


def _no_ray() -> None:
    raise AssertionError("Ray was started")


N_TYPES = 10
"""Cell types of the simulated cohorts (the composition channel's width)."""


def _samples(adata: anndata.AnnData) -> list[str]:
    return sorted(adata.obs["sample"].astype(str).unique())


def test_fit_gives_a_donor_anndata_with_metadata_and_predictions(model, cohort):
    donors = model.get_sample_representation()
    assert sorted(donors.obs_names) == _samples(cohort)
    # 32 learned dimensions, then the composition channel (one per cell type)
    assert donors.X.shape == (16, 32 + N_TYPES) and np.isfinite(donors.X).all()
    severity = cohort.obs.groupby("sample", observed=True)["severity"].first()
    assert (donors.obs["severity"] == severity.loc[donors.obs_names].to_numpy()).all()
    assert donors.obs["severity_pred"].isin([0, 1, 2, 3]).all()
    probabilities = donors.obs[[f"severity_p_{k}" for k in range(4)]].sum(axis=1)
    np.testing.assert_allclose(probabilities, 1.0, rtol=1e-5)
    assert set(donors.obs["split"]) == {"train", "validation"}
    provenance = json.loads(donors.uns["sampleclr_provenance"])
    assert provenance["tasks"][0]["column"] == "severity"
    assert [m["stage"] for m in model.history] == [1, 1, 2]


def test_cell_weights_are_aligned_to_the_cells(model, cohort):
    weights = model.get_cell_weights(mode="all")
    assert weights.index.equals(cohort.obs_names) and weights.notna().all().all()
    per_sample = weights["head_0"].groupby(cohort.obs["sample"].to_numpy()).sum()
    np.testing.assert_allclose(per_sample, 1.0, rtol=1e-4)  # a softmax over each bag
    drawn = model.get_cell_weights(cells=30)
    chosen = drawn["head_0"].notna().groupby(cohort.obs["sample"].to_numpy()).sum()
    assert (chosen <= 30).all() and (chosen > 0).all()


def test_save_and_load_round_trip_identically(model, cohort, tmp_path):
    saved = model.save(tmp_path / "saved")
    assert {"model.pt", "anndata_setup.json", "feature_spec.zarr"} <= {
        p.name for p in saved.iterdir()}
    with pytest.raises(InputError, match="not empty"):
        model.save(saved)
    expected = model.get_sample_representation()
    again = scs.SampleCLR.load(saved, cohort).get_sample_representation()
    assert again.obs_names.equals(expected.obs_names)
    np.testing.assert_array_equal(again.X, expected.X)
    bare = scs.SampleCLR.load(saved)
    with pytest.raises(InputError, match="pass adata="):
        bare.get_cell_weights()
    np.testing.assert_array_equal(bare.get_sample_representation(cohort).X, expected.X)


def test_a_saved_model_embeds_with_the_command_lines_stages(model, cohort, tmp_path):
    """``ingest --features-like SAVED`` and ``embed --checkpoint SAVED`` (the functions the
    command line calls) give the model's own vectors."""
    saved = model.save(tmp_path / "saved")
    path = cohort.filename if cohort.isbacked else tmp_path / "cohort.h5ad"
    if not cohort.isbacked:
        cohort.write_h5ad(path)
    store = tmp_path / "bags.zarr"
    ingest(IngestConfig(source=str(path), out=str(store), features_like=str(saved),
                        donor_key=["sample"], meta=["severity"], cell_columns=["cell_type"],
                        min_cells=20))
    result = embed(store, saved, tmp_path / "emb", EmbedConfig(workers=1), write_back=False,
                   in_process=True)
    donors = anndata.read_h5ad(result.h5ad)
    expected = model.get_sample_representation()
    np.testing.assert_allclose(donors.X, expected[donors.obs_names].X, rtol=1e-5, atol=1e-6)


def test_a_new_cohort_is_put_in_the_trained_feature_space(model, kind):
    new = _cohort(6, seed=9)
    donors = model.get_sample_representation(new)
    assert sorted(donors.obs_names) == _samples(new) and donors.X.shape == (6, 32 + N_TYPES)
    provenance = json.loads(donors.uns["sampleclr_provenance"])
    assert provenance["features"]["kind"] == ("embedding" if kind == "memory" else "pca")
    assert model.get_cell_weights(new).index.equals(new.obs_names)
    other = _cohort(6, seed=9)
    if kind == "memory":
        other.obsm["scvi"] = other.obsm["scvi"][:, :4]
        match = "width 4"
    else:
        other.var_names = [f"gene-{i}" for i in range(other.n_vars)]
        other.var["feature_id"] = other.var_names
        match = "lacks"
    with pytest.raises(InputError, match=match):
        model.get_sample_representation(other)


def test_a_run_of_the_command_line_loads(kind, cohort, tmp_path):
    """A run trained by the train stage on a store ingested from the cohort's file loads,
    embeds its store, and embeds the AnnData (ingested as the store was) identically."""
    path = cohort.filename if cohort.isbacked else tmp_path / "cohort.h5ad"
    if not cohort.isbacked:
        cohort.write_h5ad(path)
    store, run = tmp_path / "bags.zarr", tmp_path / "run"
    ingest(IngestConfig(source=str(path), out=str(store), features=f"obsm:{FEATURES['memory']}"
                        if kind == "memory" else FEATURES[kind], donor_key=["sample"],
                        meta=["severity"], cell_columns=["cell_type"], min_cells=20))
    train(str(store), str(run), TrainConfig(epochs=1, supervised_epochs=0, workers=1,
                                            loader={"cells_per_view": 32, "batch_size": 8}),
          in_process=True)
    loaded = scs.SampleCLR.load(run)
    assert loaded.is_trained and loaded._setup.sample_key == ["sample"]
    from_store = loaded.get_sample_representation()
    assert sorted(from_store.obs_names) == _samples(cohort)
    with_adata = scs.SampleCLR.load(run, cohort).get_sample_representation()
    np.testing.assert_array_equal(with_adata[from_store.obs_names].X, from_store.X)


def test_a_store_of_a_soma_experiment_trains_and_embeds(store_path, tmp_path):
    """``from_store``: the atlas route (a store ingested from a SOMA experiment)."""
    from sampleclr_scale.store.bag_store import BagStore

    model = scs.SampleCLR.from_store(store_path, workdir=tmp_path, epochs=1,
                                     supervised_epochs=1, supervised_min_steps=0,
                                     tasks={"severity": "ordinal"},
                                     loader={"cells_per_view": 32})
    assert model._setup.sample_key == ["dataset_id", "donor_id"]
    model.train()
    donors = model.get_sample_representation()
    store = BagStore(store_path)
    assert donors.n_obs == store.n_donors and "severity_pred" in donors.obs
    weights = model.get_cell_weights(mode="all")
    assert weights.index.name == "source_joinid" and len(weights) == store.n_cells
    assert set(weights.index) == set(store.source_joinid())


@pytest.fixture
def small() -> anndata.AnnData:
    return _cohort(6, seed=3)


def test_setup_refuses_what_it_cannot_use(small):
    with pytest.raises(InputError, match=r"obs column\(s\) \['patient'\]"):
        scs.SampleCLR.setup_anndata(small, sample_key="patient")
    with pytest.raises(InputError, match="no obsm\\['X_pca'\\]"):
        scs.SampleCLR.setup_anndata(small, sample_key="sample", features="X_pca")
    with pytest.raises(InputError, match="fewer than min_cells=500"):
        scs.SampleCLR.setup_anndata(small, sample_key="sample", features="scvi",
                                    min_cells=500)
    small.obsm["scvi"][3, 0] = np.nan
    with pytest.raises(InputError, match=r"1 cells .* NaN"):
        scs.SampleCLR.setup_anndata(small, sample_key="sample", features="scvi")
    with pytest.raises(InputError, match="not set up"):
        scs.SampleCLR(small)


def test_settings_are_validated_as_the_yaml_is(small):
    scs.SampleCLR.setup_anndata(small, sample_key="sample", features="scvi", min_cells=20)
    with pytest.raises(InputError, match="valid keys"):
        scs.SampleCLR(small, epoch=3)
    with pytest.raises(InputError, match="loader"):
        scs.SampleCLR(small, loader={"batch_size": 0})
    with pytest.raises(InputError, match="not sample-level"):
        scs.SampleCLR(small, tasks={"cell_type": "classification"})
    model = scs.SampleCLR(small, tasks={"severity": "ordinal"})
    assert model.config.tasks[0].kind == "ordinal" and model.config.workers == 1
    with pytest.raises(InputError, match="not trained"):
        model.get_sample_representation()


def test_importing_the_package_stays_light():
    import subprocess
    import sys

    code = ("import sys, sampleclr_scale as s; s.TrainConfig; s.stages; "
            "print(sorted(m for m in ('torch', 'ray', 'anndata') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_docstring_examples_run(tmp_path):
    """The Examples of the public objects, in order, in one namespace (the stages' examples
    continue one another)."""
    objects = [scs.simulated_anndata, scs.SampleCLR, ingest, train, embed, scs.stages]
    namespace: dict[str, object] = {"tmp": str(tmp_path)}
    finder, runner = doctest.DocTestFinder(recurse=False), doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    console.configure("quiet")  # no epoch lines among the examples' output
    try:
        for obj in objects:
            (test,) = finder.find(obj, globs=namespace)
            assert test.examples, f"{test.name} has no Examples"
            test.globs = namespace  # shared, so that later examples see earlier names
            runner.run(test, clear_globs=False)
    finally:
        console.configure("normal")
    assert runner.summarize(verbose=False).failed == 0



def test_the_tutorial_runs(tmp_path, monkeypatch):
    """docs/tutorial.py, end to end on a tiny cohort."""
    import runpy
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAMPLECLR_TUTORIAL_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    script = Path(__file__).resolve().parents[2] / "docs" / "tutorial.py"
    namespace = runpy.run_path(str(script), run_name="__main__")
    assert (tmp_path / "donor_map.png").stat().st_size > 0
    assert (tmp_path / "saved_model" / "model.pt").is_file()
    assert namespace["new_donors"].n_obs == 4
    assert namespace["weights"].index.equals(namespace["adata"].obs_names)


@pytest.mark.ray
@pytest.mark.slow
def test_more_workers_train_on_ray_train(ray_cluster, tmp_path):
    """``train(workers=2)``: the same run on Ray Train, which writes its checkpoints (slow:
    Ray Train's start alone is most of a minute on 2 cores)."""
    adata = _cohort(16, seed=4)
    scs.SampleCLR.setup_anndata(adata, sample_key="sample", features="scvi", min_cells=20)
    model = scs.SampleCLR(adata, workdir=tmp_path, epochs=1, supervised_epochs=0,
                          loader={"cells_per_view": 32})
    model.train(workers=2)
    assert model.config.workers == 2 and model.config.global_batch <= 13
    assert (tmp_path / "run" / "ray").is_dir()
    assert model.get_sample_representation().n_obs == 16


def test_the_readme_five_lines_run(tmp_path, monkeypatch):
    """The README's notebook lines, on a smaller cohort and one epoch per stage."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = readme.split("## In a notebook", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "n_donors=120" in code and "epochs=20" in code
    code = code.replace("n_donors=120", "n_donors=16").replace(
        "epochs=20", "epochs=1, supervised_epochs=1, supervised_min_steps=0")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["donors"].n_obs == 16
