"""The manifest of a bag store: the files ingest wrote, so that a store knows it is whole.

Zarr reads a missing chunk as its fill value, so a store that lost a file would train and
embed zeros without a word. Ingest therefore writes ``STORE/manifest.json`` last into the
staged store, just before it is published (:func:`write_manifest`), listing every file of
the store then: its path relative to the store, its size in bytes and its CRC32, as
compact JSON with sorted keys::

    {"checksum":"crc32","files":{"cells.parquet":{"crc32":"90131d07","size":3603},...,
     "features/c/0/0":{"crc32":"0d5e9c10","size":131072},...},
     "format":"sampleclr-scale bag store manifest","version":1}

**Scope**: the ingest-written data: every ``zarr.json``, the chunks of ``features``,
``source_joinid``, ``donor_ptr``, ``codes/<column>``, ``batch_mean`` and ``batch_std``,
``donors.parquet`` and ``cells.parquet``. What is added to a store later (``priors/<kind>``,
``embeddings/<run>``) is outside it: each is a Zarr group of its own, published atomically
and replaced as a whole, so the manifest never changes after ingest and adding a prior
does not change the store's :attr:`Manifest.fingerprint`. Files not listed are ignored.

**Checks**

- On open (:func:`require_complete`, in every :class:`~sampleclr_scale.store.bag_store.BagStore`):
  every listed file is there with its size: a ``stat`` per file locally, one listing of
  the store on object storage (``fs.find``: a paginated LIST, not a request per file).
- On read (:class:`CheckedStore`, which the store's Zarr group reads through): a listed
  file that is gone or of another size when Zarr reads it is an error, not fill values;
  this catches files lost after the open at the cost of a dictionary look-up per read.
- On demand (:func:`check_store`, ``sampleclr-scale check STORE``): also the CRC32 of
  every file, which reads the whole store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import zarr
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from sampleclr_scale.errors import InputError
from sampleclr_scale.storage import Location

MANIFEST_FILE = "manifest.json"
FORMAT = "sampleclr-scale bag store manifest"
VERSION = 1
_READ_BLOCK = 8 << 20
"""Bytes read at a time when checksumming a file."""
_THREADS = 8
"""Files checksummed at once (zlib releases the GIL; remote reads wait on the network)."""
_NAMED = 10
"""Damaged files named in the error of the open check (``check`` names them all)."""


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest and the bytes it was read from.

    Attributes
    ----------
    files : dict
        ``(size, crc32)`` of each listed file, by path relative to the store.
    data : bytes
        The manifest file's content.
    """

    files: dict[str, tuple[int, str]]
    data: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse a manifest file; a ValueError, KeyError or TypeError if it is none."""
        body = json.loads(data)
        if body["format"] != FORMAT or body["version"] != VERSION:
            raise ValueError(f"not a version {VERSION} manifest")
        files = {path: (int(entry["size"]), str(entry["crc32"]))
                 for path, entry in body["files"].items()}
        return cls(files, data)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the manifest file: equal for stores with the same files (the
        same data, attributes and ingest settings), different otherwise."""
        return hashlib.sha256(self.data).hexdigest()

    @property
    def sizes(self) -> dict[str, int]:
        """Size in bytes of each listed file."""
        return {path: size for path, (size, _) in self.files.items()}


def build_manifest(root: Location) -> Manifest:
    """The manifest of every file under ``root`` (but a manifest file there)."""
    sizes = _file_sizes(root)
    sizes.pop(MANIFEST_FILE, None)
    paths = sorted(sizes)
    body = {"format": FORMAT, "version": VERSION, "checksum": "crc32",
            "files": {path: {"size": sizes[path], "crc32": crc}
                      for path, crc in zip(paths, _checksums(root, paths), strict=True)}}
    return Manifest.from_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def write_manifest(root: str | os.PathLike | Location) -> Manifest:
    """Write the manifest of the files under ``root`` as ``root/manifest.json``.

    Called on a staged store once all its files are written, before it is published.
    """
    root = Location(root)
    manifest = build_manifest(root)
    (root / MANIFEST_FILE).write_bytes(manifest.data)
    return manifest


def read_manifest(root: Location) -> Manifest:
    """The manifest of the store at ``root``.

    Raises
    ------
    InputError
        If the store has none (written before manifests existed, or not by ingest) or
        it does not parse.
    """
    try:
        data = (root / MANIFEST_FILE).read_bytes()
    except FileNotFoundError:
        raise InputError(f"bag store {root} has no {MANIFEST_FILE} (it was written by an "
                         "older sampleclr-scale, or not by ingest), so it cannot be checked "
                         "for missing or truncated files", _reingest(root)) from None
    try:
        return Manifest.from_bytes(data)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"{root / MANIFEST_FILE} is not a bag store manifest (damaged?)",
                         _reingest(root)) from None


def _file_sizes(root: Location) -> dict[str, int]:
    """Size of every file under ``root``, by relative path, from one listing."""
    prefix = root.path.rstrip("/") + "/"
    return {path[len(prefix):]: int(info["size"])
            for path, info in root.fs.find(root.path, detail=True).items()
            if path.startswith(prefix)}


def _checksums(root: Location, paths: Iterable[str]) -> list[str]:
    """CRC32 (8 hex digits) of each file ``paths`` (relative to ``root``), in order."""
    with ThreadPoolExecutor(_THREADS) as pool:
        return list(pool.map(lambda path: _crc32(root / path), paths))


def _crc32(file: Location) -> str:
    """CRC32 of a file, read in blocks."""
    value = 0
    with file.fs.open(file.path, "rb") as stream:
        while block := stream.read(_READ_BLOCK):
            value = zlib.crc32(block, value)
    return f"{value:08x}"


def _listed_sizes(root: Location, paths: Iterable[str]) -> dict[str, int]:
    """Size of each file ``paths`` that is there: a ``stat`` per file locally, one
    listing of the store (:func:`_file_sizes`) on object storage."""
    if not root.is_local:
        return _file_sizes(root)
    sizes = {}
    for path in paths:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            sizes[path] = os.stat(os.path.join(root.path, path)).st_size
    return sizes


def size_problems(root: Location, manifest: Manifest) -> dict[str, str]:
    """What is wrong with the presence and size of each listed file that is not right."""
    found = _listed_sizes(root, manifest.files)
    return {path: problem for path, size in manifest.sizes.items()
            if (problem := _size_problem(size, found.get(path))) is not None}


def _size_problem(expected: int, actual: int | None) -> str | None:
    if actual is None:
        return "missing"
    if actual != expected:
        return f"{actual} bytes, {expected} in the manifest"
    return None


def require_complete(root: Location, manifest: Manifest) -> None:
    """The check on open: every listed file is there with its size.

    Raises
    ------
    InputError
        Naming the first missing or truncated files.
    """
    problems = size_problems(root, manifest)
    if problems:
        raise _damaged(root, problems, limit=_NAMED)


def check_store(where: str | os.PathLike | Location) -> dict[str, Any]:
    """Verify a store against its manifest: presence, sizes and the CRC32 of every file.

    Returns
    -------
    dict
        ``store``, ``complete`` (True), ``files``, ``bytes``, ``fingerprint``, ``seconds``.

    Raises
    ------
    InputError
        Naming every missing, truncated or changed file.
    """
    start = time.perf_counter()
    root = Location(where)
    manifest = read_manifest(root)
    problems = size_problems(root, manifest)
    whole = [path for path in manifest.files if path not in problems]
    for path, crc in zip(whole, _checksums(root, whole), strict=True):
        if crc != manifest.files[path][1]:
            problems[path] = f"CRC32 {crc}, {manifest.files[path][1]} in the manifest"
    if problems:
        raise _damaged(root, problems)
    return {"store": root.uri, "complete": True, "files": len(manifest.files),
            "bytes": sum(manifest.sizes.values()), "fingerprint": manifest.fingerprint,
            "seconds": round(time.perf_counter() - start, 3)}


def _damaged(root: Location | str, problems: dict[str, str],
            limit: int | None = None) -> InputError:
    """The error for a store whose files are not as its manifest lists them.

    Parameters
    ----------
    problems
        What is wrong with each bad file, by path.
    limit
        Name at most this many files (None: all), pointing to ``sampleclr-scale check``.
    """
    named = sorted(problems)[:limit]
    more = len(problems) - len(named)
    listing = "; ".join(f"{path} ({problems[path]})" for path in named)
    if more:
        listing += f"; and {more} more (`sampleclr-scale check {root}` names them all)"
    return InputError(f"bag store {root} is damaged: {len(problems)} file(s) differ from "
                      f"its {MANIFEST_FILE}: {listing}", _reingest(root))


def read_error(root: Location | str, key: str, expected: int, actual: int | None
               ) -> InputError:
    """The error for listed file ``key`` found missing (``actual`` None) or of ``actual``
    bytes instead of ``expected`` when it is read (:class:`CheckedStore`, and the memory
    maps of :mod:`~sampleclr_scale.loading.readers`)."""
    problem = _size_problem(expected, actual) or "as listed"
    return _damaged(root, {key: f"{problem}, found on read"})


def _reingest(root: Location | str) -> str:
    return f"re-ingest it with `sampleclr-scale ingest SOURCE --out {root} --overwrite`"


class CheckedStore(WrapperStore[Store]):
    """A Zarr store that refuses to read a listed file that is missing or of another size.

    Parameters
    ----------
    store
        The store to read through.
    root
        The store's URI, for the error.
    sizes
        Size of each listed file (:attr:`Manifest.sizes`), by Zarr key.
    """

    def __init__(self, store: Store, root: str, sizes: dict[str, int]) -> None:
        super().__init__(store)
        self._root, self._sizes = root, sizes

    def _with_store(self, store: Store) -> CheckedStore:
        return type(self)(store, self._root, self._sizes)

    async def get(self, key: str, prototype: BufferPrototype,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        """The file ``key``, as the wrapped store reads it; an InputError for a listed
        file that is missing (Zarr would read fill values) or of another size."""
        buffer = await super().get(key, prototype, byte_range)
        expected = self._sizes.get(key)
        if expected is not None and byte_range is None:
            actual = None if buffer is None else len(buffer)
            if _size_problem(expected, actual) is not None:
                raise read_error(self._root, key, expected, actual)
        return buffer


def open_checked_group(root: Location, manifest: Manifest) -> zarr.Group:
    """The store's Zarr group for reading, through a :class:`CheckedStore`."""
    store = CheckedStore(root.zarr_store(read_only=True), root.uri, manifest.sizes)
    return zarr.open_group(store=store, mode="r")
