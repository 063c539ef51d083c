"""On a CUDA GPU (skipped without one; benchmarks/gpu_check.sh runs them): resident bags on
the device, streamed bags through page-locked memory, bf16 training in this process and on
a 1-worker NCCL Ray Train run, and a compiled model."""

from __future__ import annotations

import math

import pytest
import torch

from sampleclr_scale.config import LoaderConfig, TrainConfig
from sampleclr_scale.loading.loader import DonorBagDataset, make_loader
from sampleclr_scale.loading.resident import (
    ResidentBags,
    load_features,
    resident_dtype,
    use_resident,
)
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.train.driver import train
from tests.loading.test_resident import TASKS, assert_same_batches
from tests.train.test_train_paths import RUN, run_in_process

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)


def _epoch(source) -> list:
    source.set_epoch(1)
    return list(source) if isinstance(source, ResidentBags) else list(make_loader(source))


def test_resident_bags_on_cuda_equal_the_cpu_ones(batch_store):
    store = BagStore(batch_store)
    config = LoaderConfig(batch_size=3, cells_per_view=60, min_cells_per_view=15, seed=4)
    assert use_resident(store, config, CUDA)  # auto: a small cohort on a GPU
    data = {"tasks": TASKS, "standardize": True}
    on = {}
    for device in (torch.device("cpu"), CUDA):
        features = load_features(store, device, resident_dtype(store, config))
        on[device.type] = _epoch(ResidentBags(batch_store, config, features=features, **data))
    assert all(b.cells.device.type == "cuda" and b.mask.device.type == "cuda"
               for b in on["cuda"])
    assert_same_batches(on["cpu"], on["cuda"])
    assert_same_batches(_epoch(DonorBagDataset(batch_store, config, **data)), on["cuda"])
    bf16 = load_features(store, CUDA, torch.bfloat16)
    assert torch.equal(bf16.cpu(), load_features(store, torch.device("cpu"), torch.bfloat16))


def test_streamed_batches_reach_the_gpu_through_pinned_memory(batch_store):
    batch = next(iter(make_loader(DonorBagDataset(
        batch_store, LoaderConfig(batch_size=4, cells_per_view=30), tasks=TASKS),
        pin_memory=True)))
    assert batch.cells.is_pinned() and batch.donor.is_pinned()
    assert all(v.is_pinned() for v in batch.labels.values())
    moved = batch.to(CUDA)
    torch.cuda.synchronize()
    assert moved.cells.device.type == "cuda" and torch.equal(moved.cells.cpu(), batch.cells)
    assert torch.equal(moved.donor.cpu(), batch.donor)


@pytest.mark.parametrize("resident", ["auto", "never"])
def test_bf16_training_on_cuda_in_process(batch_store, tmp_path, resident):
    history, weights = run_in_process(batch_store, tmp_path / "run", use_gpu=True,
                                      loader={"resident": resident})
    assert all(math.isfinite(h[k]) for h in history for k in ("train_loss", "val_loss"))
    assert all(h["gpu_peak_mb"] > 0 for h in history)
    assert all(w.dtype != torch.bfloat16 for w in weights.values())  # float32 weights


def test_compiled_bf16_training_on_cuda(batch_store, tmp_path):
    history, _ = run_in_process(batch_store, tmp_path / "compiled", use_gpu=True,
                                compile=True, epochs=2, supervised_epochs=0)
    assert all(math.isfinite(h["train_loss"]) for h in history)


@pytest.mark.ray
def test_one_worker_nccl_ray_train_run(batch_store, ray_cluster, tmp_path):
    config = TrainConfig.from_mapping({**RUN, "use_gpu": True})
    history = train(batch_store, str(tmp_path / "nccl"), config).history
    assert len(history) == RUN["epochs"] + RUN["supervised_epochs"]
    assert all(math.isfinite(h["train_loss"]) and h["gpu_peak_mb"] > 0 for h in history)
