"""Which Ray the stages run on: the cluster named by ``RAY_ADDRESS``, else a local one."""

from __future__ import annotations

import os

# A training worker runs more threads (Ray's, torch's, the loader's) than glibc's default
# limit of 8 malloc arenas per core. Measured on the 1M-cell bench cohort, 2 workers, 10
# epochs: worker peak RSS 1,485-1,652 MB with the default (or 16) arenas, 1,210-1,305 MB
# with 2 (and 1,230 MB with 64); 25 epochs: 1,740 MB against 1,281 MB. Throughput was
# the same. The processes of a local Ray (raylet, and every worker of every job) get 2
# unless the variable is set; the container images set it for cluster nodes.
MALLOC_ARENAS = ("MALLOC_ARENA_MAX", "2")


def ensure_ray() -> None:
    """Connect to Ray unless this process already is.

    ``RAY_ADDRESS`` (set by ``ray job submit`` and on cluster nodes) names the cluster to
    join; without it a new local Ray starts on this machine's CPUs. A cluster that some
    other process left running (or a stale address file of a dead one) is never joined
    by accident. Ray's own output follows the console's verbosity
    (:func:`~sampleclr_scale.console.ray_init_options`).
    """
    import ray

    from sampleclr_scale.console import ray_init_options

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if not address:
            os.environ.setdefault(*MALLOC_ARENAS)  # inherited by the Ray it starts
        ray.init(address=address or "local", include_dashboard=False, **ray_init_options())
