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
