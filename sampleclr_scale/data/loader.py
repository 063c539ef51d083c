"""Streaming two-view donor bags from a bag store into torch.

:class:`DonorBagDataset` is a torch ``IterableDataset`` yielding whole batches
(:class:`DonorBatch`) of ``B`` donors: a float tensor ``[B, 2, m, d]`` with both views, a
mask for padded cells, the donors' store positions and their task labels. Which donors
and which cells come from :mod:`sampleclr_scale.data.sampler`; this module only reads
them, in a background thread that stays ``prefetch`` batches ahead. Each donor costs one
range read of the store (two to four for donors much larger than the views); for a store
on object storage ``read_threads`` donors are read at once, to keep many round trips in
flight.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sampleclr_scale.config import LoaderConfig
from sampleclr_scale.data.sampler import (
    Shard,
    balanced_pick,
    donor_rng,
    draw_views,
    rank_batches,
    steps_per_epoch,
    view_pools,
    view_sizes,
    worker_steps,
)
from sampleclr_scale.data.store import BagStore
from sampleclr_scale.errors import InputError
from sampleclr_scale.losses.gather import rank_and_world_size

AUTO_BALANCE_COLUMN = "cell_type"
"""The column that ``LoaderConfig.balance: auto`` balances views over, when stored."""
REMOTE_READ_THREADS = 16
"""Default donors read at once from a store behind a URI (``LoaderConfig.read_threads``)."""
_Mapper = Callable[[Callable[[np.ndarray], np.ndarray], list[np.ndarray]], Iterator[np.ndarray]]
"""``map``, or a thread pool's ``map``."""

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
        """The batch on ``device``."""
        return DonorBatch(self.cells.to(device, non_blocking=True),
                          self.mask.to(device, non_blocking=True),
                          self.donor.to(device), {k: v.to(device) for k, v in self.labels.items()},
                          None if self.batch is None else self.batch.to(device),
                          self.epoch, self.step)

    def pin_memory(self) -> DonorBatch:
        """The batch in page-locked memory (called by DataLoader(pin_memory=True))."""
        return DonorBatch(self.cells.pin_memory(), self.mask.pin_memory(), self.donor,
                          self.labels, self.batch, self.epoch, self.step)


def resolve_balance(store: BagStore, balance: str | None) -> str | None:
    """The column views are balanced over (``LoaderConfig.balance``, ``auto`` resolved)."""
    if balance == "auto":
        return AUTO_BALANCE_COLUMN if AUTO_BALANCE_COLUMN in store.code_columns else None
    return balance


def read_rows(array: Any, rows: np.ndarray) -> np.ndarray:
    """Rows of a store array (``features``, a ``codes`` array) at absolute positions
    ``rows`` (in that order) with few range reads.

    Reads the whole span when that wastes at most half of it, otherwise one read per run
    of consecutive rows.
    """
    lo, hi = int(rows.min()), int(rows.max()) + 1
    if hi - lo <= 2 * len(rows):
        return array[lo:hi][rows - lo]
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    runs = np.split(rows, breaks)
    return np.concatenate([array[int(r[0]) : int(r[-1]) + 1] for r in runs])


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
        Standardise each donor's cells with its technical batch's statistics
        (:meth:`BagStore.standardize`; stores ingested with ``--batch-key``).

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
        standardize: bool = False,
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
        self.epoch = 0
        self.start_step = 0
        store = BagStore(self.store_path)
        self._donors = store.split_donors(split)
        self.balance = resolve_balance(store, config.balance)
        self._check(store)

    def _check(self, store: BagStore) -> None:
        for column, kind in self.tasks.items():
            store.labels(column, kind)  # raises a clear error for a missing column
        if self.balance is not None:
            store.codes(self.balance)  # raises a clear error for a missing column
        if self.standardize and store.batch_stats is None:
            raise InputError(f"bag store {store.location} has no per-batch statistics to "
                             "standardise with", "re-ingest with --batch-key COL ..., or "
                             "train with standardize: none")
        steps_per_epoch(len(self._donors), self.config.batch_size, self.world_size,
                        self.config.drop_last)
        check_views_fit(store, self.config)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return steps_per_epoch(len(self._donors), self.config.batch_size, self.world_size,
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
        shard = self._shard()
        batches = rank_batches(self._donors, seed=self.config.seed, epoch=self.epoch,
                               batch_size=self.config.batch_size, shard=shard,
                               drop_last=self.config.drop_last)
        steps = worker_steps(len(batches), shard, self.start_step)
        return _prefetch(lambda: self._read_steps(batches, steps), self.config.prefetch)

    def _read_steps(self, batches: np.ndarray, steps: range) -> Iterator[DonorBatch]:
        store = BagStore(self.store_path)
        labels = {c: store.labels(c, kind)[0] for c, kind in self.tasks.items()}
        threads = self.config.read_threads or (
            1 if store.location.is_local else REMOTE_READ_THREADS)
        balance = None if self.balance is None else _Balance.of(store, self.balance)
        with ThreadPoolExecutor(threads) if threads > 1 else nullcontext() as pool:
            read = map if pool is None else pool.map
            for step in steps:
                yield self._read_batch(store, batches[step], labels, step, read, balance)

    def _read_batch(self, store: BagStore, donors: np.ndarray,
                    labels: dict[str, np.ndarray], step: int, read: _Mapper = map,
                    balance: _Balance | None = None) -> DonorBatch:
        """One batch; ``read`` maps the row reads over the donors (``map`` or a pool's)."""
        m = self.config.view_range[1]
        cells = np.zeros((len(donors), 2, m, store.dim), dtype=np.float32)
        mask = np.zeros((len(donors), 2, m), dtype=bool)
        batch = store.donor_batch
        views = list(read(lambda donor: self._views(store, int(donor), balance), donors))
        blocks = read(lambda rows: read_rows(store.features, rows), [v[2] for v in views])
        for i, ((n_a, n_b, _), rows) in enumerate(zip(views, blocks, strict=True)):
            if self.standardize:
                rows = store.standardize(rows, int(batch[donors[i]]))
            cells[i, 0, :n_a] = rows[:n_a]
            cells[i, 1, :n_b] = rows[n_a:]
            mask[i, 0, :n_a] = True
            mask[i, 1, :n_b] = True
        return DonorBatch(
            cells=torch.from_numpy(cells),
            mask=torch.from_numpy(mask),
            donor=torch.from_numpy(donors.astype(np.int64)),
            labels={c: torch.from_numpy(v[donors]) for c, v in labels.items()},
            batch=None if batch is None else torch.from_numpy(batch[donors].astype(np.int64)),
            epoch=self.epoch,
            step=step,
        )


    def _views(self, store: BagStore, donor: int, balance: _Balance | None
               ) -> tuple[int, int, np.ndarray]:
        """Sizes of a donor's two views and their rows (view A's, then view B's)."""
        first, n = int(store.donor_ptr[donor]), int(store.cells_per_donor[donor])
        rng = donor_rng(self.config.seed, self.epoch, donor)
        sizes = view_sizes(rng, self.config.view_range)
        if balance is None:
            a, b = draw_views(n, *sizes, rng)
        else:
            a, b = balance.views(first, n, sizes, rng)
        return len(a), len(b), first + np.concatenate([a, b])


@dataclass(frozen=True)
class _Balance:
    """Views balanced over a cell-level column: its codes and the cohort's composition."""

    codes: Any
    """The store's ``codes/<column>`` array."""
    target: np.ndarray
    """Proportion of each category over the whole store."""

    @classmethod
    def of(cls, store: BagStore, column: str) -> _Balance:
        counts = store.category_counts(column).astype(np.float64)
        return cls(store.codes(column), counts / counts.sum())

    def views(self, first: int, n: int, sizes: tuple[int, int], rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
        """Offsets of two views whose categories follow :attr:`target`
        (:func:`~sampleclr_scale.data.sampler.view_pools`, ``balanced_pick``)."""
        pool_a, pool_b = view_pools(n, max(sizes), rng)
        shared = pool_a is pool_b
        window = pool_a if shared else np.concatenate([pool_a, pool_b])
        codes = read_rows(self.codes, first + window)
        codes_a, codes_b = (codes, codes) if shared else np.split(codes, [len(pool_a)])
        return (pool_a[balanced_pick(codes_a, sizes[0], self.target, rng)],
                pool_b[balanced_pick(codes_b, sizes[1], self.target, rng)])


_DONE = object()


def _prefetch(produce, depth: int) -> Iterator[DonorBatch]:
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
