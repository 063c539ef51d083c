"""Rows of a bag store's row-chunked arrays: the reader interface and the Zarr reader.

A :class:`RowReader` hands out rows at absolute positions, in any order, into a caller's
buffer. :class:`ZarrReader` reads through Zarr (few range reads, :func:`read_rows`) via
the store's :class:`~sampleclr_scale.store.manifest.CheckedStore`: any store, compressed,
sharded, remote. The memory-mapped readers are in :mod:`sampleclr_scale.loading.mapped`;
which one a pass uses is :func:`sampleclr_scale.loading.readers.open_reader`'s choice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

Mapper = Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]
"""``map``, or a thread pool's ``map``."""


View = tuple[int, int, np.ndarray]
"""One donor's two views: sizes ``n_a``, ``n_b`` and the rows (view A's, then view B's)."""


def view_index(views: list[View], m: int) -> tuple[np.ndarray, np.ndarray]:
    """The row index and mask of a batch's views.

    Parameters
    ----------
    views
        Per donor, from :func:`~sampleclr_scale.loading.loader.view_rows`: the sizes of its
        two views and their rows (view A's, then view B's).
    m
        Cells per view after padding.

    Returns
    -------
    index, mask
        Int64 ``[B, 2, m]`` store rows (0 at padding) and bool ``[B, 2, m]``, True for
        real cells: the layout of :class:`~sampleclr_scale.loading.loader.DonorBatch`.
    """
    sizes = np.array([(n_a, n_b) for n_a, n_b, _ in views], dtype=np.int64).reshape(-1, 2)
    mask = np.arange(m) < sizes[..., None]
    rows = np.concatenate([r for _, _, r in views]) if views else np.zeros(0, np.int64)
    if mask.all():
        return rows.reshape(mask.shape), mask
    index = np.zeros(mask.shape, dtype=np.int64)
    index[mask] = rows  # donor, view, cell order
    return index, mask


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


class RowReader(ABC):
    """Rows of one row-chunked store array (``[n]`` or ``[n, d]``).

    Attributes
    ----------
    kind : str
        ``zarr``, ``mmap`` or ``cache``.
    shape : tuple
        The array's shape.
    dtype : numpy.dtype
        The array's type.
    """

    kind: str = ""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)

    @abstractmethod
    def read_into(self, rows: np.ndarray, out: np.ndarray) -> None:
        """``out[k] = array[rows[k]]`` for every ``k``: int64 ``rows`` in any order
        (repeats allowed), ``out`` of shape ``[len(rows), *shape[1:]]`` and any numeric
        type (the rows are converted as numpy assignment does)."""

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The rows at ``rows``, as a new array of the store's type."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        self.read_into(rows, out)
        return out

    def __getitem__(self, key: slice) -> np.ndarray:
        """Rows ``start:stop`` (a step-1 slice), like a Zarr or numpy array."""
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"a {type(self).__name__} takes a row range, not {key!r}")
        start, stop, _ = key.indices(self.shape[0])
        return self.read_range(start, max(start, stop))

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``, as a new array of the store's type."""
        return self.read(np.arange(start, stop, dtype=np.int64))

    def read_views(self, views: list[View], cells: np.ndarray, read: Mapper = map) -> None:
        """Fill ``cells[i, 0, :n_a]`` and ``cells[i, 1, :n_b]`` with the rows of donor
        ``i``'s views; ``read`` maps per-donor reads where the reader uses it."""
        for i, (n_a, n_b, rows) in enumerate(views):
            self.read_into(rows[:n_a], cells[i, 0, :n_a])
            self.read_into(rows[n_a:], cells[i, 1, :n_b])


class ZarrReader(RowReader):
    """Rows read through Zarr: one or a few range reads per call (:func:`read_rows`).

    :meth:`read_views` reads both views of a donor with one call, the donors mapped by
    ``read`` (a thread pool's ``map`` keeps many reads of a remote store in flight).
    """

    kind = "zarr"

    def __init__(self, array: Any) -> None:
        super().__init__(array.shape, array.dtype)
        self.array = array

    def read_into(self, rows: np.ndarray, out: np.ndarray) -> None:
        if len(rows):
            out[...] = read_rows(self.array, np.asarray(rows, dtype=np.int64))

    def read(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        return read_rows(self.array, rows)

    def read_range(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]

    def read_views(self, views: list[View], cells: np.ndarray, read: Mapper = map) -> None:
        blocks = read(lambda rows: read_rows(self.array, rows), [v[2] for v in views])
        for i, ((n_a, n_b, _), rows) in enumerate(zip(views, blocks, strict=True)):
            cells[i, 0, :n_a] = rows[:n_a]
            cells[i, 1, :n_b] = rows[n_a:]
