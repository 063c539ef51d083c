"""Peak resident memory of every process a benchmark stage runs (Linux ``/proc``).

A stage of the pipeline is not one process: the driver starts Ray, whose raylet starts
worker processes (Ray Train workers, embedding actors, prior tasks), which may spawn
DataLoader workers. :class:`ProcessPeaks` resets the kernel's peak-RSS counter
(``VmHWM``) of this process and all its descendants when a stage starts, then polls the
counters until the stage ends. Because ``VmHWM`` is itself a running maximum, polling
misses nothing but the growth of a process in the last poll interval before it exits.
It also keeps the largest ``RssAnon`` polled: the process's own memory, without the
file pages it maps (a memory-mapped store's pages are the kernel's page cache, shared
and reclaimable, but count in the RSS); a peak between two polls can be missed there.

Each process is reported under its role: the driver, a Ray process by the class or
function of its title (``ray::RayTrainWorker``), a ``multiprocessing`` child as
``spawned worker``, a Python script by its file or module, and anything else by its
executable's name.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import defaultdict
from pathlib import Path
from types import TracebackType

PROC = Path("/proc")
IDLE = "ray::IDLE"


def _children_of() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process visible in ``/proc``."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children[ppid].append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` in the process tree."""
    children = _children_of()
    found, stack = [], list(children.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children.get(child, []))
    return found


def peak_rss_kb(pid: int) -> int | None:
    """The process's peak resident set size (``VmHWM``) in KB; None once it has exited."""
    return _status_kb(pid, "VmHWM")


def anon_rss_kb(pid: int) -> int | None:
    """The process's anonymous resident memory now (``RssAnon``) in KB; None once it has
    exited."""
    return _status_kb(pid, "RssAnon")


def _status_kb(pid: int, field: str) -> int | None:
    """A KB field of ``/proc/PID/status``; None for a process that has exited (a zombie
    has no memory lines)."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def reset_peak(pid: int) -> None:
    """Restart the process's ``VmHWM`` from its current RSS (``clear_refs`` code 5)."""
    with contextlib.suppress(OSError):  # exited, or not ours
        (PROC / str(pid) / "clear_refs").write_text("5")


def role(pid: int) -> str | None:
    """What a process is, from its command line (see the module docstring)."""
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    title = argv[0].decode(errors="replace").strip()
    if title.startswith("ray::"):
        return title.split(".", 1)[0].split()[0]  # ray::Actor.method -> ray::Actor
    if any(b"multiprocessing" in arg for arg in argv):
        return "spawned worker"
    if not title:
        return None
    program = Path(title.split()[0]).name
    if program.startswith("python"):  # a script: name it by the script or module
        args = [a.decode(errors="replace") for a in argv[1:] if a]
        scripts = [Path(a).name for a in args if a.endswith(".py")]
        if scripts:
            return scripts[0]
        if "-m" in args[:-1]:
            return args[args.index("-m") + 1]
    return program


def _is_task(name: str | None) -> bool:
    """Whether ``name`` is the title of a Ray worker running a task or actor."""
    return name is not None and name.startswith("ray::") and name != IDLE


class ProcessPeaks:
    """Peak RSS per role of this process and its descendants while the block runs.

    Example::

        with ProcessPeaks() as peaks:
            train(...)
        peaks.summary()
        # {"ray::RayTrainWorker": {"peak_rss_mb": 1217.9, "processes": 2},
        #  "driver": {"peak_rss_mb": 544.0, "processes": 1}, ...}
    """

    def __init__(self, interval: float = 0.1) -> None:
        if not PROC.joinpath(str(os.getpid()), "clear_refs").exists():
            raise RuntimeError("per-process peak memory needs Linux /proc")
        self.interval = interval
        self._peak_kb: dict[int, int] = {}
        self._anon_kb: dict[int, int] = {}
        self._role: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessPeaks:
        me = os.getpid()
        for pid in (me, *descendants(me)):
            reset_peak(pid)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        """Read the peak of every live process of the tree."""
        me = os.getpid()
        for pid in (me, *descendants(me)):
            peak = peak_rss_kb(pid)
            if peak is None:
                continue
            self._peak_kb[pid] = max(peak, self._peak_kb.get(pid, 0))
            self._anon_kb[pid] = max(anon_rss_kb(pid) or 0, self._anon_kb.get(pid, 0))
            name = "driver" if pid == me else role(pid)
            if name and not _is_task(self._role.get(pid)):
                self._role[pid] = name  # a Ray worker keeps the title of its (last) task

    def summary(self, min_mb: float = 0.0) -> dict[str, dict[str, float]]:
        """Per role: the largest process peak RSS and anonymous RSS (MB) and how many
        processes had the role.

        Roles whose largest process stayed below ``min_mb`` are left out.
        """
        by_role: dict[str, list[int]] = defaultdict(list)
        for pid in self._peak_kb:
            by_role[self._role.get(pid, "unknown")].append(pid)
        rows = {name: {"peak_rss_mb": round(max(self._peak_kb[p] for p in pids) / 1024, 1),
                       "peak_anon_mb": round(max(self._anon_kb.get(p, 0) for p in pids)
                                             / 1024, 1),
                       "processes": len(pids)}
                for name, pids in by_role.items()}
        return dict(sorted(((k, v) for k, v in rows.items() if v["peak_rss_mb"] >= min_mb),
                           key=lambda kv: -kv[1]["peak_rss_mb"]))
