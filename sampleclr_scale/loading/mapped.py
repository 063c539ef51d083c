"""Row readers over chunk files: memory maps, and decoded chunks kept in memory.

- :class:`MmapReader`, for a local array whose chunk files are the raw bytes of its rows
  (the ``features`` ingest writes: ``compressors=None``, the ``bytes`` codec alone; told
  from the array's metadata by :func:`mmap_layout`). On Linux, when a chunk is a whole
  number of pages, every chunk file is mapped side by side in one reserved address range
  (layout ``flat``): the array is one numpy view and a batch is one ``numpy.take`` of its
  rows straight into the batch buffer, what an in-memory copy costs. Elsewhere chunks are
  mapped one by one when first read (layout ``chunks``), at most :data:`MAX_MAPPED_BYTES`
  of them (and a share of the open-file limit: before Python 3.13 a map holds a file
  descriptor), least recently used unmapped beyond.
- :class:`ChunkCache`: a small per-row array read through Zarr (the ``codes``, which
  ingest compresses), read once and kept whole in memory, or for a larger one each chunk
  decoded once and kept in a bounded LRU.

What the memory maps check: a chunk file is mapped only if it has the size the manifest
lists for it and the size of a whole chunk; a listed file that is missing or of another
size is refused with the :class:`~sampleclr_scale.errors.InputError` of the Zarr path
("found on read"), naming the file (a map of a short file would read past its end: a
``SIGBUS``). A chunk neither listed nor on disk reads as the fill value, as in Zarr (which
does not write a chunk of fill values). Mapped pages count in the process's resident set
size as shared file pages (the page cache, which the kernel reclaims), not as its own
memory; a ``flat`` map releases them every :data:`RELEASE_BYTES` read, so a long epoch
over a large store does not leave the store's pages in the process's resident set.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import resource
import sys
import threading
from abc import abstractmethod
from collections import OrderedDict
from itertools import pairwise
from typing import Any

import numpy as np

from sampleclr_scale.errors import InputError
from sampleclr_scale.loading.rows import Mapper, RowReader, View, view_index
from sampleclr_scale.store.manifest import read_error

MAX_MAPPED_BYTES = 4 << 30
"""At most this many bytes of chunk files are mapped at once per reader (LRU beyond)."""


RELEASE_BYTES = 256 << 20
"""A ``flat`` map's pages are released from the process (``madvise(MADV_DONTNEED)``;
they stay in the page cache) each time this many bytes were read out of it, so the
store's pages mapped into a reader's process stay bounded (scattered rows map a whole
page each, so the pages mapped run to several times the bytes read). Measured on the
50M-cell store of ``bench scale``, one epoch, a training worker's peak RSS: 6.3 GB
without a release, 3.3 GB releasing every 1 GiB, 2.0 GB every 256 MiB (1.4 GB of it
its own memory), at the same throughput (118-124 donors/s)."""


MAX_CACHED_BYTES = 256 << 20
"""Decoded chunks a :class:`ChunkCache` keeps, in bytes (128M cells of int16 codes; an
array up to this size is kept whole)."""


_FD_RESERVE = 256
"""File descriptors left to the rest of the process when maps hold one each."""


_MAX_RUNS = 8
"""Rows in at most this many runs of consecutive positions are copied run by run."""


_TRACKFD = {"trackfd": False} if sys.version_info >= (3, 13) else {}
"""Python 3.13+ maps without keeping a file descriptor open per map."""


class _Chunked(RowReader):
    """A reader that holds whole chunks of ``chunk_rows`` rows (:meth:`chunk`) and copies
    rows out of them: windows run by run, scattered rows one ``take`` per chunk."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, chunk_rows: int,
                 max_chunks: int) -> None:
        super().__init__(shape, dtype)
        self.chunk_rows = int(chunk_rows)
        self.max_chunks = max(1, int(max_chunks))
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @abstractmethod
    def _load(self, chunk: int) -> np.ndarray:
        """Chunk ``chunk`` as an array of ``[chunk_rows, *shape[1:]]`` rows (fewer for a
        last chunk that is stored short)."""

    def chunk(self, index: int) -> np.ndarray:
        """Chunk ``index``, from the LRU or loaded (and kept)."""
        with self._lock:
            found = self._chunks.get(index)
            if found is not None:
                self._chunks.move_to_end(index)
                return found
        loaded = self._load(index)
        with self._lock:
            self._chunks[index] = loaded
            while len(self._chunks) > self.max_chunks:
                self._chunks.popitem(last=False)
        return loaded

    def read_into(self, rows: np.ndarray, out: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        n = len(rows)
        if n == 0:
            return
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        if len(breaks) < _MAX_RUNS:  # a window (one run, or two where it wraps around)
            bounds = [0, *breaks.tolist(), n]
            for lo, hi in pairwise(bounds):
                self._copy_run(int(rows[lo]), hi - lo, out[lo:hi])
            return
        self._gather(rows, out)

    def read_range(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        self._copy_run(start, stop - start, out)
        return out

    def _copy_run(self, start: int, n: int, out: np.ndarray) -> None:
        """``out[:n] = array[start:start + n]``, one copy per chunk touched."""
        size = self.chunk_rows
        done = 0
        while done < n:
            index, offset = divmod(start + done, size)
            take = min(n - done, size - offset)
            out[done : done + take] = self.chunk(index)[offset : offset + take]
            done += take

    def _gather(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Scattered rows: one ``take`` from each chunk they fall in."""
        size = self.chunk_rows
        index = rows // size
        lo, hi = int(index.min()), int(index.max())
        if lo == hi:
            self._take(self.chunk(lo), rows - lo * size, out)
            return
        for chunk in np.unique(index).tolist():
            where = np.flatnonzero(index == chunk)
            out[where] = self.chunk(chunk)[rows[where] - chunk * size]

    @staticmethod
    def _take(chunk: np.ndarray, local: np.ndarray, out: np.ndarray) -> None:
        if out.dtype == chunk.dtype and out.flags.c_contiguous:
            np.take(chunk, local, axis=0, out=out, mode="clip")  # in range by construction
        else:
            out[...] = chunk[local]


class MmapReader(_Chunked):
    """Rows copied straight out of memory maps of a local array's chunk files.

    Two layouts, the same rows:

    - ``flat`` (Linux, chunks a whole number of pages, not more chunks than the kernel's
      map limit allows): every chunk file is mapped when the reader opens, next to each
      other in one reserved address range, so the array is one ``[n, ...]`` numpy view and
      a batch is one ``numpy.take`` of all its rows into the batch buffer, exactly what an
      in-memory copy costs. Chunks never written (fill values) are filled in that range.
    - ``chunks`` (elsewhere): each chunk file is mapped on first use, at most
      ``max_bytes`` of them at once (least recently used unmapped beyond); windows are
      copied run by run, scattered rows one ``take`` per chunk.

    Parameters
    ----------
    array
        A Zarr array whose layout :func:`mmap_layout` accepts.
    root
        The store's root directory (its chunk keys are relative to it).
    uri
        The store's URI, for errors.
    sizes
        Size of each file listed in the store's manifest, by path relative to the root.
    max_bytes
        ``chunks`` layout: at most this many bytes mapped at once.
    flat
        Force the layout (True: ``flat``, an OSError where it cannot be; False:
        ``chunks``); None chooses.
    release_bytes
        ``flat`` layout: release the map's pages each time this many bytes were read
        (:data:`RELEASE_BYTES`).

    Raises
    ------
    InputError
        For an array that cannot be mapped, and (``flat``, when the reader opens; ``chunks``
        when a chunk is first read) for a chunk file that the manifest lists but is missing
        or of another size, or one of another size than a chunk's rows.
    """

    kind = "mmap"

    def __init__(self, array: Any, root: str, uri: str, sizes: dict[str, int],
                 max_bytes: int = MAX_MAPPED_BYTES, flat: bool | None = None,
                 release_bytes: int = RELEASE_BYTES) -> None:
        problem = mmap_layout(array)
        if problem is not None:
            raise InputError(f"cannot memory-map {uri}/{array.path}: {problem}",
                             "read it through Zarr (loader.reader: zarr or auto)")
        chunk_shape = tuple(int(c) for c in array.metadata.chunk_grid.chunk_shape)
        dtype = np.dtype(array.dtype)
        self.chunk_shape = chunk_shape
        self.chunk_bytes = int(np.prod(chunk_shape)) * dtype.itemsize
        super().__init__(array.shape, dtype, chunk_shape[0],
                         min(max_bytes // max(self.chunk_bytes, 1), _fd_budget()))
        self._root, self._uri, self._sizes = root, uri, sizes
        self._path = array.path.strip("/")
        self._encode = array.metadata.encode_chunk_key
        self._fill = array.metadata.fill_value
        self._tail = (0,) * (len(chunk_shape) - 1)
        self.n_chunks = -(-self.shape[0] // self.chunk_rows)
        if flat is None:
            flat = _flat_possible(self.chunk_bytes, self.n_chunks)
        self.release_bytes = int(release_bytes)
        self.releases = 0
        self._read_since_release = 0
        self._reserved: mmap.mmap | None = None
        self.flat: np.ndarray | None = self._map_all() if flat else None
        self.layout = "flat" if flat else "chunks"

    def key(self, chunk: int) -> str:
        """The chunk's file, relative to the store's root (its manifest key)."""
        key = self._encode((chunk, *self._tail))
        return f"{self._path}/{key}" if self._path else key

    def read_into(self, rows: np.ndarray, out: np.ndarray) -> None:
        if self.flat is None:
            super().read_into(rows, out)
        elif len(rows):
            rows = np.asarray(rows, dtype=np.int64)
            self._check_rows(rows)
            self._take(self.flat, rows, out)
            self._count(len(rows))

    def read_views(self, views: list[View], cells: np.ndarray, read: Mapper = map) -> None:
        if self.flat is None:
            super().read_views(views, cells, read)
            return
        rows = view_index(views, cells.shape[2])[0].reshape(-1)  # padding: row 0's cells
        if len(rows):
            self._check_rows(rows)
            self._take(self.flat, rows, cells.reshape(len(rows), *cells.shape[3:]))
            self._count(len(rows))

    def read_range(self, start: int, stop: int) -> np.ndarray:
        if self.flat is None:
            return super().read_range(start, stop)
        return self.flat[start:stop].copy()

    def _count(self, rows: int) -> None:
        """Count ``rows`` read out of the flat map; release its pages every
        ``release_bytes`` (a read in another thread meanwhile faults them in again from
        the page cache: the file's bytes, unchanged)."""
        if self._reserved is None:  # fill values written into the map: not releasable
            return
        with self._lock:
            self._read_since_release += rows * self.chunk_bytes // self.chunk_rows
            if self._read_since_release < self.release_bytes:
                return
            self._read_since_release = 0
            self.releases += 1
        self._reserved.madvise(mmap.MADV_DONTNEED)

    def _check_rows(self, rows: np.ndarray) -> None:
        if rows.min() < 0 or rows.max() >= self.shape[0]:
            raise IndexError(f"rows {rows.min()}..{rows.max()} outside 0..{self.shape[0] - 1}")

    def _open_chunk(self, chunk: int) -> tuple[str, int | None]:
        """The key of ``chunk`` and an open descriptor of its file, checked against the
        manifest and the chunk's size; None for a chunk never written (fill values)."""
        key = self.key(chunk)
        listed = self._sizes.get(key)
        try:
            fd = os.open(os.path.join(self._root, *key.split("/")), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            if listed is not None:
                raise read_error(self._uri, key, listed, None) from None
            return key, None  # Zarr does not write a chunk of fill values
        try:
            size = os.fstat(fd).st_size
            if listed is not None and size != listed:
                raise read_error(self._uri, key, listed, size)
            if size != self.chunk_bytes:
                raise InputError(
                    f"bag store {self._uri} is damaged: {key} holds {size} bytes, a chunk of "
                    f"{self.chunk_shape} {self.dtype} rows takes {self.chunk_bytes}",
                    "re-ingest it, or read it through Zarr (loader.reader: zarr)")
        except BaseException:
            os.close(fd)
            raise
        return key, fd

    def _load(self, chunk: int) -> np.ndarray:
        _, fd = self._open_chunk(chunk)
        if fd is None:
            filled = np.full(self.chunk_shape, self._fill, dtype=self.dtype)
            filled.flags.writeable = False
            return filled
        try:
            mapped = mmap.mmap(fd, self.chunk_bytes, access=mmap.ACCESS_READ, **_TRACKFD)
        finally:
            os.close(fd)
        return np.frombuffer(mapped, dtype=self.dtype).reshape(self.chunk_shape)

    def _map_all(self) -> np.ndarray:
        """Every chunk file mapped in place inside one reserved range: the array as one
        read-only view (the range is unmapped when the last view of it is gone)."""
        total = self.n_chunks * self.chunk_bytes
        reserved = mmap.mmap(-1, max(total, mmap.PAGESIZE),
                             flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        anchor = ctypes.c_char.from_buffer(reserved)
        base = ctypes.addressof(anchor)
        del anchor  # releases the buffer export
        everything = np.frombuffer(reserved, dtype=self.dtype,
                                   count=total // self.dtype.itemsize)
        everything = everything.reshape(self.n_chunks * self.chunk_rows, *self.chunk_shape[1:])
        releasable = True
        for chunk in range(self.n_chunks):
            _, fd = self._open_chunk(chunk)
            if fd is None:
                if self._fill != 0:  # private memory: a release would zero it
                    rows = slice(chunk * self.chunk_rows, (chunk + 1) * self.chunk_rows)
                    everything[rows] = self._fill
                    releasable = False
                continue
            try:
                _map_fixed(base + chunk * self.chunk_bytes, self.chunk_bytes, fd)
            finally:
                os.close(fd)
        self._reserved = reserved if releasable else None
        view = everything[: self.shape[0]]
        view.flags.writeable = False
        return view


_LIBC: Any = None


_MAP_FIXED = 0x10  # Linux (every architecture) and macOS


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        _LIBC = libc
    return _LIBC


def _map_fixed(address: int, length: int, fd: int) -> None:
    """Map ``length`` bytes of file ``fd`` read-only at ``address`` (inside a range this
    process reserved), replacing what was mapped there."""
    got = _libc().mmap(address, length, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
    if got != address:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mmap of a chunk file failed: {os.strerror(errno)}")


def _flat_possible(chunk_bytes: int, n_chunks: int) -> bool:
    """Whether the ``flat`` layout can hold an array of ``n_chunks`` chunks."""
    if not sys.platform.startswith("linux") or chunk_bytes % mmap.PAGESIZE:
        return False
    try:
        with open("/proc/sys/vm/max_map_count") as limit:
            budget = int(limit.read()) // 2
    except (OSError, ValueError):
        budget = 32_768
    return n_chunks <= budget


class ChunkCache(_Chunked):
    """Rows of a Zarr array out of its decoded chunks, each read through Zarr once and
    kept in an LRU of at most ``max_bytes`` (for small per-row arrays: the ``codes``).

    An array of at most ``max_bytes`` in all is read whole on first use and kept as one
    numpy array, so that scattered rows (the cells of a batch's balanced pools) are one
    ``numpy.take``.
    """

    kind = "cache"

    def __init__(self, array: Any, max_bytes: int = MAX_CACHED_BYTES) -> None:
        chunk_rows = int(array.chunks[0])
        dtype = np.dtype(array.dtype)
        row_bytes = int(np.prod(array.shape[1:], dtype=np.int64)) * dtype.itemsize
        super().__init__(array.shape, dtype, chunk_rows,
                         max_bytes // max(chunk_rows * row_bytes, 1))
        self.array = array
        self.whole = self.shape[0] * row_bytes <= max_bytes
        """Whether the array is kept whole (:meth:`all_rows`)."""
        self._all: np.ndarray | None = None

    def all_rows(self) -> np.ndarray:
        """The whole array (read once), for an array kept whole."""
        if self._all is None:
            with self._lock:
                if self._all is None:
                    rows = np.asarray(self.array[...])
                    rows.flags.writeable = False
                    self._all = rows
        return self._all

    def read_into(self, rows: np.ndarray, out: np.ndarray) -> None:
        if not self.whole:
            super().read_into(rows, out)
        elif len(rows):
            self._take(self.all_rows(), np.asarray(rows, dtype=np.int64), out)

    def read_range(self, start: int, stop: int) -> np.ndarray:
        if not self.whole:
            return super().read_range(start, stop)
        return self.all_rows()[start:stop].copy()

    def _load(self, chunk: int) -> np.ndarray:
        lo = chunk * self.chunk_rows
        block = np.asarray(self.array[lo : min(lo + self.chunk_rows, self.shape[0])])
        block.flags.writeable = False
        return block


def _fd_budget() -> int:
    """How many maps may hold a file descriptor each (no limit from Python 3.13 on)."""
    if _TRACKFD:
        return sys.maxsize
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return sys.maxsize
    return max(16, (soft - _FD_RESERVE) // 2)


def mmap_layout(array: Any) -> str | None:
    """Why ``array``'s chunk files are not raw rows that can be mapped, or None if they are.

    Read from the array's metadata: Zarr format 3; one codec, ``bytes`` (no compressor,
    filter, transpose or sharding); native byte order; a fixed-size numeric type; a
    regular chunk grid that chunks rows only; no storage transformer.
    """
    from zarr.codecs import BytesCodec
    from zarr.core.chunk_grids import RegularChunkGrid

    meta = array.metadata
    if getattr(meta, "zarr_format", None) != 3:
        return f"Zarr format {getattr(meta, 'zarr_format', '?')}, not 3"
    codecs = tuple(meta.codecs)
    if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
        names = ", ".join(type(c).__name__ for c in codecs)
        return f"its codecs are {names}, not the bytes codec alone (compressed or sharded)"
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "fiub" or dtype.hasobject:
        return f"type {dtype} is not a fixed-size number"
    endian = getattr(codecs[0].endian, "value", codecs[0].endian)
    if dtype.itemsize > 1 and endian is not None and endian != sys.byteorder:
        return f"its bytes are {endian}-endian, this machine is {sys.byteorder}-endian"
    if meta.storage_transformers:
        return "it has storage transformers"
    grid = meta.chunk_grid
    if not isinstance(grid, RegularChunkGrid):
        return f"chunk grid {type(grid).__name__} is not regular"
    if tuple(grid.chunk_shape[1:]) != tuple(array.shape[1:]):
        return f"chunks {tuple(grid.chunk_shape)} split the rows of shape {array.shape}"
    return None
