"""The console: one line per training epoch on the driver, whether the loop runs here or on
Ray Train workers; workers' and Ray's lines in RUN/logs; quiet and verbose."""

from __future__ import annotations

import pytest

from sampleclr_scale import console
from sampleclr_scale.cli import main
from sampleclr_scale.config import TrainConfig
from sampleclr_scale.train.driver import train
from sampleclr_scale.train.progress import epoch_line

RUN = {"preset": "small", "loader": {"batch_size": 4, "cells_per_view": 32}, "epochs": 3,
       "supervised_epochs": 1, "supervised_min_steps": 0, "freeze_epochs": 0,
       "patience": None, "log_every": 1,
       "tasks": [{"column": "severity", "kind": "ordinal"}]}


@pytest.mark.parametrize(("metrics", "line"), [
    ({"stage": 1, "stage_epoch": 0, "train_loss": 3.46452, "donors_per_s": 137.4,
      "wait_fraction": 0.2859},
     "   stage 1 epoch 1/3  train_loss 3.4645  137 donors/s  waiting 29%"),
    ({"stage": 2, "stage_epoch": 0, "train_loss": 5.4205, "val_loss": 4.02167,
      "val_severity_accuracy": 0.25, "donors_per_s": 1097.9, "wait_fraction": 0.5,
      "lr": 0.001},
     "   stage 2 epoch 1/1  train_loss 5.4205  val_loss 4.022  val_severity_accuracy 0.25  "
     "1,098 donors/s  waiting 50%"),
])
def test_epoch_line(metrics, line):
    assert epoch_line(metrics, {1: 3, 2: 1}) == line


def _epoch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("   stage ")]


def test_an_in_process_run_prints_one_line_per_epoch(store_path, tmp_path, capsys):
    train(store_path, str(tmp_path / "run"), TrainConfig.from_mapping({**RUN, "workers": 1}),
          in_process=True)
    out, err = capsys.readouterr()
    assert [line.strip().split("  ")[0] for line in _epoch_lines(out)] == [
        "stage 1 epoch 1/3", "stage 1 epoch 2/3", "stage 1 epoch 3/3", "stage 2 epoch 1/1"]
    assert "step" not in out + err  # the per-step lines are the bar's, off without a terminal


@pytest.mark.ray
def test_ray_workers_report_to_the_driver_and_log_to_the_run(store_path, ray_cluster,
                                                             tmp_path, capsys):
    run = tmp_path / "run"
    train(store_path, str(run), TrainConfig.from_mapping({**RUN, "workers": 2, "epochs": 2}))
    assert len(_epoch_lines(capsys.readouterr().out)) == 3  # 2 + 1, from rank 0 only
    logs = sorted(p.name for p in (run / "logs").iterdir())
    assert logs == ["rank-0.log", "rank-1.log"]
    first = (run / "logs" / "rank-0.log").read_text()
    assert "epoch stage=1 epoch=0" in first and "Reporting training result 1" in first
    assert "epoch stage=" not in (run / "logs" / "rank-1.log").read_text()


def test_quiet_prints_nothing_but_warnings(capsys):
    try:
        console.configure("quiet")
        console.say("an epoch line")
        assert console.progress(10, "work", "items").disable
        assert console.ray_init_options()["log_to_driver"] is False
        console.configure("verbose")
        assert console.ray_init_options()["log_to_driver"] is True
    finally:
        console.configure("normal")
    assert capsys.readouterr().out == ""
    assert console.progress(10, "work", "items").disable  # no terminal under pytest


def test_quiet_and_verbose_exclude_each_other(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["-q", "-v", "simulate", "--out", str(tmp_path / "x.soma")])
    assert exit_.value.code == 2


@pytest.mark.ray
def test_the_progress_queue_lives_on_the_driver_and_its_loss_never_stops_training(
        ray_cluster, caplog):
    # the queue actor is pinned to the driver's node (a lost worker node cannot take it
    # along); if it is gone anyway, a worker's progress call drops the feed, not the run
    import ray

    from sampleclr_scale.train.progress import TrainingConsole, ray_feed
    from sampleclr_scale.train.session import RaySession

    with ray_feed(TrainingConsole({1: 1})) as events:
        here = ray.get_runtime_context().get_node_id()
        where = events.actor.__ray_call__.remote(
            lambda actor: ray.get_runtime_context().get_node_id())
        assert ray.get(where) == here
        session = object.__new__(RaySession)  # its Ray Train context is not needed here
        session.events = events
        ray.kill(events.actor)
        for _ in range(2):
            session.progress({"kind": "steps", "stage": 1})
        assert session.events is None
        assert caplog.text.count("progress lines stop: the driver's queue is gone") == 1
