"""What a person sees: log levels, progress bars, and other libraries' chatter off the console.

Three verbosities (``sampleclr-scale -q`` / default / ``-v``):

- ``quiet``: warnings and errors only, no progress bars;
- ``normal``: this package's INFO lines (what a stage read, wrote, measured), a progress
  bar per long stage (on a terminal), one summary line per training epoch; Ray's own
  output (worker logs, controller notices) goes to Ray's session log folder and the
  training workers' lines to ``RUN/logs/``, not to the console;
- ``verbose``: DEBUG from everything, Ray's worker output forwarded to the console.

Progress bars are tqdm's, on stderr, and switch themselves off when stderr is not a
terminal (a log file, CI), so logs hold lines, not carriage returns. In a Jupyter kernel
they are always on, as notebook widgets where ipywidgets is installed (``tqdm.auto``).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

from tqdm import tqdm

Verbosity = Literal["quiet", "normal", "verbose"]

NOISY_LIBRARIES = ("ray", "anndata", "botocore", "aiobotocore", "s3fs", "fsspec", "filelock",
                   "urllib3", "numba", "h5py")
"""Loggers held at WARNING unless verbose (a line per credential lookup, per report...)."""

_LEVELS = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}
_current: dict[str, Verbosity] = {"verbosity": "normal"}


def configure(verbosity: Verbosity) -> None:
    """Set the console up for one command.

    Parameters
    ----------
    verbosity
        ``quiet``, ``normal`` or ``verbose`` (see the module docstring).
    """
    _current["verbosity"] = verbosity
    logging.basicConfig(level=_LEVELS[verbosity], format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(
            logging.DEBUG if verbosity == "verbose" else logging.WARNING)


def verbosity() -> Verbosity:
    """The verbosity :func:`configure` set (``normal`` before any call)."""
    return _current["verbosity"]


def progress(total: int | None, desc: str, unit: str, **options: Any) -> tqdm:
    """A progress bar on stderr: off when quiet, and when stderr is not a terminal.

    Parameters
    ----------
    total
        Units of work (None: unknown).
    desc
        What is counted, before the bar.
    unit
        The unit's name (``cells``, ``donors``, ``pairs``, ``steps``).
    **options
        More :class:`tqdm.tqdm` options.
    """
    quiet = verbosity() == "quiet"
    if _in_notebook():
        return _notebook_bar()(total=total, desc=desc, unit=unit, leave=False, disable=quiet,
                               **options)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                leave=False, disable=True if quiet else None, **options)


def _in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (whose streams are no terminals)."""
    shell = sys.modules.get("IPython")
    ipython = getattr(shell, "get_ipython", lambda: None)() if shell is not None else None
    return ipython is not None and type(ipython).__name__ == "ZMQInteractiveShell"


def _notebook_bar() -> type[tqdm]:
    """``tqdm.auto``'s widget bar where ipywidgets is installed, else a text bar."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return tqdm
    from tqdm.auto import tqdm as auto

    return auto


def say(line: str) -> None:
    """A line for the console that a progress bar may be drawing over (not when quiet)."""
    if verbosity() != "quiet":
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()  # in order with the stage headers when stdout is a file


def ray_init_options() -> dict[str, Any]:
    """``ray.init`` options for the verbosity: workers' output forwarded only when verbose,
    Ray's driver-side notices only from errors up unless verbose."""
    verbose = verbosity() == "verbose"
    return {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
