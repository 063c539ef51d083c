"""Which Ray the stages run on: the cluster named by ``RAY_ADDRESS``, else a local one.

A local Ray listens on the loopback interface only (127.0.0.1): its GCS, raylet, workers,
agents and the driver are reachable from this machine alone, and it has no dashboard.
Ray binds its servers to every interface unless the node's address is a loopback one, and
``ray.init`` replaces a loopback node address by the machine's own; :func:`start_local_ray`
keeps it (:func:`_loopback_node`). A cluster is joined only when the user names one
(``RAY_ADDRESS``, set by ``ray job submit`` and on cluster nodes).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from sampleclr_scale.errors import InputError

# A training worker runs more threads (Ray's, torch's, the loader's) than glibc's default
# limit of 8 malloc arenas per core. Measured on the 1M-cell bench cohort, 2 workers, 10
# epochs: worker peak RSS 1,485-1,652 MB with the default (or 16) arenas, 1,210-1,305 MB
# with 2 (and 1,230 MB with 64); 25 epochs: 1,740 MB against 1,281 MB. Throughput was
# the same. The processes of a local Ray (raylet, and every worker of every job) get 2
# unless the variable is set; the container images set it for cluster nodes.
MALLOC_ARENAS = ("MALLOC_ARENA_MAX", "2")

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
"""The only address a local Ray listens on."""


def ensure_ray() -> None:
    """Connect to Ray unless this process already is.

    ``RAY_ADDRESS`` names the cluster to join; without it a new local Ray starts on this
    machine's CPUs, listening on the loopback interface only (:func:`start_local_ray`).
    A cluster that some other process left running (or a stale address file of a dead
    one) is never joined by accident. Ray's own output follows the console's verbosity
    (:func:`~sampleclr_scale.console.ray_init_options`).
    """
    import ray

    from sampleclr_scale.console import ray_init_options

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if not is_local():
        join_ray(address, **ray_init_options())
    else:
        os.environ.setdefault(*MALLOC_ARENAS)  # inherited by the Ray it starts
        start_local_ray(**ray_init_options())
    exit_on_sigterm()


def join_ray(address: str, **options: Any) -> None:
    """Join the Ray at ``address`` as a driver.

    A Ray listening on the loopback interface only (a local Ray that another process
    started, e.g. a benchmark's stage drivers joining the benchmark's Ray) is joined with
    a loopback node address: ``ray.init`` would otherwise replace ``127.0.0.1`` in the
    address by the machine's network address, where nothing listens, and wait forever.
    """
    import ray

    if address.partition(":")[0] != LOOPBACK:
        ray.init(address=address, include_dashboard=False, **options)
        return
    with _loopback_node():
        ray.init(address=address, include_dashboard=False, _node_ip_address=LOOPBACK,
                 **options)


_terminated_by: int | None = None
"""The signal :func:`exit_on_sigterm`'s handler received, if any."""


def terminated_by() -> int | None:
    """The signal that ended this process's work (SIGTERM), or None.

    Ray turns an exception raised while it waits (``ray.get``) into ``SystemExit(1)``;
    the command line reads this to exit with ``128 + signal`` all the same.
    """
    return _terminated_by


def exit_on_sigterm() -> None:
    """Make SIGTERM end this process as an exception would: locks released, staging
    removed, and Ray shut down by its exit hook (a local Ray's processes with it), exit
    status 143.

    ``ray.init`` leaves SIGTERM to a C++ handler that dumps a stack trace and aborts
    (status 134), skipping all of that and leaving the local Ray's processes behind.
    Only the main thread can set a handler; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def terminate(signum: int, _frame: Any) -> None:
        global _terminated_by
        _terminated_by = signum
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)


def local_ray_options() -> dict[str, Any]:
    """The ``ray.init`` options of a local Ray on the loopback interface, no dashboard."""
    return {"address": "local", "include_dashboard": False, "dashboard_host": LOOPBACK,
            "_node_ip_address": LOOPBACK}


def start_local_ray(**options: Any) -> None:
    """Start a new local Ray in this process that listens on 127.0.0.1 only.

    Parameters
    ----------
    **options
        More ``ray.init`` options (``num_cpus``, logging); the address and network
        settings of :func:`local_ray_options` are not to be changed.
    """
    import ray

    clash = sorted(options.keys() & local_ray_options().keys())
    if clash:
        raise ValueError(f"start_local_ray sets {clash} itself")
    for name, value in loopback_environment().items():  # inherited by Ray's workers
        os.environ.setdefault(name, value)
    with _loopback_node():
        ray.init(**local_ray_options(), **options)
    global _local_address
    _local_address = ray.get_runtime_context().gcs_address


def loopback_environment() -> dict[str, str]:
    """The variables that keep torch's collectives (gloo, NCCL) on the loopback
    interface: its name under ``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME``."""
    names = [name for name, addresses in psutil_module().net_if_addrs().items()
             if any(a.address == LOOPBACK for a in addresses)]
    if not names:
        return {}
    return {"GLOO_SOCKET_IFNAME": names[0], "NCCL_SOCKET_IFNAME": names[0]}


def psutil_module() -> ModuleType:
    """``psutil``: Ray's vendored copy, which importing Ray puts on the path."""
    import ray  # noqa: F401

    return importlib.import_module("psutil")


@contextmanager
def _loopback_node() -> Iterator[None]:
    """Keep a loopback node address as it is while Ray starts.

    ``ray.init`` passes its node address through ``resolve_ip_for_localhost``, which
    turns 127.0.0.1 into the machine's network address, and Ray's servers then bind to
    every interface. Ray's processes bind to the loopback interface when the node address
    they are given is a loopback one, so that resolution is skipped for the call.
    """
    from ray._private import services

    resolve = services.resolve_ip_for_localhost

    def keep_loopback(host: str) -> str:
        return host if host == LOOPBACK else resolve(host)

    services.resolve_ip_for_localhost = keep_loopback
    try:
        yield
    finally:
        services.resolve_ip_for_localhost = resolve


_local_address: str | None = None
"""The GCS address of the local Ray that :func:`start_local_ray` started, if any."""


def is_local() -> bool:
    """Whether the stages run on a local Ray of this process: the one
    :func:`start_local_ray` started, or, before Ray is connected, the one
    :func:`ensure_ray` would start (no ``RAY_ADDRESS``). A Ray that other code connected
    to (``ray.init(address=...)``) counts as a cluster."""
    import ray

    if ray.is_initialized():
        return _local_address is not None and (
            ray.get_runtime_context().gcs_address == _local_address)
    return not os.environ.get("RAY_ADDRESS")


def check_resources(workers: int, use_gpu: bool = False, option: str = "--workers") -> None:
    """Refuse a run that asks a local Ray for more than this machine has, before asking
    (Ray would wait for the resources forever).

    On a local Ray the machine is all there is: a worker takes one CPU, or with ``use_gpu``
    one GPU (and no CPU), as Ray Train's ``ScalingConfig`` asks. A cluster may grow (an
    autoscaler adds GPU nodes from none, as ``deploy/ray-cluster.yaml``'s do), so there
    what it lacks now is only logged. ``option`` is the setting that asked for the
    ``workers`` (named in the error).

    Raises
    ------
    InputError
        Naming what is missing and the fix.
    """
    import ray

    ensure_ray()
    total = ray.cluster_resources()
    have = int(total.get("GPU" if use_gpu else "CPU", 0))
    if have >= workers:
        return
    if not is_local():
        log.warning("the Ray cluster has %d %s now, the run asks for %d: it waits until "
                    "the cluster has them", have, "GPUs" if use_gpu else "CPUs", workers)
        return
    if use_gpu:
        raise InputError(f"--use-gpu asks for {workers} GPU(s) (one per worker); this "
                         f"machine's Ray has {have}",
                         "train without --use-gpu, or with --workers at most the GPUs "
                         "(nvidia-smi lists them)")
    raise InputError(f"{option} {workers} asks for {workers} CPUs (one per worker); this "
                     f"machine's Ray has {have}",
                     f"use {option} {max(have, 1)} or fewer, or join a cluster with more "
                     "(RAY_ADDRESS=...)")
