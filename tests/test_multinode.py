"""Training across a real 2-node Ray cluster on this machine, surviving the loss of a node.

``ray.cluster_utils.Cluster`` starts a head and a worker node as separate raylets (each
with its own object store and worker processes), so the two Ray Train workers really run
on different Ray nodes. The bag store, the run directories and their checkpoints are on
S3 (the session's local S3 server), the storage every node shares. While training runs,
the worker node is killed and a fresh node joins: Ray Train restarts the worker group
from the latest checkpoint on S3 and the run finishes with the same weights as an
uninterrupted run.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from sampleclr_scale.config import TrainConfig
from sampleclr_scale.storage import Location
from sampleclr_scale.train.artifact import load_model
from sampleclr_scale.train.driver import RAY_DIR, train
from tests.storage.test_storage import upload_store
from tests.train.test_train import RUN as SINGLE_NODE_RUN

# the single-node test run, shortened, spread over the nodes, checkpointing every step
RUN = {**SINGLE_NODE_RUN, "epochs": 3, "supervised_epochs": 1, "supervised_min_steps": 0,
       "freeze_epochs": 0,
       "placement": "SPREAD", "checkpoint_every": 1, "max_failures": 3}
# a dead node is noticed after ~1 s instead of the default ~30 s
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 200,
                   "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}
WORKER_CPUS = 2  # room for both workers on the worker node: only SPREAD separates them


@pytest.fixture
def two_nodes():
    """A head node (1 CPU, the driver's) and a worker node (2 CPUs), this process
    connected to them and to no other Ray instance."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # e.g. the session's single-node instance
        ray.shutdown()
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False,
                                      "_system_config": FAST_NODE_DEATH})
    cluster.add_node(num_cpus=WORKER_CPUS)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _train_groups() -> list[dict]:
    """Ray Train's worker-group placement groups (one per attempt): bundle -> node."""
    import ray.util

    return [pg for pg in ray.util.placement_group_table().values()
            if len(pg["bundles"]) == RUN["workers"] and pg["strategy"] == "SPREAD"]


def _pack_would_share_a_node() -> bool:
    """Whether a PACK group of two 1-CPU bundles lands on one node of this cluster."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([{"CPU": 1}] * RUN["workers"], strategy="PACK")
    ray.get(group.ready(), timeout=60)
    nodes = set(ray.util.placement_group_table(group)["bundles_to_node_id"].values())
    remove_placement_group(group)
    return len(nodes) == 1


class _Training(threading.Thread):
    """``train(...)`` in the background (Ray starts nodes only from the main thread, so
    the test swaps nodes there)."""

    def __init__(self, *args) -> None:
        super().__init__(daemon=True)
        self.args = args
        self.result = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = train(*self.args)
        except BaseException as err:  # reported by the test
            self.error = err


def _wait_for_checkpoint(checkpoints: Location, training: _Training) -> None:
    deadline = time.monotonic() + 150
    while not [name for name in checkpoints.children() if name.startswith("checkpoint_")]:
        assert training.is_alive(), training.error
        assert time.monotonic() < deadline, f"no checkpoint in {checkpoints}"
        time.sleep(0.2)


@pytest.mark.ray
def test_two_nodes_spread_and_survive_losing_one(two_nodes, store_path, bucket):
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    assert _pack_would_share_a_node()
    head = two_nodes.head_node.node_id
    store = f"{bucket}/bags.zarr"  # everything every node reads and writes is on S3
    upload_store(store_path, store)
    config = TrainConfig.from_mapping(RUN)

    # an uninterrupted run is the reference for the recovered one
    reference = train(store, f"{bucket}/reference", config)
    groups = _train_groups()
    assert len(groups) == 1
    assert set(groups[0]["bundles_to_node_id"].values()) == {
        head, next(iter(two_nodes.worker_nodes)).node_id}  # one worker on each node

    interrupted = Location(f"{bucket}/interrupted")
    training = _Training(store, interrupted.uri, config)
    start = time.monotonic()
    training.start()
    _wait_for_checkpoint(interrupted / RAY_DIR, training)
    created = [pg for pg in _train_groups() if pg["state"] == "CREATED"]
    assert len(created) == 1, created
    node = next(iter(two_nodes.worker_nodes))
    assert set(created[0]["bundles_to_node_id"].values()) == {head, node.node_id}
    two_nodes.remove_node(node, allow_graceful=False)  # the node dies mid-training
    two_nodes.add_node(num_cpus=WORKER_CPUS)  # and a fresh one joins
    training.join(timeout=150)
    print(f"interrupted run: {time.monotonic() - start:.1f} s")
    assert not training.is_alive() and training.error is None, training.error
    result = training.result

    # the workers were restarted on the surviving head and the fresh node
    new_node = next(iter(two_nodes.worker_nodes)).node_id
    retries = [pg for pg in _train_groups()
               if set(pg["bundles_to_node_id"].values()) == {head, new_node}]
    assert retries, _train_groups()
    assert result.model_path.exists()
    epochs = RUN["epochs"] + RUN["supervised_epochs"]
    assert [h["epoch"] for h in result.history] == list(range(epochs))
    # resumed from the checkpoint at the exact step: the same weights as without the loss
    ours, _ = load_model(result.run_dir)
    theirs, _ = load_model(reference.run_dir)
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert [h["val_loss"] for h in result.history] == [h["val_loss"] for h in
                                                       reference.history]
