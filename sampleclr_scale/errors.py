"""The one exception type users see for bad input, and the operating-system errors that
are bad input too (a path the user may not use, a full or read-only file system, a name
too long, a file where a folder is expected)."""

from __future__ import annotations

import errno


class InputError(ValueError):
    """Bad input: the message says what is wrong and how to fix it.

    The command line prints these without a traceback; everything else is a bug.
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


_ACCESS_FIX = ("check that you may read (and, for an output, write) it and its folder "
               "(ls -ld), or choose a path you may use")
_PATH_FIXES = {
    errno.EROFS: "choose a path on a writable file system",
    errno.ENOSPC: "free space there, or choose a path on a file system with room",
    errno.EDQUOT: "free space within your quota, or choose a path on another file system",
    errno.ENAMETOOLONG: "choose a shorter name (file systems allow 255 bytes per name)",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
}
"""How to fix the other operating-system errors that are about the user's paths."""


def path_error(err: OSError) -> InputError | None:
    """A denied, read-only or full path, a name too long or a file where a folder is
    expected as an :class:`InputError`; None for any other operating-system error (a
    bug, shown with its traceback).

    Every ``PermissionError`` counts as denied, also one without an error number and path
    (e.g. s3fs's for a bucket that refuses access).
    """
    fix = _ACCESS_FIX if isinstance(err, PermissionError) else _PATH_FIXES.get(err.errno)
    if fix is None:
        return None
    if err.filename is None:
        return InputError(str(err), fix)
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    return InputError(f"{err.strerror}: {paths}", fix)
