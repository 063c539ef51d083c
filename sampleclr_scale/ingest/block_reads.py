"""Where ingest's feature blocks are read: in this process, or by Ray actors in parallel.

Ingest reads the cohort's features in blocks of cells (sorted source ids). Read here,
one block waits for the previous one; from a remote source (Census on S3) each read
spends most of its time waiting on the network, and ``pca:N`` features spend theirs
computing. With ``read_workers`` > 1, that many Ray actors each open the source
themselves and read the blocks handed to them, at most two blocks each in flight; the
blocks come back in the order they finish. The store does not depend on that order (the
second pass sorts every bucket by donor and a hash of the source id), so it is the same
as a read in this process (``tests/ingest/test_block_reads.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from sampleclr_scale.config import IngestConfig
from sampleclr_scale.errors import InputError

IN_FLIGHT_PER_WORKER = 2
"""Blocks handed to each reader at a time: one being read, one waiting, so a reader never
idles while this process spills the previous block (memory: two blocks per reader)."""


def read_blocks(blocks: Iterable[np.ndarray], features: Any, config: IngestConfig,
                reopenable: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each block of cell records with its feature rows (float32 ``[cells, dim]``).

    Parameters
    ----------
    blocks
        Cell records with a ``joinid`` field, each block sorted by it.
    features
        The feature reader (:mod:`~sampleclr_scale.ingest.features`) of the open source.
    config
        The ingest's settings: ``read_workers``, and the source to reopen in each actor.
    reopenable
        Whether ``config.source`` opens the source being read (not so for a source
        object handed to ``ingest``, e.g. an AnnData in memory).

    Raises
    ------
    InputError
        With ``read_workers`` > 1 on a source that other processes cannot open, or more
        workers than a local Ray has CPUs.
    """
    if config.read_workers == 1:
        return ((cells, features.read(cells["joinid"])) for cells in blocks)
    if not reopenable:
        raise InputError(f"read_workers {config.read_workers} asks other processes to read "
                         "the source, but it was handed to ingest as an object (e.g. an "
                         "AnnData in memory) that only this process holds",
                         "use read_workers 1, or write the data to a file (.h5ad, SOMA) "
                         "and ingest that")
    return _read_in_actors(blocks, features, config)


class BlockReader:
    """A Ray actor's reader: the source opened once in the actor, read block by block."""

    def __init__(self, config: IngestConfig, features: Any) -> None:
        from sampleclr_scale.sources.registry import open_source

        self._source = open_source(config.source, config.measurement, config.organism)
        self._features = features.bind(self._source)

    def read(self, joinids: np.ndarray) -> np.ndarray:
        """Float32 feature rows of the cells with sorted source ids ``joinids``."""
        return self._features.read(joinids)


def _read_in_actors(blocks: Iterable[np.ndarray], features: Any,
                    config: IngestConfig) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The blocks read by ``config.read_workers`` actors, in the order they finish."""
    import ray

    from sampleclr_scale.cluster import check_resources

    check_resources(config.read_workers, option="read_workers")
    actor = ray.remote(num_cpus=1)(BlockReader)
    readers = [actor.remote(config, features) for _ in range(config.read_workers)]
    pending: dict[Any, tuple[np.ndarray, Any]] = {}  # result ref -> (cells, its reader)
    todo = iter(blocks)
    free = [reader for reader in readers for _ in range(IN_FLIGHT_PER_WORKER)]
    try:
        while True:
            while free and (cells := next(todo, None)) is not None:
                reader = free.pop()
                pending[reader.read.remote(cells["joinid"])] = (cells, reader)
            if not pending:
                return
            [done], _ = ray.wait(list(pending), num_returns=1)
            cells, reader = pending.pop(done)
            free.append(reader)
            yield cells, ray.get(done)
    finally:
        for reader in readers:
            ray.kill(reader)
