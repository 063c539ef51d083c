"""Ingest records cell-type codes by default when the source has a cell_type column."""

from __future__ import annotations

from sampleclr_scale.config import IngestConfig
from sampleclr_scale.ingest.stage import with_default_cell_columns


def _config(**kw: object) -> IngestConfig:
    return IngestConfig(source="src.h5ad", out="out.zarr", **kw)


def test_unset_cell_columns_take_cell_type_when_the_source_has_it() -> None:
    assert with_default_cell_columns(_config(), ["donor_id", "cell_type"]).cell_columns == [
        "cell_type"]
    assert with_default_cell_columns(_config(), ["donor_id"]).cell_columns == []


def test_explicit_cell_columns_are_kept_even_when_empty() -> None:
    obs = ["donor_id", "cell_type", "cell_state"]
    assert with_default_cell_columns(_config(cell_columns=[]), obs).cell_columns == []
    assert with_default_cell_columns(_config(cell_columns=["cell_state"]),
                                     obs).cell_columns == ["cell_state"]


def test_train_says_what_it_balances_and_corrects(batch_store, store_path) -> None:
    from sampleclr_scale.config import TrainConfig
    from sampleclr_scale.store.bag_store import BagStore
    from sampleclr_scale.train.setup import describe_run, standardizes

    with_batches, without = BagStore(batch_store), BagStore(store_path)
    config = TrainConfig(standardize="auto", composition_channel=1.0)
    assert standardizes(with_batches, config) == "batch_cell_type"
    assert standardizes(without, config) is None
    assert standardizes(with_batches, TrainConfig(standardize="none")) is None
    text = describe_run(with_batches, config)
    assert "balanced over 'cell_type'" in text and "per (batch, cell type)" in text
    assert "composition channel of weight 1 (CLR centred per batch)" in text
    text = describe_run(without, config)
    assert "no batch correction (the store has no --batch-key" in text
    uniform = TrainConfig(loader={"balance": None}, composition_channel=0.0)
    assert "uniform views (loader.balance: null)" in describe_run(without, uniform)
    assert "no composition channel" in describe_run(without, uniform)
    # the defaults: the weight fitted to the prior; without a prior, the fixed 1.75
    assert ("composition channel of weight fitted to the gloscope prior when training "
            "ends") in describe_run(with_batches, TrainConfig())
    no_prior = TrainConfig(loss={"prior": None})
    assert "composition channel of weight 1.75" in describe_run(with_batches, no_prior)
    partly = TrainConfig(loader={"balance_strength": 0.25})
    assert ("balanced over 'cell_type' with strength 0.25 (each donor's composition "
            "log-ratios kept at 0.75)") in describe_run(with_batches, partly)
