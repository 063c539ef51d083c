"""Per-process peak memory of benchmark stages: real processes, real /proc counters."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

from sampleclr_scale.bench import memory
from sampleclr_scale.bench.memory import ProcessPeaks

MB = 1 << 20


def _hold(megabytes: int, seconds: float) -> None:
    block = np.ones(megabytes * MB, dtype=np.uint8)  # ones, so every page is touched
    time.sleep(seconds)
    del block


def _rss_kb() -> int:
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def test_a_spawned_child_is_measured_under_its_role():
    context = multiprocessing.get_context("spawn")
    with ProcessPeaks(interval=0.05) as peaks:
        child = context.Process(target=_hold, args=(200, 1.0))
        child.start()
        child.join()
    assert child.exitcode == 0
    summary = peaks.summary()
    assert summary["spawned worker"]["processes"] >= 1
    assert summary["spawned worker"]["peak_rss_mb"] >= 200
    assert summary["driver"]["processes"] == 1


def test_the_peak_before_the_stage_is_not_counted():
    before_kb = _rss_kb()
    _hold(300, 0.0)
    assert memory.peak_rss_kb(os.getpid()) >= before_kb + 250 * 1024
    with ProcessPeaks() as peaks:
        pass
    assert peaks.summary()["driver"]["peak_rss_mb"] < (before_kb / 1024) + 150


def test_the_descendants_of_a_process_include_grandchildren():
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=_spawn_and_wait)
    child.start()
    try:
        deadline = time.monotonic() + 30
        while len(memory.descendants(os.getpid())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        found = memory.descendants(os.getpid())
        assert child.pid in found
        assert len(found) >= 2
    finally:
        child.join()


def _spawn_and_wait() -> None:
    grandchild = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(2.0,))
    grandchild.start()
    grandchild.join()


@pytest.mark.parametrize(("argv", "expected"), [
    (["ray::RayTrainWorker.train_fn", ""], "ray::RayTrainWorker"),
    (["ray::_EmbedActor.embed_batch()", ""], "ray::_EmbedActor"),
    (["ray::IDLE", ""], "ray::IDLE"),
    (["/venv/bin/python", "-c", "from multiprocessing.spawn import spawn_main; "
      "spawn_main(tracker_fd=5, pipe_handle=7)", "--multiprocessing-fork"], "spawned worker"),
    (["/venv/lib/ray/core/src/ray/raylet/raylet", "--node_ip_address=127.0.0.1"], "raylet"),
    (["/venv/bin/python3.11", "-u", "/venv/lib/ray/_private/log_monitor.py", "--x=1"],
     "log_monitor.py"),
    (["/venv/bin/python", "-m", "ray.dashboard.agent", "--port=1"], "ray.dashboard.agent"),
])
def test_roles_come_from_the_command_line(tmp_path, monkeypatch, argv, expected):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cmdline").write_bytes("\0".join(argv).encode())
    monkeypatch.setattr(memory, "PROC", tmp_path)
    assert memory.role(42) == expected


def _map_file(path: str, seconds: float) -> None:
    """Map a file and touch every page: file pages in the RSS, not anonymous memory."""
    import mmap

    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as m:
        np.frombuffer(m, dtype=np.uint8).sum()
        time.sleep(seconds)


def test_mapped_file_pages_count_in_the_rss_but_not_as_anonymous_memory(tmp_path):
    path = tmp_path / "store.bin"
    path.write_bytes(np.ones(150 * MB, dtype=np.uint8).tobytes())
    context = multiprocessing.get_context("spawn")
    with ProcessPeaks(interval=0.05) as peaks:
        child = context.Process(target=_map_file, args=(str(path), 1.0))
        child.start()
        child.join()
        anon = context.Process(target=_hold, args=(150, 1.0))
        anon.start()
        anon.join()
    assert child.exitcode == anon.exitcode == 0
    worker = peaks.summary()["spawned worker"]
    assert worker["processes"] >= 2 and worker["peak_rss_mb"] >= 150
    assert worker["peak_anon_mb"] >= 150  # the second child's array
    mapped_anon = max(peaks._anon_kb[pid] for pid, kb in peaks._peak_kb.items()
                      if kb >= 150 * 1024 and peaks._anon_kb[pid] < 100 * 1024)
    assert mapped_anon < 100 * 1024  # the mapping child: 150 MB of RSS, little of it its own
