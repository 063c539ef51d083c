"""A local Ray listens on the loopback interface only, training workers included; it
refuses what the machine does not have instead of waiting for it."""

from __future__ import annotations

import ipaddress
import threading

import pytest

from sampleclr_scale.cluster import psutil_module
from sampleclr_scale.config import TrainConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.train.driver import train

TINY = {"preset": "small", "loader": {"batch_size": 4, "cells_per_view": 16, "seed": 1},
        "epochs": 2, "workers": 2, "log_every": 100, "seed": 1}


def _listening(seen: set[tuple[str, str, int]]) -> None:
    """Add every listening TCP socket of this process and its descendants (the local Ray:
    GCS, raylet, agents, workers) to ``seen`` as (process, address, port)."""
    psutil = psutil_module()
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            name = process.name()
            for conn in process.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    seen.add((name, conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


@pytest.mark.ray
def test_local_ray_listens_on_loopback_only(store_path, ray_cluster, tmp_path):
    # the sockets are collected while a 2-worker run trains (its workers' gloo and gRPC
    # servers exist only then) and once more after it
    seen: set[tuple[str, str, int]] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            _listening(seen)
            done.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        train(store_path, str(tmp_path / "run"), TrainConfig.from_mapping(TINY))
    finally:
        done.set()
        watcher.join()
    _listening(seen)
    names = {name for name, _, _ in seen}
    assert {"gcs_server", "raylet"} <= names, names  # the probe sees Ray's processes
    exposed = sorted(s for s in seen if not _is_loopback(s[1]))
    assert not exposed, f"listening beyond the loopback interface: {exposed}"


@pytest.mark.ray
def test_more_workers_than_cpus_fail_fast(store_path, ray_cluster, tmp_path):
    # the local Ray has 2 CPUs: 3 workers would wait forever
    config = TrainConfig.from_mapping({**TINY, "workers": 3,
                                       "loader": {**TINY["loader"], "batch_size": 2}})
    with pytest.raises(InputError, match=r"(?s)--workers 3 asks for 3 CPUs.*has 2.*fix: use "
                                         r"--workers 2 or fewer"):
        train(store_path, str(tmp_path / "run"), config)
    assert not (tmp_path / "run" / "train_config.json").exists()


@pytest.mark.ray
def test_use_gpu_without_a_gpu_fails_fast(store_path, ray_cluster, tmp_path):
    import ray

    if ray.cluster_resources().get("GPU", 0) >= 2:
        pytest.skip("this machine's Ray has GPUs")
    config = TrainConfig.from_mapping({**TINY, "use_gpu": True})
    with pytest.raises(InputError, match=r"(?s)--use-gpu asks for 2 GPU.*fix: train "
                                         r"without --use-gpu"):
        train(store_path, str(tmp_path / "run"), config)


def _join_and_run() -> tuple[bool, int]:
    """In a fresh process with ``RAY_ADDRESS`` set: join, run a task."""
    import ray

    from sampleclr_scale.cluster import ensure_ray, is_local

    ensure_ray()
    return is_local(), ray.get(ray.remote(lambda: 41).remote()) + 1


@pytest.mark.ray
def test_a_second_driver_joins_the_local_ray(ray_cluster):
    """A driver started with ``RAY_ADDRESS`` of the loopback-only local Ray (as the scale
    benchmark's stage drivers are) joins it instead of waiting for its address on the
    machine's network interface."""
    import ray

    from sampleclr_scale.bench import run_in_child

    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:")
    # a few seconds to reach the GCS, so that a driver looking in the wrong place fails
    env = {"RAY_ADDRESS": address, "RAY_gcs_server_port_wait_time_s": "5"}
    local, answer = run_in_child(_join_and_run, env=env)
    assert (local, answer) == (False, 42)  # a Ray it joined counts as a cluster
