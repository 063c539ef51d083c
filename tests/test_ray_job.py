"""The commands as cluster jobs: ``ray job submit -- sampleclr-scale train/embed`` with
the store, the run and the embeddings on S3.

A Ray head started with ``ray start --head`` (dashboard and job server included, token
authentication as Ray enables it by default) runs the submitted entrypoints as Ray jobs,
the way a ``ray up`` or KubeRay cluster does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from sampleclr_scale.storage import Location
from tests.storage.test_storage import upload_store

BIN = Path(sys.executable).parent  # ray and sampleclr-scale of this environment
TRAIN_YAML = """
preset: small
loader: {batch_size: 2, cells_per_view: 32, seed: 1}
epochs: 2
tasks: [{column: severity, kind: ordinal}]
supervised_epochs: 1
supervised_min_steps: 0
log_every: 100
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head(tmp_path):
    """A Ray head in its own process group; yields the job server's address.

    Every service gets a free port of its own: the session's local Ray (other tests) holds
    the default ports, and a job agent that cannot bind its port leaves the job server
    without an agent.
    """
    dashboard = _free_port()
    ports = [f"--{name}-port={_free_port()}" for name in (
        "dashboard-agent-listen", "dashboard-agent-grpc", "metrics-export", "runtime-env-agent",
        "ray-client-server", "node-manager", "object-manager")]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={_free_port()}",
         f"--dashboard-port={dashboard}", *ports, "--dashboard-host=127.0.0.1",
         "--include-dashboard=true", "--num-cpus=2", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "ray_start.log", "w"))  # noqa: SIM115 (closed with the process)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, (tmp_path / "ray_start.log").read_text()
            try:
                requests.get(f"{address}/api/version", timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "the job server did not start"
                time.sleep(0.5)
        yield address
    finally:  # stops this head's processes only, not other Ray instances on the machine
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _submit(address: str, working_dir: Path, *command: str) -> str:
    """Run ``sampleclr-scale COMMAND`` as a Ray job; return the job's log."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token"}  # the client presents the head's token
    deadline = time.monotonic() + 90
    while True:
        done = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir",
             str(working_dir), "--", "sampleclr-scale", *command],
            env=env, capture_output=True, text=True, timeout=600)
        # the job server answers a few seconds before the head's job agent is up
        if "No available agent" not in done.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_trains_and_embeds_on_s3(head, store_path, bucket, tmp_path):
    store, run, emb = f"{bucket}/bags.zarr", f"{bucket}/runs/job", f"{bucket}/emb/job"
    upload_store(store_path, store)
    jobdir = tmp_path / "job"  # the job's working directory, uploaded by `ray job submit`
    jobdir.mkdir()
    (jobdir / "train.yaml").write_text(TRAIN_YAML)

    log = _submit(head, jobdir, "train", "--store", store, "--out", run,
                  "--config", "train.yaml", "--workers", "2")
    assert f'"run": "{run}"' in log
    history = [json.loads(line) for line in
               (Location(run) / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 3 and history[-1]["stage"] == 2

    results = tmp_path / "results_exp"  # the SOMA write-back target
    _submit(head, jobdir, "embed", "--store", store, "--checkpoint", run, "--out", emb,
            "--cells", "50", "--write-back", str(results))
    provenance = json.loads((Location(emb) / "provenance.json").read_text())
    assert provenance["checkpoint"] == run and provenance["store"] == store
    assert (Location(store) / "embeddings" / "job").is_zarr_group()
