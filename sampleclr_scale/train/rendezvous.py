"""How the workers of a local run find each other without a network listener.

Ray Train's ``TorchConfig`` rendezvous through a ``TCPStore`` that rank 0 serves on every
network interface (torch binds it to all of them). On a local Ray every worker runs on
this machine, so :class:`LocalTorchConfig` rendezvous through a ``FileStore`` in a
private folder instead, and gloo and NCCL connect over the loopback interface
(``GLOO_SOCKET_IFNAME``, ``NCCL_SOCKET_IFNAME``, set by
:func:`~sampleclr_scale.cluster.start_local_ray`). A run on a
named cluster keeps Ray's ``TorchConfig``.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

from ray.train.torch import TorchConfig
from ray.train.torch.config import _setup_torch_process_group, _TorchBackend


@dataclass
class LocalTorchConfig(TorchConfig):
    """``TorchConfig`` whose workers rendezvous through a file under ``folder`` (a local
    folder every worker can write: all of them run on this machine)."""

    folder: str = ""

    @property
    def backend_cls(self) -> type:
        return _FileRendezvous


class _FileRendezvous(_TorchBackend):
    """Ray Train's torch backend with a ``FileStore`` rendezvous (a new file every time
    the worker group starts, e.g. after a worker failed)."""

    def on_start(self, worker_group: Any, backend_config: LocalTorchConfig) -> None:
        import ray
        from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
        from ray.train.torch.config import _set_torch_distributed_env_vars

        backend = backend_config.backend or "gloo"
        store = os.path.join(backend_config.folder, f"rendezvous-{uuid.uuid4().hex}")
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(
            rank, _setup_torch_process_group, backend=backend, world_rank=rank,
            world_size=len(worker_group), init_method=f"file://{store}",
            timeout_s=backend_config.timeout_s) for rank in range(len(worker_group))])
