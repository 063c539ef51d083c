"""Where the stages read and write: local paths and URIs alike.

Every stage names its inputs and outputs by a :class:`Location`: a local path, or a URI
(``s3://``, ``gs://``, ``az://``, ``file://`` ...) resolved by fsspec. A remote file system
takes its credentials and endpoint from its usual settings (``AWS_*`` variables or
``~/.aws`` for S3 through s3fs, ``GOOGLE_APPLICATION_CREDENTIALS`` for GCS through gcsfs),
so the same command line runs on a laptop and on a cluster whose nodes share a bucket.

Outputs are published so that a reader never sees half of one (see :func:`staged_output`):
a local output is built in a temporary sibling and renamed into place; object stores have
no rename, so a remote output is built in a local temporary directory and uploaded with
its *commit file* last (``zarr.json`` for a Zarr group): readers check that file, so a
partial upload is never taken for a complete output. ``--overwrite`` replaces only an
output of the stage's kind, under a lock (:mod:`sampleclr_scale.storage.outputs`).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from fsspec.implementations.local import LocalFileSystem

from sampleclr_scale.errors import InputError

ZARR_COMMIT = "zarr.json"
"""The commit file of a Zarr group: written last, so a group without it is incomplete."""

_REMOTE_OPTIONS = {"use_listings_cache": False}
"""fsspec options of every remote file system: other processes (Ray workers, other nodes)
write the same prefixes, so a cached directory listing would go stale."""


class Location:
    """A file or directory on the local file system or behind a URI.

    Parameters
    ----------
    where
        A local path (made absolute), a ``file://`` URI (taken as a local path) or any
        URI fsspec resolves, e.g. ``s3://bucket/cohort.store``.
    """

    __slots__ = ("fs", "path", "uri")

    def __init__(self, where: str | os.PathLike | Location) -> None:
        if isinstance(where, Location):
            self.fs, self.path, self.uri = where.fs, where.path, where.uri
            return
        text = os.fspath(where)
        if "://" not in text or text.startswith("file://"):
            local = Path(text.removeprefix("file://")).expanduser().absolute()
            self.fs: fsspec.AbstractFileSystem = LocalFileSystem()
            self.path = self.uri = str(local)
            return
        protocol = text.split("://", 1)[0]
        try:
            self.fs, path = fsspec.core.url_to_fs(text, **_REMOTE_OPTIONS)
        except (ImportError, ValueError) as err:
            raise InputError(f"cannot open {text}: {err}",
                             f"install the fsspec file system for {protocol}:// (s3fs for "
                             "s3:// comes with sampleclr-scale; `pip install "
                             "sampleclr-scale[gcs]` for gs://, adlfs for az://)") from None
        self.path = path.rstrip("/")
        self.uri = f"{protocol}://{self.path}"

    # naming -----------------------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        """True for a path on this machine's file system."""
        return isinstance(self.fs, LocalFileSystem)

    @property
    def local(self) -> Path:
        """The local path; an error for a remote location."""
        if not self.is_local:
            raise InputError(f"{self.uri} is not a local path",
                             "this step needs a local path: copy the data locally first")
        return Path(self.path)

    @property
    def name(self) -> str:
        """Last component of the path."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __fspath__(self) -> str:
        """The local path, so a local location can be passed to ``open``, pyarrow, anndata;
        a TypeError for a remote one, which must be read through its methods or fsspec."""
        if not self.is_local:
            raise TypeError(f"{self.uri} is remote, not a local path: read it through "
                            "Location methods or fsspec")
        return self.path

    def __truediv__(self, name: str) -> Location:
        return Location(os.path.join(self.uri, name) if self.is_local else f"{self.uri}/{name}")

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    # queries ----------------------------------------------------------------------------

    def exists(self) -> bool:
        """True if a file or directory (a key prefix on object stores) is there."""
        return self.fs.exists(self.path)

    def is_file(self) -> bool:
        """True if a file (an object) is there."""
        return self.fs.isfile(self.path)

    def children(self) -> list[str]:
        """Names of the entries directly inside this directory (empty if there is none)."""
        if not self.fs.isdir(self.path):
            return []
        return sorted(entry.rstrip("/").rsplit("/", 1)[-1]
                      for entry in self.fs.ls(self.path, detail=False))

    # files ------------------------------------------------------------------------------

    def read_bytes(self) -> bytes:
        """The whole file."""
        return self.fs.cat_file(self.path)

    def read_text(self) -> str:
        """The whole file as UTF-8 text."""
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Replace the file with ``data`` atomically.

        Locally: a temporary sibling, then a rename. Object stores publish an object only
        once it is completely uploaded.
        """
        if self.is_local:
            path = Path(self.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
            partial.write_bytes(data)
            partial.replace(path)
        else:
            self.fs.pipe_file(self.path, data)

    def write_text(self, text: str) -> None:
        """Replace the file with UTF-8 ``text`` atomically."""
        self.write_bytes(text.encode())

    def read_parquet(self, columns: list[str] | None = None) -> pa.Table:
        """A Parquet file as an Arrow table."""
        return pq.read_table(self.path, columns=columns, filesystem=self.fs)

    def parquet_file(self) -> pq.ParquetFile:
        """A Parquet file opened for reading in batches."""
        return pq.ParquetFile(self.path, filesystem=self.fs)

    def write_torch(self, obj: Any) -> None:
        """``torch.save`` ``obj`` as tensors and plain data (see :func:`plain_data`) to
        this file atomically, so that :meth:`read_torch` loads it without running code."""
        import torch

        buffer = io.BytesIO()
        torch.save(plain_data(obj), buffer)
        self.write_bytes(buffer.getvalue())

    def read_torch(self, what: str, fix: str) -> Any:
        """``torch.load`` a file of tensors and plain data onto the CPU.

        Parameters
        ----------
        what
            What the file should be, for the error (e.g. ``"trained model"``).
        fix
            How to get a good file, for the error.

        Raises
        ------
        InputError
            For a file that does not load with ``weights_only=True``: one that holds other
            objects (unpickling those can run any code, so they are never loaded), or no
            torch file at all.
        """
        import torch

        try:
            return torch.load(io.BytesIO(self.read_bytes()), map_location="cpu",
                              weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError):
            raise InputError(f"{self.uri} is not a {what} written by sampleclr-scale: it does "
                             "not load as tensors and plain data (other objects could run "
                             "code when loaded, so they are refused)", fix) from None

    def remove(self) -> None:
        """Delete the file or directory tree (nothing if absent)."""
        if self.exists():
            self.fs.rm(self.path, recursive=True)

    # Zarr -------------------------------------------------------------------------------

    def zarr_store(self, read_only: bool) -> zarr.abc.store.Store:
        """A Zarr store rooted here: a ``LocalStore`` or an ``FsspecStore``."""
        if self.is_local:
            return zarr.storage.LocalStore(self.path, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.uri, storage_options=_REMOTE_OPTIONS,
                                                 read_only=read_only)

    def open_group(self, mode: str = "r") -> zarr.Group:
        """The Zarr group rooted here (``mode`` as for :func:`zarr.open_group`)."""
        return zarr.open_group(store=self.zarr_store(read_only=mode == "r"), mode=mode)

    def is_zarr_group(self) -> bool:
        """True if a complete Zarr group is here (its commit file exists)."""
        return (self / ZARR_COMMIT).is_file()


def plain_data(obj: Any) -> Any:
    """``obj`` as tensors and plain data: what ``torch.load(weights_only=True)`` reads.

    Tensors, ``str``, ``int``, ``float``, ``bool`` and None are kept; dicts (any mapping),
    lists and tuples are rebuilt from their converted items; a dataclass becomes the dict
    of its fields, a numeric numpy array a tensor, any other numpy array a list, a numpy
    scalar the Python value.

    Raises
    ------
    TypeError
        For any other object (a bug: only data is saved).
    """
    import torch

    if isinstance(obj, torch.Tensor) or type(obj) in (str, int, float, bool, type(None)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.tensor(obj) if obj.dtype.kind in "biufc" else plain_data(obj.tolist())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {plain_data(k): plain_data(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(map(plain_data, obj))
    raise TypeError(f"cannot save {type(obj).__name__!r} as plain data: {obj!r:.80}")


