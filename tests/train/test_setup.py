"""The run's plan from its config and store: how long each stage lasts."""

from __future__ import annotations

import pytest

from sampleclr_scale.config import TrainConfig
from sampleclr_scale.train.setup import training_stages


@pytest.mark.parametrize(
    ("n_train", "workers", "batch", "supervised", "min_steps", "tasks", "stage_2"),
    [
        # n_train  workers  batch  supervised  min_steps  tasks  stage-2 epochs
        (128,      1,       32,    10,         200,       True,  50),    # 4 steps an epoch
        (128,      2,       32,    10,         200,       True,  100),   # 2 steps an epoch
        (130,      1,       32,    10,         200,       True,  40),    # 5 (last one short)
        (10_000,   1,       32,    10,         200,       True,  10),    # 313 steps: as asked
        (128,      1,       32,    10,         0,         True,  10),    # no minimum
        (128,      1,       32,    0,          200,       True,  None),  # no stage 2
        (128,      1,       32,    10,         200,       False, None),  # no tasks
    ])
def test_stage_two_reaches_its_fewest_steps(n_train, workers, batch, supervised, min_steps,
                                            tasks, stage_2):
    config = TrainConfig(epochs=7, supervised_epochs=supervised, supervised_min_steps=min_steps,
                         workers=workers, loader={"batch_size": batch})
    stages = training_stages(config, n_train, tasks)
    assert stages[0] == (1, 7)
    assert dict(stages).get(2) == stage_2
    if stage_2 is not None and min_steps:  # a plain count of the steps it gives
        per_epoch = -(-n_train // (workers * batch))
        assert stage_2 * per_epoch >= min_steps
        assert stage_2 == supervised or (stage_2 - 1) * per_epoch < min_steps


def test_the_heads_learn_at_a_multiple_of_the_backbones_rate():
    from sampleclr_scale.model import ModelConfig, SampleCLR, TaskSpec
    from sampleclr_scale.train.setup import optimizer

    tasks = (TaskSpec(name="severity", kind="ordinal", n_classes=4),)
    model = SampleCLR(ModelConfig.preset("small", input_dim=6, tasks=tasks))
    config = TrainConfig(workers=1, loader={"batch_size": 8}, optim={"head_lr_scale": 4.0})
    backbone, heads = optimizer(model, config).param_groups
    # every parameter exactly once, the heads' at 4x the run's (batch-scaled) rate
    everything = {id(p) for p in model.parameters()}
    assert {id(p) for p in backbone["params"]} | {id(p) for p in heads["params"]} == everything
    assert len(backbone["params"]) + len(heads["params"]) == len(everything)
    assert {id(p) for p in heads["params"]} == {id(p) for p in model.heads.parameters()}
    assert backbone["lr"] == pytest.approx(config.learning_rate)
    assert heads["lr"] == pytest.approx(4.0 * config.learning_rate)
    assert config.learning_rate == pytest.approx(1e-3 * 0.5)  # 8 donors of 32: sqrt


def test_the_batch_adversary_learns_with_the_heads():
    from sampleclr_scale.model import ModelConfig, SampleCLR, TaskSpec
    from sampleclr_scale.train.setup import optimizer

    tasks = (TaskSpec(name="severity", kind="ordinal", n_classes=4),)
    model = SampleCLR(ModelConfig.preset("small", input_dim=6, tasks=tasks, batch_adversary=3))
    config = TrainConfig(workers=1, loader={"batch_size": 8}, batch_adversary=1.0)
    backbone, heads = optimizer(model, config).param_groups
    assert {id(p) for p in backbone["params"]} | {id(p) for p in heads["params"]} == {
        id(p) for p in model.parameters()}
    assert {id(p) for p in heads["params"]} == {
        id(p) for p in [*model.heads.parameters(), *model.adversary.parameters()]}
    assert heads["lr"] == pytest.approx(config.optim.head_lr_scale * config.learning_rate)
