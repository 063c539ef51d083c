"""A prior stored in its bag store: one Zarr group per kind.

Layout::

    STORE/priors/<kind>/        attributes: kind, params, n_donors, created, timings
      rows, cols                int64 [n_entries], COO coordinates (both triangles and
                                the diagonal)
      values                    float32 [n_entries], similarities

A prior is written into a temporary sibling directory and renamed into place, so readers
see the old prior or the complete new one, never a partial one.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import zarr

from sampleclr_scale import __version__
from sampleclr_scale._types import PRIOR_KINDS
from sampleclr_scale.errors import InputError
from sampleclr_scale.prior.graph import PriorGraph
from sampleclr_scale.storage import Location, staged_output
from sampleclr_scale.storage.outputs import zarr_output
from sampleclr_scale.store.bag_store import BagStore

PRIORS_GROUP = "priors"
PRIOR = zarr_output("a prior", ("kind", "params", "n_donors"), "rows")
"""What saving a prior replaces (``STORE/priors/<kind>``)."""


def save_prior(store_path: str, prior: PriorGraph) -> Location:
    """Store ``prior`` in the bag store under ``priors/<kind>/``, replacing one atomically.

    Parameters
    ----------
    store_path : str
        Bag store the prior was built from.
    prior : PriorGraph
        The prior.

    Returns
    -------
    Location
        The prior's Zarr group.
    """
    store = BagStore(store_path)
    _check_kind(prior.kind)
    if prior.n_donors != store.n_donors:
        raise InputError(
            f"a prior of {prior.n_donors} donors does not fit bag store {store.location} "
            f"of {store.n_donors} donors",
            f"build it from this store: `sampleclr-scale prior --store {store.location} "
            f"--kind {prior.kind}`",
        )
    priors_dir = store.location / PRIORS_GROUP
    priors_dir.open_group("a")  # a Zarr group, so the store lists it
    final = priors_dir / prior.kind
    with staged_output(final, overwrite=True, kind=PRIOR) as staging:
        group = zarr.open_group(str(staging), mode="w-")
        group.create_array("rows", data=np.asarray(prior.rows, dtype=np.int64))
        group.create_array("cols", data=np.asarray(prior.cols, dtype=np.int64))
        group.create_array("values", data=np.asarray(prior.values, dtype=np.float32))
        group.attrs.update({
            "kind": prior.kind,
            "params": prior.params,
            "n_donors": prior.n_donors,
            "timings": prior.timings,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "created_by": f"sampleclr-scale {__version__}",
        })
    return final


def load_prior(store_path: str, kind: str) -> PriorGraph:
    """Read the ``kind`` prior stored in a bag store.

    Parameters
    ----------
    store_path : str
        Bag store.
    kind : str
        ``pseudobulk`` or ``gloscope``.

    Returns
    -------
    PriorGraph
        The stored prior.
    """
    store = BagStore(store_path)
    _check_kind(kind)
    location = store.location / PRIORS_GROUP / kind
    rebuild = f"`sampleclr-scale prior --store {store.location} --kind {kind}`"
    if not location.is_zarr_group():
        raise InputError(f"bag store {store.location} has no {kind} prior",
                         f"build it with {rebuild}")
    group = location.open_group("r")
    attrs = dict(group.attrs)
    if attrs["n_donors"] != store.n_donors:
        raise InputError(
            f"the {kind} prior in {store.location} has {attrs['n_donors']} donors, the store "
            f"{store.n_donors} (the store was rebuilt after the prior)",
            f"rebuild the prior with {rebuild}",
        )
    return PriorGraph(n_donors=int(attrs["n_donors"]), rows=group["rows"][:],
                      cols=group["cols"][:], values=group["values"][:], kind=attrs["kind"],
                      params=dict(attrs["params"]), timings=dict(attrs["timings"]))


def available_priors(store_path: str) -> list[str]:
    """Kinds of the priors stored in a bag store, sorted."""
    priors_dir = BagStore(store_path).location / PRIORS_GROUP
    return [kind for kind in sorted(PRIOR_KINDS) if (priors_dir / kind).is_zarr_group()]


def _check_kind(kind: str) -> None:
    if kind not in PRIOR_KINDS:
        raise InputError(f"unknown prior kind {kind!r}", f"use one of {', '.join(PRIOR_KINDS)}")
