"""Which row reader a pass over a bag store uses, and the readers a process keeps.

The loader reads rows of two arrays: ``features`` (``[n_cells, d]``) and, for balanced
views, ``codes/<column>`` (``[n_cells]``). Both are chunked along rows only.
:func:`open_reader` chooses a :class:`~sampleclr_scale.loading.rows.RowReader`
(``LoaderConfig.reader``): :class:`~sampleclr_scale.loading.mapped.MmapReader` for a
local array stored as raw chunk bytes, :class:`~sampleclr_scale.loading.mapped.ChunkCache`
for small compressed arrays (the codes), :class:`~sampleclr_scale.loading.rows.ZarrReader`
for anything else. A process keeps its last :data:`KEPT_READERS` readers with state for
its next pass over the same store (the next epoch), so nothing is mapped or decoded
twice; every pass opens the store first, whose open check refuses a file lost or
truncated since.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sampleclr_scale.errors import InputError
from sampleclr_scale.loading.mapped import ChunkCache, MmapReader, mmap_layout
from sampleclr_scale.loading.rows import RowReader, ZarrReader

if TYPE_CHECKING:
    from sampleclr_scale.store.bag_store import BagStore


READERS = ("auto", "zarr", "mmap")
"""Values of ``LoaderConfig.reader``."""


def open_reader(store: BagStore, array: Any, mode: str = "auto", *,
                small: bool = False) -> RowReader:
    """The reader of one of ``store``'s arrays (``LoaderConfig.reader``).

    Parameters
    ----------
    store
        The bag store.
    array
        One of its arrays (``store.features``, ``store.codes(column)``).
    mode
        ``mmap``: memory maps (an error for a store they cannot read); ``zarr``: through
        Zarr; ``auto``: memory maps for a local store whose layout :func:`mmap_layout`
        accepts, else Zarr.
    small
        A small per-row array (the codes, which ingest compresses): read through Zarr, it
        is served from decoded chunks (:class:`ChunkCache`) instead of a Zarr read per
        call, and ``mmap`` maps it only where it can (as ``auto``).

    Raises
    ------
    InputError
        For ``mmap`` on a remote store or a (not small) array that cannot be mapped, or
        an unknown mode.
    """
    if mode not in READERS:
        raise InputError(f"unknown loader.reader {mode!r}", f"use one of {READERS}")
    problem = mmap_problem(store, array) if mode != "zarr" else "zarr asked for"
    if problem is None:
        return KEPT.get(store, array, "mmap", lambda: MmapReader(
            array, store.location.path, store.location.uri, store.manifest.sizes))
    if mode == "mmap" and not small:
        raise _cannot_map(store, array, problem)
    if small:
        return KEPT.get(store, array, "cache", lambda: ChunkCache(array))
    return ZarrReader(array)


KEPT_READERS = 8
"""Readers with state (maps, decoded chunks) a process keeps for the next pass over the
same store (the next epoch), so that nothing is mapped or decoded again."""


class KeptReaders:
    """The readers with state that this process keeps, least recently used dropped first.

    A reader is kept under ``(store URI, store fingerprint, array, kind)``: a store
    ingested again is a new one, and a store whose files changed since is refused by its
    open check before any of its readers is used. Thread-safe; one instance per process
    (:data:`KEPT`), since a DataLoader worker or a Ray worker is a process of its own.
    """

    def __init__(self, capacity: int = KEPT_READERS) -> None:
        self.capacity = capacity
        self._readers: OrderedDict[tuple, RowReader] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, store: BagStore, array: Any, kind: str, make: Callable[[], RowReader]
            ) -> RowReader:
        """The kept reader of ``kind`` for ``array`` of ``store``, made once."""
        key = (store.location.uri, store.fingerprint, array.path, kind)
        with self._lock:
            reader = self._readers.get(key)
            if reader is not None:
                self._readers.move_to_end(key)
                return reader
        reader = make()
        with self._lock:
            reader = self._readers.setdefault(key, reader)
            while len(self._readers) > self.capacity:
                self._readers.popitem(last=False)
        return reader

    def clear(self) -> None:
        """Forget every kept reader (their maps close when nothing else holds them)."""
        with self._lock:
            self._readers.clear()


KEPT = KeptReaders()
"""This process's kept readers."""


def check_reader(store: BagStore, mode: str) -> None:
    """Refuse a ``LoaderConfig.reader`` that cannot read ``store``'s features (before any
    batch is read): ``mmap`` for a store that memory maps cannot read, an unknown mode.

    Raises
    ------
    InputError
        As :func:`open_reader` would.
    """
    if mode not in READERS:
        raise InputError(f"unknown loader.reader {mode!r}", f"use one of {READERS}")
    if mode == "mmap" and (problem := mmap_problem(store, store.features)) is not None:
        raise _cannot_map(store, store.features, problem)


def _cannot_map(store: BagStore, array: Any, problem: str) -> InputError:
    return InputError(f"loader.reader: mmap cannot read {store.location}/{array.path}: "
                      f"{problem}", "set loader.reader to auto (or zarr)")


def mmap_problem(store: BagStore, array: Any) -> str | None:
    """Why memory maps cannot read ``array`` of ``store`` (None if they can)."""
    if not store.location.is_local:
        return "the store is not on a local file system"
    return mmap_layout(array)
