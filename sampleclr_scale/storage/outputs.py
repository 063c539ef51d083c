"""Publishing outputs safely: what each stage writes, locks, recovery after a crash.

:func:`~sampleclr_scale.storage.staged_output` publishes every stage's output through
this module:

- **Kinds.** Each output names its :class:`OutputKind` (a bag store, an embedding folder,
  a prior ...), whose predicate recognises one on disk from what the stage writes anyway
  (the attributes in a Zarr group's ``zarr.json``, the files of a folder).
  ``--overwrite`` replaces only an output of that kind, or an empty folder
  (:func:`check_replaceable`): never a source, never a folder of someone else's files.
  :func:`check_apart` refuses an output that is, contains or lies inside a stage's input.
- **Locks.** A stage holds the lock of its output from before the existence check to
  after the publish (:func:`claim`), so a second run writing the same output at the same
  time is refused instead of replacing the first one's output.
- **Recovery.** A local output is replaced by two renames (the old one to
  ``.NAME.old``, the new one in); a crash between them leaves ``.NAME.old`` and nothing
  at ``NAME``. The next run of any stage writing ``NAME`` renames it back before anything
  else. The old output is restored rather than the new one completed: a staging folder
  cannot be told complete from what is on disk.
- **Cleanup.** A run stages its output in ``.NAME.tmp-XXXX`` next to it (and names its
  own scratch space after that: ingest's spill files are in ``..NAME.tmp-XXXX.spill-*``).
  Only the lock holder stages there, so whatever is left there when the next run takes
  the lock was left by a run that was killed, and is removed. The local scratch folders
  of remote outputs (``$TMPDIR/sampleclr-stage-<hash of the URI>-*``) likewise.

What is guaranteed where:

- **Local paths** take an ``fcntl.flock`` lock on ``.NAME.lock``: exclusive between the
  processes of a machine, and between machines on file systems whose locks span them
  (NFSv4, Lustre and GPFS mounted with locking). The kernel releases it when its process
  dies, however it dies, so a dead run's lock is free at once; the file itself holds the
  owner (pid, host, start time) for the message of a refused run. On a shared file system
  whose locks do not span machines, runs on two machines are not kept apart (and one
  could remove the other's staging folder): write each output from one machine there.
- **Object stores** (``s3://``, ``gs://`` ...) have no locks and, but for S3's
  conditional writes, no atomic create. The lock is a best-effort ``.NAME.lock`` object
  holding its owner, created with ``mode="create"`` (``If-None-Match: *`` on S3, an
  existence check then a write elsewhere) and read back. A lock whose owner ran on this
  machine and is no longer alive is taken over; one of another machine is never
  presumed dead (the message says how to delete it). The existence check before the
  upload is best-effort too, and an interrupted upload leaves an incomplete output
  (without its commit file, so it is never read) that the next ``--overwrite`` run
  replaces.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sampleclr_scale.errors import InputError
from sampleclr_scale.storage.location import ZARR_COMMIT, Location

if TYPE_CHECKING:
    import fsspec

log = logging.getLogger(__name__)

_SHOWN = 5
"""Entries of a folder named when it is refused."""


# --- kinds ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputKind:
    """What a stage writes, and how to recognise one on disk.

    Parameters
    ----------
    name
        What it is, with its article, for messages (``"a bag store"``).
    commit
        The file of a directory output written (uploaded) last, whose presence marks it
        complete (None: readers need none).
    recognise
        Whether a location holds an output of this kind, complete or the remains of an
        interrupted upload: what ``--overwrite`` may replace.
    """

    name: str
    commit: str | None
    recognise: Callable[[Location], bool]


def zarr_output(name: str, attributes: Iterable[str], array: str) -> OutputKind:
    """The kind of a Zarr group, recognised by the attributes its stage writes.

    Parameters
    ----------
    name
        As for :class:`OutputKind`.
    attributes
        Names of attributes the group always has (any values).
    array
        A member it always has: its ``zarr.json`` without the group's recognises the
        remains of an interrupted upload, whose commit file (``zarr.json``) goes last.
    """
    needed = frozenset(attributes)

    def recognise(location: Location) -> bool:
        commit = location / ZARR_COMMIT
        if not commit.is_file():
            return (location / array / ZARR_COMMIT).is_file()
        try:
            meta = json.loads(commit.read_bytes())
        except ValueError:
            return False
        if not isinstance(meta, dict) or meta.get("node_type") != "group":
            return False
        attrs = meta.get("attributes")
        return isinstance(attrs, dict) and needed <= attrs.keys()

    return OutputKind(name, ZARR_COMMIT, recognise)


def files_output(name: str, files: Iterable[str], commit: str) -> OutputKind:
    """The kind of a folder of ``files``: one holding some of them and nothing else."""
    allowed = frozenset(files)

    def recognise(location: Location) -> bool:
        names = location.children()
        return bool(names) and set(names) <= allowed

    return OutputKind(name, commit, recognise)


def check_replaceable(final: Location, kind: OutputKind, overwrite: bool, *,
                      meanwhile: bool = False) -> None:
    """Refuse to write ``final`` unless it is free, or ``overwrite`` and replaceable.

    Replaceable: an output of ``kind`` or an empty folder.

    Parameters
    ----------
    meanwhile
        The check just before the publish: what is there now appeared while the run
        was working (for the message).

    Raises
    ------
    InputError
        Saying what is there and why it is not replaced.
    """
    if not final.exists():
        return
    if not overwrite:
        if meanwhile:
            raise InputError(f"{final} was created by another run while this one was "
                             "working; this run's output is discarded",
                             "choose another --out, or pass --overwrite to replace it")
        raise InputError(f"{final} already exists",
                         "pass --overwrite to replace it, or choose another --out")
    if not (final.is_file() or final.children()) or kind.recognise(final):
        return
    raise InputError(f"{final} is {_describe(final)}, not {kind.name}: --overwrite "
                     f"replaces only {kind.name} written by sampleclr-scale, nothing else",
                     "choose another --out, or move or delete it yourself")


def _describe(location: Location) -> str:
    """What is at ``location``, for a message: a file, or a folder and some entries."""
    if location.is_file():
        return "a file"
    names = location.children()
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return f"a folder holding {', '.join(names[:_SHOWN])}{more}"


def check_apart(out: Location, inputs: Iterable[Location]) -> None:
    """Refuse an output that is one of the ``inputs``, contains one or lies inside one.

    Local paths are compared with symbolic links resolved, URIs as written.
    """
    for source in inputs:
        if out.is_local != source.is_local:
            continue
        ours, theirs = ((os.path.realpath(out.path), os.path.realpath(source.path))
                        if out.is_local else (out.uri, source.uri))
        relation = ("is" if ours == theirs else
                    "lies inside" if ours.startswith(theirs.rstrip("/") + "/") else
                    "contains" if theirs.startswith(ours.rstrip("/") + "/") else None)
        if relation is not None:
            raise InputError(f"--out {out} {relation} {source}, which this stage reads: "
                             "writing there could destroy it",
                             "choose an --out outside the stage's inputs")


# --- names next to an output ------------------------------------------------------------------


def _sibling(final: Path, suffix: str) -> Path:
    """The hidden sibling ``.NAME.<suffix>`` of ``final``."""
    return final.with_name(f".{final.name}.{suffix}")


def staging_path(final: Path) -> Path:
    """A new staging path next to ``final``: ``.NAME.tmp-XXXX``.

    Scratch space of the run goes next to it under names starting with
    ``.<staging name>.``, so that it is cleaned up with it.
    """
    return _sibling(final, f"tmp-{uuid.uuid4().hex[:8]}")


def aside_path(final: Path) -> Path:
    """Where the output being replaced waits until the new one is in: ``.NAME.old``."""
    return _sibling(final, "old")


def scratch_prefix(final: Location) -> str:
    """Prefix of the local scratch folders (in ``$TMPDIR``) of a remote output."""
    return f"sampleclr-stage-{hashlib.sha256(final.uri.encode()).hexdigest()[:16]}-"


# --- locks ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: the record in the lock file."""

    pid: int
    host: str
    since: str
    token: str

    @classmethod
    def this_process(cls) -> Holder:
        """A new record for this process."""
        return cls(os.getpid(), socket.gethostname(),
                   datetime.now(UTC).isoformat(timespec="seconds"), uuid.uuid4().hex)

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """The record in ``data``; None when it is not one (empty, cut short)."""
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def dumps(self) -> bytes:
        """The record as JSON."""
        return json.dumps(asdict(self)).encode()

    def is_dead(self) -> bool:
        """True if it ran on this machine and its process is gone (never for another
        machine's: its processes cannot be seen from here)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host} (since {self.since})"


def _held_by(holder: Holder | None, what: str, lock: str) -> str:
    """The problem of a refused run."""
    return f"another run is writing {what}: {holder or 'a run'} holds the lock {lock}"


@contextmanager
def _local_lock(path: Path, what: str) -> Iterator[None]:
    """Hold the ``flock`` of the lock file ``path`` for the block; the file is removed."""
    fd = _acquire(path, what)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # ours: only a holder removes it
        os.close(fd)


def _acquire(path: Path, what: str) -> int:
    """Lock ``path`` (created if missing) and write our record; return its descriptor."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Holder.parse(os.pread(fd, 4096, 0))
            os.close(fd)
            raise InputError(_held_by(holder, what, str(path)),
                             "wait for that run to finish, or choose another --out (the "
                             "lock of a run that died is free again)") from None
        if _is_file_at(fd, path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, Holder.this_process().dumps(), 0)
            return fd
        os.close(fd)  # a holder removed the file after we opened it: lock the new one


def _is_file_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the file at ``path``."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)


@contextmanager
def _remote_lock(final: Location) -> Iterator[None]:
    """Hold the best-effort lock object ``.NAME.lock`` next to a remote ``final``."""
    parent, _, name = final.path.rpartition("/")
    fs, path, me = final.fs, f"{parent}/.{name}.lock", Holder.this_process()
    uri = f"{final.uri.rpartition('/')[0]}/.{name}.lock"
    _create_lock_object(final, path, uri, me)
    try:
        yield
    finally:
        if _read_holder(fs, path) == me:
            fs.rm(path)


def _create_lock_object(final: Location, path: str, uri: str, me: Holder) -> None:
    """Create the lock object (taking over a dead holder's) and check it is ours."""
    fs = final.fs
    for _ in range(2):
        try:
            fs.pipe_file(path, me.dumps(), mode="create")
            break
        except FileExistsError:
            holder = _read_holder(fs, path)
            if holder is None or not holder.is_dead():
                raise InputError(_held_by(holder, final.uri, uri),
                                 f"wait for that run to finish; if it is no longer "
                                 f"running, delete {uri}") from None
            log.warning("taking over the lock %s of %s, which is no longer running",
                        uri, holder)
            fs.rm(path)
    holder = _read_holder(fs, path)
    if holder != me:  # another run created it at the same time, and won
        raise InputError(_held_by(holder, final.uri, uri), "wait for that run to finish")


def _read_holder(fs: fsspec.AbstractFileSystem, path: str) -> Holder | None:
    """The record of a lock object; None if it is gone or unreadable."""
    try:
        return Holder.parse(fs.cat_file(path))
    except FileNotFoundError:
        return None


# --- claiming an output -----------------------------------------------------------------------


def check_writable(folder: Location) -> None:
    """Write and delete an empty file in ``folder``: a stage whose output goes there after
    long work (a prior into its store) calls this first, so that a folder it may not write
    is refused before the work, not after.

    Raises
    ------
    OSError
        The file system's, naming ``folder`` (``PermissionError`` for a denied or
        read-only folder; :func:`~sampleclr_scale.errors.path_error` words it).
    """
    check = folder / f".write-check-{uuid.uuid4().hex[:8]}"
    try:
        check.write_bytes(b"")
    except OSError as err:
        if err.errno is None:  # e.g. s3fs's PermissionError, which names no path
            raise
        raise type(err)(err.errno, err.strerror, str(folder)) from None
    check.remove()


@contextmanager
def claim(final: Location) -> Iterator[None]:
    """Hold the lock of ``final`` for the block, after repairing what killed runs left.

    Locally: restores an output left aside by a publish that crashed between its renames
    and removes the staging and scratch folders of killed runs. Remotely: removes the
    local scratch folders of killed runs of this output.

    Raises
    ------
    InputError
        When another run holds the lock, or a folder of a local ``final`` is a file.
    """
    if not final.is_local:
        with _remote_lock(final):
            _remove_stale(Path(tempfile.gettempdir()), (scratch_prefix(final),))
            yield
        return
    path = final.local
    blocking = next((p for p in path.parents if p.is_file()), None)
    if blocking is not None:
        raise InputError(f"{final} cannot be written: {blocking} is a file, not a folder",
                         "choose an --out whose folders are folders")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _local_lock(_sibling(path, "lock"), final.uri):
        _restore_aside(path)
        _remove_stale(path.parent, (f".{path.name}.tmp-", f"..{path.name}.tmp-"))
        yield


def _restore_aside(final: Path) -> None:
    """Put back the output a crashed publish left aside, or delete it if it was replaced."""
    aside = aside_path(final)
    if not aside.exists():
        return
    if final.exists():  # the crash came after the new output was in
        remove_local(aside)
        log.info("removed %s, the output %s replaced", aside, final)
        return
    os.rename(aside, final)
    log.warning("restored %s from %s: a run replacing it stopped half way", final, aside)


def _remove_stale(directory: Path, prefixes: tuple[str, ...]) -> None:
    """Remove the entries of ``directory`` starting with ``prefixes`` (left by killed runs)."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name.startswith(prefixes):
            remove_local(entry)
            log.info("removed %s, left by a run that was killed", entry)


def remove_local(path: Path) -> None:
    """Delete a local file or directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
