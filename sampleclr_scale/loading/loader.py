"""Streaming two-view donor bags from a bag store into torch.

:class:`DonorBagDataset` is a torch ``IterableDataset`` yielding whole batches
(:class:`DonorBatch`) of ``B`` donors: a float tensor ``[B, 2, m, d]`` with both views, a
mask for padded cells, the donors' store positions and their task labels. Which donors
come from :mod:`sampleclr_scale.loading.schedule` and which cells from the view draw
(:mod:`sampleclr_scale.loading.views`); this module only reads
them, in a background thread that stays ``prefetch`` batches ahead.

The rows come through a :class:`~sampleclr_scale.loading.readers.RowReader`
(``LoaderConfig.reader``): on a local store whose features are stored uncompressed, as
ingest writes them, from memory maps of the chunk files, a whole batch with one
``numpy.take`` into its buffer; otherwise through Zarr, where each donor costs one range
read (two to four for donors much larger than the views) and, on object storage,
``read_threads`` donors are read at once to keep many round trips in flight. Both give
the same batches, byte for byte.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sampleclr_scale._distributed import rank_and_world_size
from sampleclr_scale.config import LoaderConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.loading.readers import check_reader, open_reader
from sampleclr_scale.loading.rows import Mapper, RowReader, View
from sampleclr_scale.loading.schedule import Shard, rank_batches, steps_per_epoch, worker_steps
from sampleclr_scale.loading.views import ViewDraw, open_view_draw, views_of
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.type_batches import apply_affine

TYPE_MODE = "batch_cell_type"
"""``standardize`` value of the per-(batch, cell type) correction."""
AUTO_BALANCE_COLUMN = "cell_type"
"""The column that ``LoaderConfig.balance: auto`` balances views over, when stored."""
REMOTE_READ_THREADS = 16
"""Default donors read at once from a store behind a URI (``LoaderConfig.read_threads``)."""

@dataclass
class DonorBatch:
    """One batch of two-view donor bags.

    Attributes
    ----------
    cells
        Float32 ``[B, 2, m, d]``: view 0 and view 1 of each donor, padded to ``m``.
    mask
        Bool ``[B, 2, m]``: True for real cells, False for padding.
    donor
        Int64 ``[B]``: the donors' positions in the store's donor table (global ids).
    labels
        Per task column: int64 codes with -1 for missing (classification, ordinal) or
        float32 values with NaN for missing (regression), ``[B]`` each.
    batch
        Int64 ``[B]``: the donors' technical batch codes (stores ingested with
        ``--batch-key``), or None.
    epoch, step
        Where in the schedule the batch belongs (step counts from 0 in each epoch).
    """

    cells: torch.Tensor
    mask: torch.Tensor
    donor: torch.Tensor
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    batch: torch.Tensor | None = None
    epoch: int = 0
    step: int = 0

    def to(self, device: torch.device | str) -> DonorBatch:
        """The batch on ``device``, every tensor copied without blocking (a copy from
        pageable memory that blocked would wait for the device's queued work)."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> DonorBatch:
        """The batch in page-locked memory (called by DataLoader(pin_memory=True)), so
        that :meth:`to` a GPU overlaps with its work."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, move: Callable[[torch.Tensor], torch.Tensor]) -> DonorBatch:
        """The batch with ``move`` applied to each of its tensors."""
        return DonorBatch(move(self.cells), move(self.mask), move(self.donor),
                          {k: move(v) for k, v in self.labels.items()},
                          None if self.batch is None else move(self.batch),
                          self.epoch, self.step)


def resolve_balance(store: BagStore, balance: str | None) -> str | None:
    """The column views are balanced over (``LoaderConfig.balance``, ``auto`` resolved)."""
    if balance == "auto":
        return AUTO_BALANCE_COLUMN if AUTO_BALANCE_COLUMN in store.code_columns else None
    return balance


def check_views_fit(store: BagStore, config: LoaderConfig) -> None:
    """Refuse views larger than every donor of the store.

    Raises
    ------
    InputError
        When the smallest view (``view_range[0]`` cells) exceeds the largest donor.
    """
    largest = int(store.cells_per_donor.max())
    if config.view_range[0] > largest:
        raise InputError(
            f"views of {config.view_range[0]} cells are larger than any donor "
            f"(largest has {largest} cells)",
            f"set loader.cells_per_view (m) to at most {largest}, or ingest with a larger "
            "--min-cells cohort",
        )


class DonorBagDataset(IterableDataset):
    """Two-view donor bags of one split, sharded over ranks and DataLoader workers.

    Parameters
    ----------
    store_path
        The bag store.
    config
        Batch size, view sizes, seed, padding policy, prefetch depth.
    split
        ``train`` or ``validation``.
    tasks
        Donor-table columns to deliver as labels, with their kind (``classification``,
        ``ordinal``, ``regression``).
    rank, world_size
        This process's place in data-parallel training; from the Ray Train context
        (``ray.train.get_context()``) or, when None, from the default torch process
        group (rank 0 of 1 without one).
    standardize
        ``True`` or ``"batch"``: standardise each donor's cells with its technical batch's
        statistics (:meth:`BagStore.standardize`; stores ingested with ``--batch-key``);
        ``"batch_cell_type"``: map each cell with its (batch, cell type) pair's shrunk
        location and scale (:mod:`~sampleclr_scale.store.type_batches`; stores ingested
        with ``--batch-key`` and ``cell_type`` codes); False or None: neither.

    Call :meth:`set_epoch` before each epoch; :meth:`set_start_step` to resume mid-epoch.
    The object holds no open files, so it pickles into spawned DataLoader workers.
    """

    def __init__(
        self,
        store_path: str,
        config: LoaderConfig,
        *,
        split: str = "train",
        tasks: dict[str, str] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        standardize: bool | str | None = False,
    ) -> None:
        super().__init__()
        self.store_path = str(store_path)
        self.config = config
        self.split = split
        self.standardize = standardize
        self.tasks = dict(tasks or {})
        if (rank is None) != (world_size is None):
            raise InputError("pass both rank and world_size, or neither",
                             "take both from ray.train.get_context()")
        if rank is None:
            rank, world_size = rank_and_world_size()
        self.rank, self.world_size = int(rank), int(world_size)
        self.batch_size = config.process_batch(self.world_size)  # donors per batch, this rank
        self.epoch = 0
        self.start_step = 0
        store = BagStore(self.store_path)
        self._donors = store.split_donors(split)
        self.balance = resolve_balance(store, config.balance)
        self._opened(store)

    def _opened(self, store: BagStore) -> None:
        """Check the store (opened and checked once, when the dataset is made) for what
        the dataset needs; a subclass also reads there what it keeps."""
        for column, kind in self.tasks.items():
            store.labels(column, kind)  # raises a clear error for a missing column
        if self.balance is not None:
            store.codes(self.balance)  # raises a clear error for a missing column
        if self.standardize == TYPE_MODE and store.batch_type_maps is None:
            raise InputError(f"bag store {store.location} has no per-(batch, cell type) "
                             "statistics", "re-ingest with --batch-key COL ... from a source "
                             "with a cell_type column, or train with standardize: batch")
        if self.standardize and store.batch_stats is None:
            raise InputError(f"bag store {store.location} has no per-batch statistics to "
                             "standardise with", "re-ingest with --batch-key COL ..., or "
                             "train with standardize: none")
        steps_per_epoch(len(self._donors), self.batch_size, self.world_size,
                        self.config.drop_last)
        check_views_fit(store, self.config)
        check_reader(store, self.config.reader)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return steps_per_epoch(len(self._donors), self.batch_size, self.world_size,
                               self.config.drop_last)

    @property
    def donors(self) -> np.ndarray:
        """Store positions of the split's donors."""
        return self._donors

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose donor order and views are produced next."""
        self.epoch = int(epoch)
        self.start_step = 0

    def set_start_step(self, step: int) -> None:
        """Skip the first ``step`` batches of the current epoch (resuming a run)."""
        self.start_step = int(step)

    def _shard(self) -> Shard:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return Shard(self.rank, self.world_size, worker, n_workers)

    def __iter__(self) -> Iterator[DonorBatch]:
        batches, steps = self.schedule()
        return prefetch(lambda: self._read_steps(batches, steps), self.config.prefetch)

    def schedule(self) -> tuple[np.ndarray, range]:
        """This rank's donors of each step of the epoch (int64 ``[steps, B]``,
        :func:`~sampleclr_scale.loading.schedule.rank_batches`) and the steps that this
        process (or DataLoader worker) produces, from the start step on."""
        shard = self._shard()
        batches = rank_batches(self._donors, seed=self.config.seed, epoch=self.epoch,
                               batch_size=self.batch_size, shard=shard,
                               drop_last=self.config.drop_last)
        return batches, worker_steps(len(batches), shard, self.start_step)

    def _read_steps(self, batches: np.ndarray, steps: range) -> Iterator[DonorBatch]:
        store = BagStore(self.store_path, check=False)  # checked in __init__
        context = _ReadContext.of(store, self)
        threads = self.config.read_threads or (
            1 if store.location.is_local else REMOTE_READ_THREADS)
        with ThreadPoolExecutor(threads) if threads > 1 else nullcontext() as pool:
            read = map if pool is None else pool.map
            for step in steps:
                yield self._read_batch(store, batches[step], context, step, read)

    def _read_batch(self, store: BagStore, donors: np.ndarray, context: _ReadContext,
                    step: int, read: Mapper = map) -> DonorBatch:
        """One batch: its views drawn for all donors at once (:func:`views_of`), then read;
        ``read`` maps the Zarr reader's per-donor reads over the donors (``map`` or a
        pool's)."""
        views = views_of(store, donors, seed=self.config.seed, epoch=self.epoch,
                         view_range=self.config.view_range, draw=context.views)
        return self._assemble(store, donors, views, context, step, read)

    def _assemble(self, store: BagStore, donors: np.ndarray,
                  views: list[View], context: _ReadContext,
                  step: int, read: Mapper = map) -> DonorBatch:
        """The batch of ``views``: their rows read into one ``[B, 2, m, d]`` buffer.

        Every reader fills the same buffer with the same rows, so the batches do not
        depend on the reader; padding stays zero, standardisation is one pass over the
        batch (the per-element arithmetic of :func:`~sampleclr_scale.store.batches.standardize`).
        """
        m = self.config.view_range[1]
        sizes = np.array([(n_a, n_b) for n_a, n_b, _ in views], dtype=np.int64)
        mask = np.arange(m) < sizes.reshape(-1, 2, 1)
        padded = not mask.all()
        cells = context.buffers.take((len(donors), 2, m, store.dim))
        context.features.read_views(views, cells, read)  # every real cell
        if padded:  # first too: no arithmetic on the stale rows of a reused buffer
            cells[~mask] = 0.0
        batch = None if context.donor_batch is None else context.donor_batch[donors]
        if self.standardize == TYPE_MODE:
            scale, offset, _ = context.type_maps
            types = _view_types(views, context.type_codes, cells.shape[:3])
            apply_affine(cells, scale, offset, batch[:, None, None], types, out=cells)
            if padded:
                cells[~mask] = 0.0
        elif self.standardize:
            mean, std = context.stats
            codes = batch.astype(np.intp)
            cells -= mean[codes][:, None, None]
            cells /= std[codes][:, None, None]
            if padded:
                cells[~mask] = 0.0
        return DonorBatch(
            cells=torch.from_numpy(cells),
            mask=torch.from_numpy(mask),
            donor=torch.from_numpy(donors.astype(np.int64)),
            labels={c: torch.from_numpy(v[donors]) for c, v in context.labels.items()},
            batch=None if batch is None else torch.from_numpy(batch.astype(np.int64)),
            epoch=self.epoch,
            step=step,
        )


@dataclass(frozen=True)
class _ReadContext:
    """What one pass over a store reads batches with (opened once per pass, per process)."""

    features: RowReader
    """Reader of the features (``LoaderConfig.reader``)."""
    views: ViewDraw
    """How the donors' views are drawn (uniform, or balanced over ``balance``)."""
    labels: dict[str, np.ndarray]
    donor_batch: np.ndarray | None
    stats: tuple[np.ndarray, np.ndarray] | None
    buffers: _Buffers
    type_maps: tuple[np.ndarray, np.ndarray, str] | None = None
    type_codes: RowReader | None = None

    @classmethod
    def of(cls, store: BagStore, dataset: DonorBagDataset) -> _ReadContext:
        reader = dataset.config.reader
        return cls(
            features=open_reader(store, store.features, reader),
            views=open_view_draw(store, dataset.balance, reader,
                                 dataset.config.balance_strength),
            labels={c: store.labels(c, kind)[0] for c, kind in dataset.tasks.items()},
            donor_batch=store.donor_batch,
            stats=store.batch_stats if dataset.standardize else None,
            buffers=_Buffers(dataset.config.prefetch + 4),
            **_type_context(store, dataset.standardize, reader),
        )


def _type_context(store: BagStore, standardize: bool | str | None,
                  reader: str) -> dict[str, Any]:
    """The per-(batch, cell type) maps and a reader of the codes that index them, when
    the dataset standardises that way."""
    if standardize != TYPE_MODE:
        return {}
    maps = store.batch_type_maps
    return {"type_maps": maps,
            "type_codes": open_reader(store, store.codes(maps[2]), reader, small=True)}


def _view_types(views: list[View], codes: RowReader, shape: tuple[int, ...]) -> np.ndarray:
    """Int64 ``shape`` (``[B, 2, m]``) cell-type code of each cell of the views (-1 for
    padding), read in one call."""
    types = np.full(shape, -1, dtype=np.int64)
    read = codes.read(np.concatenate([rows for _, _, rows in views]))
    start = 0
    for i, (n_a, n_b, _) in enumerate(views):
        types[i, 0, :n_a] = read[start:start + n_a]
        types[i, 1, :n_b] = read[start + n_a:start + n_a + n_b]
        start += n_a + n_b
    return types


class _Buffers:
    """Float32 batch buffers, each handed out again once nothing refers to it any more.

    A batch's ``cells`` tensor shares its buffer (``torch.from_numpy``), and so does every
    view of it; when the batch, its tensors and their views are gone, only this pool holds
    the buffer (a reference count of one), and the next batch of the same shape reuses it
    instead of new memory (12.8 MB at B = 32, m = 1000, d = 50, whose first touch costs
    more than the copy into it). A buffer still referred to, say by a batch the consumer
    keeps, is never handed out; at most ``keep`` buffers are pooled.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._pool: list[np.ndarray] = []

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        """A buffer of ``shape`` with undefined contents."""
        for i in range(len(self._pool)):
            # 2: the pool's list and getrefcount's own argument
            if self._pool[i].shape == shape and sys.getrefcount(self._pool[i]) == 2:
                return self._pool[i]
        buffer = np.empty(shape, dtype=np.float32)
        if len(self._pool) < self.keep:
            self._pool.append(buffer)
        return buffer


_DONE = object()


def prefetch(produce: Callable[[], Iterator[Any]], depth: int) -> Iterator[Any]:
    """Run the generator ``produce()`` in a thread, ``depth`` items ahead of the consumer.

    Errors in the thread are re-raised in the consumer; closing the consumer early stops
    the thread.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        """Hand ``item`` over unless the consumer has gone; False once it has."""
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in produce():
                if not put(item):
                    return
            put(_DONE)
        except BaseException as err:  # handed to the consumer
            put(err)

    thread = threading.Thread(target=run, name="bag-prefetch", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def make_loader(dataset: DonorBagDataset, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over whole batches, with ``spawn``-ed workers when it has any.

    TileDB and Zarr are not fork-safe, hence ``spawn``. Create a new loader (or call
    ``iter`` again) after :meth:`DonorBagDataset.set_epoch`: workers are not persistent,
    so each epoch's workers see the new epoch.
    """
    workers = dataset.config.num_workers
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        multiprocessing_context="spawn" if workers else None,
        pin_memory=pin_memory,
    )
