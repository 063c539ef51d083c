"""Device-resident bags: a cohort's features loaded once into the training device's memory,
and the streaming loader's two-view batches drawn there by index.

When a cohort fits on the accelerator (50M cells x 50 dimensions take 5 GB in bfloat16),
reading it from the store every step is wasted work: :func:`load_features` copies the
store's ``features`` onto the device once, in blocks, and :class:`ResidentBags` yields the
same :class:`~sampleclr_scale.loading.loader.DonorBatch` es as the streaming
:class:`~sampleclr_scale.loading.loader.DonorBagDataset` for the same seed, epoch, rank and
world size: the donors of each step come from its
:meth:`~sampleclr_scale.loading.loader.DonorBagDataset.schedule`, each donor's rows from
:func:`~sampleclr_scale.loading.views.view_rows` (both the sampler's choice). Per batch only
the row index (int64 ``[B, 2, m]``), its mask and the donors' ids, labels and batch codes
travel to the device, and one gather there builds the views, corrected as the streamed
ones are when asked: standardised per technical batch, or mapped per (batch, cell type)
(:mod:`~sampleclr_scale.store.type_batches`, with the cells' type codes held on the device
too, e.g. 100 MB of int16 for 50M cells). The rows are chosen in a background thread,
``LoaderConfig.prefetch`` batches ahead.

``LoaderConfig.resident`` decides: :func:`use_resident`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from sampleclr_scale.config import LoaderConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.loading.loader import (
    TYPE_MODE,
    DonorBagDataset,
    DonorBatch,
    prefetch,
)
from sampleclr_scale.loading.rows import view_index
from sampleclr_scale.loading.views import open_view_draw, views_of
from sampleclr_scale.store.bag_store import BagStore

log = logging.getLogger(__name__)

RESIDENT_FRACTION = 0.5
"""``resident: auto`` keeps the features on a GPU when they take less than this share of
its free memory (the rest is for the model, the batches and the allocator)."""
LOAD_BLOCK_ROWS = 262_144
"""Rows copied onto the device at a time by :func:`load_features` (52 MB at d = 50)."""
_STORE_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}


def resident_dtype(store: BagStore, config: LoaderConfig) -> torch.dtype:
    """The type the features are held in on the device (``LoaderConfig.resident_dtype``)."""
    if config.resident_dtype == "bfloat16":
        return torch.bfloat16
    return _STORE_DTYPES[np.dtype(store.features.dtype)]


def feature_bytes(store: BagStore, dtype: torch.dtype) -> int:
    """Bytes of the store's features held in ``dtype``."""
    return store.n_cells * store.dim * dtype.itemsize


def choose_resident(mode: str, device_type: str, need: int, free: int) -> bool:
    """Whether training holds the features on its device (``LoaderConfig.resident``).

    Parameters
    ----------
    mode
        ``auto``, ``always`` or ``never``.
    device_type
        The training device's type (``cuda``, ``cpu``).
    need, free
        Bytes the features take on the device, and the device's free memory (ignored
        off CUDA).

    Raises
    ------
    InputError
        For ``always`` on a GPU with less free memory than the features need.
    """
    if mode == "never" or (mode == "auto" and device_type != "cuda"):
        return False
    if device_type != "cuda":
        return True
    if mode == "always" and need > free:
        raise InputError(f"the cohort's features take {need / 2**30:.1f} GiB, the GPU has "
                         f"{free / 2**30:.1f} GiB free",
                         "set loader.resident to auto or never, or loader.resident_dtype to "
                         "bfloat16")
    return mode == "always" or need < RESIDENT_FRACTION * free


def use_resident(store: BagStore, config: LoaderConfig, device: torch.device) -> bool:
    """Whether training on ``device`` holds ``store``'s features there
    (:func:`choose_resident` with the device's free memory now)."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    return choose_resident(config.resident, device.type,
                           feature_bytes(store, resident_dtype(store, config)), free)


def load_features(store: BagStore, device: torch.device, dtype: torch.dtype,
                  block_rows: int = LOAD_BLOCK_ROWS) -> torch.Tensor:
    """The store's features as one ``[n_cells, d]`` tensor of ``dtype`` on ``device``,
    read and copied ``block_rows`` rows at a time (host memory holds one block)."""
    start = time.perf_counter()
    features = torch.empty((store.n_cells, store.dim), dtype=dtype, device=device)
    for lo in range(0, store.n_cells, block_rows):
        hi = min(lo + block_rows, store.n_cells)
        features[lo:hi].copy_(torch.from_numpy(np.ascontiguousarray(store.features[lo:hi])))
    log.info("features of %s resident on %s: %.2f GB of %s in %.1f s", store.location,
             device, feature_bytes(store, dtype) / 1e9, dtype, time.perf_counter() - start)
    return features


class ResidentBags(DonorBagDataset):
    """A split's two-view donor bags drawn from features held on a device.

    Takes the parameters of :class:`~sampleclr_scale.loading.loader.DonorBagDataset`, and
    yields its batches (iterate it directly, not through a DataLoader), with every tensor
    on the features' device.

    Parameters
    ----------
    features
        The store's features on the device (:func:`load_features`), shared by the splits.
    """

    def __init__(self, store_path: str, config: LoaderConfig, *, features: torch.Tensor,
                 split: str = "train", tasks: dict[str, str] | None = None,
                 rank: int | None = None, world_size: int | None = None,
                 standardize: bool | str | None = False) -> None:
        self.features = features
        self.device = features.device
        super().__init__(store_path, config, split=split, tasks=tasks, rank=rank,
                         world_size=world_size, standardize=standardize)

    def _opened(self, store: BagStore) -> None:
        super()._opened(store)
        if tuple(self.features.shape) != (store.n_cells, store.dim):
            raise InputError(f"resident features of shape {tuple(self.features.shape)} are "
                             f"not those of {store.location} ({store.n_cells}, {store.dim})",
                             "load them with load_features from the same store")
        # the codes' reader is the process's own, kept whole: the splits share one copy
        self._views = open_view_draw(store, self.balance,
                                     strength=self.config.balance_strength)
        self._donor_batch = store.donor_batch
        self._stats = None if not self.standardize or self.standardize == TYPE_MODE else tuple(
            torch.from_numpy(s).to(self.device) for s in store.batch_stats)
        self._type_maps = None if self.standardize != TYPE_MODE else _TypeMaps.of(
            store, self.device)

    def __iter__(self) -> Iterator[DonorBatch]:
        store = BagStore(self.store_path, check=False)  # checked in __init__
        labels = {c: store.labels(c, kind)[0] for c, kind in self.tasks.items()}
        batches, steps = self.schedule()
        drawn = prefetch(lambda: self._draws(store, batches, labels, steps),
                         self.config.prefetch)
        return (self._gather(batch) for batch in drawn)

    def _draws(self, store: BagStore, batches: np.ndarray, labels: dict[str, np.ndarray],
               steps: range) -> Iterator[DonorBatch]:
        """The epoch's batches chosen on the host (:meth:`_draw`), in the prefetch thread."""
        if self.device.type == "cuda":  # a new thread's GPU is GPU 0: pin memory on ours
            torch.cuda.set_device(self.device)
        for step in steps:
            yield self._draw(store, batches[step], labels, step)

    def _draw(self, store: BagStore, donors: np.ndarray, labels: dict[str, np.ndarray],
              step: int) -> DonorBatch:
        """A batch chosen on the host (in the prefetch thread, in page-locked memory for a
        GPU), holding each cell's store row (int64 ``[B, 2, m]``) in place of its
        features."""
        views = views_of(store, donors, seed=self.config.seed, epoch=self.epoch,
                         view_range=self.config.view_range, draw=self._views)
        index, mask = view_index(views, self.config.view_range[1])
        drawn = DonorBatch(
            cells=torch.from_numpy(index),
            mask=torch.from_numpy(mask),
            donor=torch.from_numpy(donors.astype(np.int64)),
            labels={c: torch.from_numpy(v[donors]) for c, v in labels.items()},
            batch=None if self._donor_batch is None
            else torch.from_numpy(self._donor_batch[donors].astype(np.int64)),
            epoch=self.epoch,
            step=step,
        )
        return drawn.pin_memory() if self.device.type == "cuda" else drawn

    def _gather(self, drawn: DonorBatch) -> DonorBatch:
        """A drawn batch on the device with its features: one gather of the rows,
        corrected when asked (the streaming loader's float32 arithmetic, operation for
        operation), padding zero."""
        batch = drawn.to(self.device)
        index = batch.cells
        cells = self.features.index_select(0, index.reshape(-1))
        cells = cells.reshape(*index.shape, -1).float()
        if self._stats is not None:
            mean, std = (s[batch.batch][:, None, None] for s in self._stats)
            cells = (cells - mean) / std
        elif self._type_maps is not None:
            scale, offset = self._type_maps.rows(index, batch.batch)
            cells = cells * scale + offset
        return replace(batch, cells=cells.masked_fill_(~batch.mask[..., None], 0.0))


@dataclass(frozen=True)
class _TypeMaps:
    """The per-(batch, cell type) maps on the device, with every cell's type code."""

    scale: torch.Tensor
    """Float32 ``[n_batches * (K + 1), d]`` (:func:`~sampleclr_scale.store.type_batches
    .pair_index` rows)."""
    offset: torch.Tensor
    codes: torch.Tensor
    """Each store row's cell-type code (-1: none), in the store's integer type."""
    n_types: int

    @classmethod
    def of(cls, store: BagStore, device: torch.device) -> _TypeMaps:
        scale, offset, column = store.batch_type_maps
        flat = (torch.from_numpy(a.reshape(-1, a.shape[-1])).to(device) for a in (scale, offset))
        codes = torch.from_numpy(np.asarray(store.codes(column)[:])).to(device)
        return cls(*flat, codes=codes, n_types=scale.shape[1] - 1)

    def rows(self, index: torch.Tensor, batch: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and offset (``[*index.shape, d]``) of the cells at store rows
        ``index`` (``[B, 2, m]``) of donors in batches ``batch`` (``[B]``)."""
        types = self.codes.index_select(0, index.reshape(-1)).reshape(index.shape).long()
        pair = batch[:, None, None] * (self.n_types + 1) + torch.where(
            types < 0, self.n_types, types)
        return self.scale[pair], self.offset[pair]
