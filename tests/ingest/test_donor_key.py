"""Donor keys that would merge donors: ids repeated across datasets (the simulator's and
Census's ``donor_id``), and cells without a donor id."""

from __future__ import annotations

import logging
import re

import anndata
import numpy as np
import pandas as pd
import pytest
import tiledbsoma.io

from sampleclr_scale.config import IngestConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.ingest.stage import ingest
from sampleclr_scale.simulate import cohorts as synthetic
from sampleclr_scale.store.bag_store import BagStore
from tests.conftest import META, ingest_config

SPANNING = r"\d+ donor ids occur in more than one dataset_id, e.g. 'donor-\d+' in \['site-"


def _default_key(config: IngestConfig) -> IngestConfig:
    """``config`` as if no donor key had been given (``--donor-key`` left out)."""
    return IngestConfig(**config.model_dump(exclude={"donor_key"}, exclude_unset=True))


def test_the_simulator_repeats_donor_ids_across_datasets(cohort_spec):
    donors = synthetic.simulate_donors(cohort_spec)
    assert donors["donor_id"].nunique() < len(donors)
    assert not donors.duplicated(["dataset_id", "donor_id"]).any()


@pytest.mark.parametrize("source", ["soma_uri", "h5ad_path"])
def test_default_key_tells_apart_donors_that_share_an_id(source, request, store_path,
                                                         cohort_spec, tmp_path, caplog):
    """Before the fix the default key donor_id merged the 24 donors into 6."""
    config = _default_key(ingest_config(request.getfixturevalue(source), tmp_path / "s.zarr"))
    assert "donor_key" not in config.model_fields_set
    with caplog.at_level(logging.WARNING, logger="sampleclr_scale"):
        store = BagStore(ingest(config).out)
    explicit = BagStore(store_path)  # --donor-key dataset_id donor_id
    assert store.n_donors == cohort_spec.n_donors == explicit.n_donors
    assert store.attrs["donor_key"] == ["dataset_id", "donor_id"]
    assert np.array_equal(store.source_joinid(), explicit.source_joinid())
    pd.testing.assert_frame_equal(store.donors.astype(str), explicit.donors.astype(str))
    assert any(_matches(SPANNING + r".*told apart by dataset_id \+ donor_id", r.getMessage())
               for r in caplog.records)


def _matches(pattern: str, text: str) -> bool:
    return re.search(pattern, text) is not None


@pytest.mark.parametrize("source", ["soma_uri", "h5ad_path"])
def test_explicit_donor_id_key_is_refused_when_ids_repeat(source, request, tmp_path):
    """Before the fix --donor-key donor_id merged the 24 donors into 6 without an error."""
    out = tmp_path / "s.zarr"
    with pytest.raises(InputError, match=SPANNING) as err:
        ingest(ingest_config(request.getfixturevalue(source), out, donor_key=["donor_id"]))
    assert err.value.fix == "use --donor-key dataset_id donor_id"
    assert not out.exists()


@pytest.fixture(scope="module")
def unique_ids(h5ad_path, tmp_path_factory) -> str:
    """The cohort with donor ids unique across datasets (``site-1:donor-0``); the old,
    repeating ids are in ``individual``."""
    adata = anndata.read_h5ad(h5ad_path)
    obs = adata.obs
    obs["individual"] = obs["donor_id"]
    obs["donor_id"] = pd.Categorical(obs["dataset_id"].astype(str) + ":"
                                     + obs["donor_id"].astype(str))
    path = tmp_path_factory.mktemp("unique") / "unique.h5ad"
    adata.write_h5ad(path)
    return str(path)


def test_default_key_stays_donor_id_when_ids_are_unique(unique_ids, store_path, tmp_path,
                                                        caplog):
    config = _default_key(ingest_config(unique_ids, tmp_path / "s.zarr", meta=META[1:]))
    with caplog.at_level(logging.WARNING, logger="sampleclr_scale"):
        store = BagStore(ingest(config).out)
    assert store.attrs["donor_key"] == ["donor_id"]
    assert "dataset_id" not in store.donors.columns  # not asked for with --meta
    assert list(store.donors["donor"]) == list(store.donors["donor_id"])
    assert store.donors["donor"].str.fullmatch(r"site-\d+:donor-\d+").all()
    explicit = BagStore(store_path)
    assert store.n_donors == explicit.n_donors
    assert np.array_equal(np.sort(store.source_joinid()), np.sort(explicit.source_joinid()))
    assert not any("more than one dataset_id" in r.getMessage() for r in caplog.records)


def test_another_explicit_key_is_kept_with_a_warning(unique_ids, tmp_path, caplog):
    """A user column (not CELLxGENE's donor_id) may name one person across datasets."""
    config = ingest_config(unique_ids, tmp_path / "s.zarr", donor_key=["individual"],
                           stratify=None)
    with caplog.at_level(logging.WARNING, logger="sampleclr_scale"):
        store = BagStore(ingest(config).out)
    assert store.attrs["donor_key"] == ["individual"]
    assert store.n_donors == store.donors["individual"].nunique() < 24
    assert any(_matches(r"more than one dataset_id.*merged into one donor each, as "
                        r"--donor-key individual asks", r.getMessage())
               for r in caplog.records)


@pytest.fixture(scope="module")
def missing_ids(h5ad_path, tmp_path_factory) -> dict[str, object]:
    """The cohort with no donor_id for the cells of one donor and a few scattered cells,
    as an .h5ad file and a SOMA experiment."""
    adata = anndata.read_h5ad(h5ad_path)
    obs = adata.obs
    real = ~obs["donor_id"].isin(["pooled", "unknown"]).to_numpy()
    whole = ((obs["dataset_id"] == "site-1") & (obs["donor_id"] == "donor-2")).to_numpy()
    scattered = np.flatnonzero(real & ~whole)[::500][:8]
    missing = whole.copy()
    missing[scattered] = True
    obs.loc[missing, "donor_id"] = np.nan
    folder = tmp_path_factory.mktemp("missing")
    adata.write_h5ad(folder / "missing.h5ad")
    tiledbsoma.io.from_anndata(str(folder / "soma"), adata, measurement_name="RNA")
    primary = obs["is_primary_data"].to_numpy()
    return {"h5ad": str(folder / "missing.h5ad"), "soma": str(folder / "soma"),
            "joinids": np.flatnonzero(missing & primary)}


@pytest.mark.parametrize("key", ["explicit", "default"])
@pytest.mark.parametrize("kind", ["h5ad", "soma"])
def test_cells_without_a_donor_id_are_dropped_and_counted(missing_ids, kind, key, tmp_path,
                                                          cohort_spec, caplog):
    """Before the fix their cells became donors named 'site-1/nan' (or 'nan')."""
    config = ingest_config(missing_ids[kind], tmp_path / "s.zarr")
    config = _default_key(config) if key == "default" else config
    with caplog.at_level(logging.WARNING, logger="sampleclr_scale"):
        store = BagStore(ingest(config).out)
    joinids = missing_ids["joinids"]
    assert store.attrs["counts"]["cells_without_donor"] == len(joinids)
    assert not np.isin(joinids, store.source_joinid()).any()
    assert not store.donors["donor"].str.contains("nan|None").any()
    assert store.n_donors == cohort_spec.n_donors - 1
    assert any(f"dropped {len(joinids)} cells without a value" in r.getMessage()
               for r in caplog.records)
