"""``bench train`` on CPU with a real local Ray: streamed vs device-resident bags."""

from __future__ import annotations

import pytest

from sampleclr_scale.bench.train import bench_train
from sampleclr_scale.cli import build_parser
from sampleclr_scale.errors import InputError


def test_the_command_line_takes_gpu_and_resident_modes():
    args = build_parser().parse_args(["bench", "train", "--store", "S", "--use-gpu",
                                      "--resident", "never", "always", "--json", "x.json"])
    assert args.use_gpu and args.resident == ["never", "always"]
    args = build_parser().parse_args(["bench", "train", "--store", "S", "--json", "x.json"])
    assert not args.use_gpu and args.resident is None  # the config's default
    assert not args.in_process
    args = build_parser().parse_args(["bench", "train", "--store", "S", "--in-process",
                                      "--workers", "1", "--json", "x.json"])
    assert args.in_process


@pytest.mark.ray
def test_bench_train_measures_streamed_and_resident_bags(store_path, ray_cluster):
    figures = bench_train(store_path, workers=[1], preset="small", batch_size=4,
                          cells_per_view=20, epochs=2, resident=["never", "always"])
    assert figures["device"] == "cpu" and not figures["use_gpu"]
    assert [(r["workers"], r["resident"]) for r in figures["runs"]] == [(1, "never"),
                                                                        (1, "always")]
    for run in figures["runs"]:
        assert run["donors_per_s"] > 0 and 0 <= run["waiting_for_data"] <= 1
        assert run["step_s"] == pytest.approx(4 / run["donors_per_s"], rel=1e-2)
        assert "gpu_peak_mb" not in run  # CPU workers


def test_in_process_bench_train_needs_no_ray(store_path, monkeypatch):
    # the offline GPU check's mode (a machine Ray cannot be carried to): one worker in
    # this process, and nothing it runs imports Ray
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails
    figures = bench_train(store_path, workers=[1], preset="small", batch_size=4,
                          cells_per_view=20, epochs=2, in_process=True)
    assert figures["in_process"] and figures["device"] == "cpu"
    (run,) = figures["runs"]
    assert run["resident"] == "auto"  # the config's default
    assert run["donors_per_s"] > 0 and 0 <= run["waiting_for_data"] <= 1
    with pytest.raises(InputError, match="in-process training has one worker, not"):
        bench_train(store_path, workers=[2], preset="small", batch_size=4,
                    cells_per_view=20, epochs=1, in_process=True)
