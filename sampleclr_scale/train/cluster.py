"""Which Ray the stages run on: the cluster named by ``RAY_ADDRESS``, else a local one."""

from __future__ import annotations

import os


def ensure_ray() -> None:
    """Connect to Ray unless this process already is.

    ``RAY_ADDRESS`` (set by ``ray job submit`` and on cluster nodes) names the cluster to
    join; without it a new local Ray starts on this machine's CPUs. A cluster that some
    other process left running (or a stale address file of a dead one) is never joined
    by accident.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
