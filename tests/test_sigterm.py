"""A SIGTERM'd training driver exits like an interrupted run: status 143, no stack dump,
its lock released and its local Ray's processes gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sampleclr_scale.cluster import psutil_module


@pytest.mark.ray
@pytest.mark.slow  # a minute: a real CLI driver, its own local Ray
def test_sigterm_ends_the_driver_and_its_local_ray(store_path, tmp_path):
    psutil = psutil_module()
    (tmp_path / "t.yaml").write_text("preset: small\nepochs: 500\n"
                                     "loader: {batch_size: 4, cells_per_view: 16}\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen(
        [sys.executable, "-m", "sampleclr_scale.cli", "train", "--store", store_path,
         "--out", str(tmp_path / "run"), "--workers", "1", "--config",
         str(tmp_path / "t.yaml")], env=env, stderr=subprocess.PIPE, text=True)
    try:
        # wait for the training worker: a Ray worker process among the driver's descendants
        deadline, helpers = time.monotonic() + 90, []
        while time.monotonic() < deadline and driver.poll() is None:
            helpers = psutil.Process(driver.pid).children(recursive=True)
            if (tmp_path / "run" / "ray").exists() and any(
                    "RayTrainWorker" in " ".join(p.cmdline()) for p in helpers
                    if p.is_running()):
                break
            time.sleep(0.5)
        assert driver.poll() is None, driver.stderr.read()
        driver.send_signal(signal.SIGTERM)
        rc = driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    err = driver.stderr.read()
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM received" not in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / ".run.lock").exists()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(p.is_running() for p in helpers):
        time.sleep(0.5)
    left = [p.pid for p in helpers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"Ray processes left behind: {left}"
