"""Publishing a stage's output atomically: staged locally, renamed or uploaded into place.

A local output is built in a temporary sibling and renamed into place; object stores have
no rename, so a remote output is built in a local temporary directory and uploaded with
its *commit file* last (``zarr.json`` for a Zarr group): readers check that file, so a
partial upload is never taken for a complete output. What each stage's output is, the
locks and the recovery after a crash are in :mod:`sampleclr_scale.storage.outputs`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sampleclr_scale.storage.location import Location
from sampleclr_scale.storage.outputs import (
    OutputKind,
    aside_path,
    check_apart,
    check_replaceable,
    claim,
    remove_local,
    scratch_prefix,
    staging_path,
)


@contextmanager
def staged_output(final: str | os.PathLike | Location, overwrite: bool, *, kind: OutputKind,
                  inputs: Iterable[str | os.PathLike | Location] = ()) -> Iterator[Path]:
    """Build an output (a directory or a file) in a local staging path, then publish it.

    Yields a local path that does not exist yet; the caller creates the output there.
    The whole block holds the lock of ``final`` (:func:`~sampleclr_scale.storage.outputs.claim`),
    so a concurrent run writing it is refused; taking it first restores an output that a
    crashed publish left aside and removes what killed runs left next to ``final``. An
    existing ``final`` is refused before any work unless ``overwrite`` is set and it is
    an output of ``kind`` (or an empty folder); a source or someone else's folder is
    never replaced. The check is repeated just before the publish, so an output that
    another run (one without the lock) published meanwhile is not replaced either. On
    any error ``final`` is untouched and the staging path removed. See
    :mod:`sampleclr_scale.storage.outputs` for what is guaranteed locally and remotely.

    - **Local** ``final``: staged in a temporary sibling, published by renames (the old
      output aside to ``.NAME.old``, the new one in, the old one deleted), so it is
      replaced atomically; a crash between the renames is repaired by the next run.
    - **Remote** ``final``: staged in a local temporary directory, then uploaded. The
      commit file of ``kind`` (relative to the output directory) is uploaded last and an
      existing output's commit file is deleted first, so a reader that checks it never
      takes a partial output for a complete one. An interrupted overwrite leaves no
      complete output (object stores cannot swap a whole prefix); running the stage
      again with ``--overwrite`` repairs it. The lock is best-effort.

    Parameters
    ----------
    final
        Where the output goes.
    overwrite
        Replace an existing output of ``kind``.
    kind
        What the output is: what may be replaced, and its commit file.
    inputs
        What the stage reads: an output that is one of them, contains one or lies inside
        one is refused.

    Raises
    ------
    InputError
        For an output that overlaps an input, exists (without ``overwrite``), is not of
        ``kind`` (with it), or is being written by another run.
    """
    final = Location(final)
    check_apart(final, [Location(where) for where in inputs])
    with claim(final):
        check_replaceable(final, kind, overwrite)
        if final.is_local:
            with _staged_local(final, kind, overwrite) as staging:
                yield staging
            return
        with tempfile.TemporaryDirectory(prefix=scratch_prefix(final)) as scratch:
            staging = Path(scratch) / final.name
            yield staging
            check_replaceable(final, kind, overwrite, meanwhile=True)
            _upload(staging, final, kind.commit)


@contextmanager
def _staged_local(final: Location, kind: OutputKind, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of ``final``, renamed into place when the block succeeds."""
    staging = staging_path(final.local)
    try:
        yield staging
        check_replaceable(final, kind, overwrite, meanwhile=True)
        if final.exists():
            aside = aside_path(final.local)
            os.rename(final.local, aside)
            os.rename(staging, final.local)
            remove_local(aside)
        else:
            os.rename(staging, final.local)
    finally:
        if staging.exists():
            remove_local(staging)


@contextmanager
def local_directory(where: str | os.PathLike | Location) -> Iterator[Path]:
    """A local directory whose files end up in ``where`` (created if missing).

    ``where`` itself when it is local; otherwise a temporary directory whose files are
    uploaded when the block succeeds, each replacing the file of its name. For outputs
    that add to a directory (a report) rather than replace it.
    """
    where = Location(where)
    if where.is_local:
        where.local.mkdir(parents=True, exist_ok=True)
        yield where.local
        return
    with tempfile.TemporaryDirectory(prefix="sampleclr-out-") as scratch:
        yield Path(scratch)
        _put_tree(Path(scratch), where, commit=None)


def _upload(staging: Path, final: Location, commit: str | None) -> None:
    """Upload a staged output to a remote ``final`` in place of what was there."""
    if staging.is_file():
        final.write_bytes(staging.read_bytes())
        return
    if final.exists():
        if commit is not None:
            (final / commit).remove()
        final.remove()
    _put_tree(staging, final, commit)


def _put_tree(local: Path, remote: Location, commit: str | None) -> None:
    """Upload the files under ``local`` into ``remote``, the ``commit`` file last."""
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    first = [f for f in files if f != commit]
    if first:
        remote.fs.put([str(local / f) for f in first], [f"{remote.path}/{f}" for f in first])
    if commit in files:
        remote.fs.put_file(str(local / commit), f"{remote.path}/{commit}")
