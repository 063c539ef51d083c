"""Configuration of the embedding stage: settings, run names, output file names."""

from __future__ import annotations

import re
from typing import Self

from pydantic import Field, model_validator

from sampleclr_scale.config import StageConfig
from sampleclr_scale.embed.selection import SelectionMode
from sampleclr_scale.errors import InputError
from sampleclr_scale.storage import ZARR_COMMIT
from sampleclr_scale.storage.outputs import files_output

DONORS_PARQUET = "donor_embeddings.parquet"
DONORS_H5AD = "donor_embeddings.h5ad"
CELLS_PARQUET = "cell_weights.parquet"
PROVENANCE_FILE = "provenance.json"
PREDICTIONS_PARQUET = "predictions.parquet"
"""The files of an embedding output directory (see :mod:`sampleclr_scale.embed.embedder`;
``predictions.parquet`` only for a model with supervised heads)."""
SEARCH_INDEX_DIR = "search_index"
"""The donor search index that ``sampleclr-scale search`` builds inside an embedding
folder, on first use (:mod:`sampleclr_scale.search.index`)."""
EMBEDDINGS = files_output("an embedding folder",
                          (DONORS_PARQUET, DONORS_H5AD, CELLS_PARQUET, PROVENANCE_FILE,
                           PREDICTIONS_PARQUET, SEARCH_INDEX_DIR),
                          commit=PROVENANCE_FILE)
"""What ``embed --overwrite`` replaces: a folder of those files and nothing else."""

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
STAGING_MARK = ".tmp-"
"""Part of the names of results still being written; refused in run names."""


_RUN_NAME_RULE = (f"letters, digits, '_', '.', '-', starting with a letter or digit, no "
                  f"'{STAGING_MARK}', not {ZARR_COMMIT}")


def valid_run_name(name: str) -> bool:
    """Whether ``name`` can name results (a SOMA collection member and a folder).

    Zarr's metadata files are refused, so that no results take their place in the store's
    ``embeddings`` group: ``zarr.json`` (in any case, for case-insensitive file systems)
    and, as every name that does not start with a letter or digit, ``.zgroup``,
    ``.zattrs`` and ``.zarray``.
    """
    return (bool(_RUN_NAME.match(name)) and STAGING_MARK not in name
            and name.lower() != ZARR_COMMIT)


def check_run_name(name: str) -> str:
    """Return ``name``, or raise :class:`InputError` unless :func:`valid_run_name`."""
    if not valid_run_name(name):
        raise InputError(f"{name!r} cannot name embedding results",
                         f"set run_name to {_RUN_NAME_RULE}, e.g. sampleclr-v1")
    return name


_NO_TARGET_WORDS = frozenset({"", "none", "null", "false", "no", "off"})
NO_WRITE_BACK_FIX = ("pass --no-write-back (in a recipe: write_back: false) to write only the "
                     "embedding folder, or ./NAME for an experiment of that name")


def valid_write_back(target: str) -> bool:
    """Whether ``target`` can name the SOMA experiment results are written into.

    A path or URI; refused are the empty string and the words that mean "no write-back"
    (``none``, ``null``, ``false``, ``no``, ``off``, in any case), which would otherwise
    create an experiment of that name: ``--no-write-back`` says that.
    """
    return target.strip().lower() not in _NO_TARGET_WORDS


def check_write_back(target: str) -> str:
    """Return ``target``, or raise :class:`InputError` unless :func:`valid_write_back`."""
    if not valid_write_back(target):
        raise InputError(f"--write-back {target!r} is not a SOMA experiment path or URI",
                         NO_WRITE_BACK_FIX)
    return target


class EmbedConfig(StageConfig):
    """How every donor of a store is embedded with a trained model."""

    cells: int = Field(default=1000, ge=1)
    """Cells per donor ``m`` (SampleCLR infers from 1000); donors with fewer cells keep
    every cell and fill the bag by drawing with replacement. Ignored by ``mode: all``."""
    mode: SelectionMode = "random"
    """``random``: ``m`` cells drawn like the training views, seeded by (seed, donor):
    uniformly, or in the cohort's cell-type proportions for a model trained on views
    balanced over a column (``loader.balance``); ``centrality``: the ``m`` cells of lowest
    eigenvector centrality in the donor's k-nearest-neighbour graph (SampleCLR's inference
    rule, with a per-donor graph); ``all``: every cell. ``random`` is the default because
    the lowest-centrality cells are a biased subset that the model never saw in training
    (measured in benchmarks/README.md, "Which cells to embed")."""
    k: int = Field(default=15, ge=1)
    """Neighbours per cell in the centrality graph."""
    graph_cells: int | None = Field(default=20_000, ge=1)
    """Largest number of a donor's cells in its centrality graph (exact kNN costs
    ``n^2``): larger donors use their first ``graph_cells`` store rows, a uniform random
    subset because rows are in random order within each donor. None: every cell."""
    seed: int = 0
    """Seed of the random draws; the donor's position is mixed in."""
    workers: int = Field(default=2, ge=1)
    """Ray actors, each holding the model once (one CPU, or one GPU with use_gpu)."""
    batch_donors: int = Field(default=64, ge=1)
    """Donors per task (and per forward pass)."""
    use_gpu: bool = False
    """Run the model on one GPU per actor."""
    run_name: str | None = None
    """Name of the results where they are written back (``sampleclr/<run>`` in a SOMA
    experiment, ``embeddings/<run>`` in the store); default: the run directory's name."""
    overwrite: bool = False
    """Replace an existing embedding folder (atomically, after the new one is complete);
    anything else at ``out`` is refused."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.graph_cells is not None and self.graph_cells < self.cells:
            raise ValueError(f"graph_cells ({self.graph_cells}) must be at least cells "
                             f"({self.cells})")
        if self.run_name is not None and not valid_run_name(self.run_name):
            raise ValueError(f"run_name {self.run_name!r} must be {_RUN_NAME_RULE}")
        return self
