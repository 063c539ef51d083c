"""What one embedding worker computes: donors' cells through a trained model.

:func:`embed_donors` draws each donor's cells as the model trained (:mod:`~sampleclr_scale
.embed.selection`), standardises them as the model saw them, and runs the forward pass in
groups of at most :data:`_CELL_BUDGET` cells. :class:`EmbedWorker` holds a store and a
model for many such calls: a Ray actor of :func:`~sampleclr_scale.embed.embedder.embed`,
or the calling process's one worker (``in_process``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sampleclr_scale.embed.config import (
    EmbedConfig,
)
from sampleclr_scale.embed.selection import select_balanced, select_cells
from sampleclr_scale.model import SampleCLR
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.type_batches import apply_affine
from sampleclr_scale.train.artifact import load_model

_CELL_BUDGET = 1 << 20
"""Most cells (bags x padded bag length) in one forward pass (``mode: all``)."""


@dataclass(frozen=True)
class EmbeddedBatch:
    """What one task returns: the results of a run of donors."""

    donors: np.ndarray
    """Int64 ``[B]`` donor positions."""
    z: np.ndarray
    """Float32 ``[B, D]`` representations."""
    counts: np.ndarray
    """Int64 ``[B]`` chosen cells per donor (rows of the arrays below, donor by donor)."""
    store_rows: np.ndarray
    """Int64 ``[sum(counts)]`` store rows of the chosen cells."""
    source_joinids: np.ndarray
    """Int64 ``[sum(counts)]`` their ids in the source."""
    weights: np.ndarray
    """Float32 ``[sum(counts), H]`` their weights per head."""
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    """Float32 ``[B, k]`` supervised head outputs by task name, from the same forward
    pass as ``z`` (empty without heads)."""


def training_balance(artifact: dict[str, Any]) -> str | None:
    """The cell-level column a model's training views were balanced over, or None."""
    return artifact.get("balance")


def embed_donors(store: BagStore, model: SampleCLR, donors: list[int], config: EmbedConfig,
                 device: str = "cpu", standardize: bool | str | None = False,
                 balance: str | None = None,
                 composition: torch.Tensor | None = None,
                 half: int | None = None) -> EmbeddedBatch:
    """Select cells and embed a run of donors (the body of one task).

    Parameters
    ----------
    store
        The bag store.
    model
        The model, in eval mode, on ``device``.
    donors
        Donor positions, ascending (consecutive, as the tasks are: their source ids are
        read in one range).
    config
        Selection settings (``cells``, ``mode``, ``k``, ``graph_cells``, ``seed``).
    device
        Torch device of the model.
    standardize
        Standardise each donor's cells as the model was trained (the artifact's
        ``standardize``): True or ``"batch"`` with its batch's statistics,
        ``"batch_cell_type"`` with its (batch, cell type) pairs' maps.
    balance
        The cell-level column the model's training views were balanced over
        (``LoaderConfig.balance``): ``mode: random`` then draws the cells the same way
        (:func:`~sampleclr_scale.embed.selection.select_balanced`).
    composition
        Float32 ``[n_donors, K]`` every store donor's composition as the model's heads
        read it (:func:`~sampleclr_scale.train.setup.head_inputs`); None when they read z
        alone.
    half
        0 or 1: draw each donor's cells from its rows at even (0) or odd (1) offsets only,
        two disjoint halves of its cells (a donor's rows are stored in random order; the
        split-half reliability of :mod:`~sampleclr_scale.store.channel_weight`); None:
        from all its rows.

    Returns
    -------
    EmbeddedBatch
        The donors' representations and their chosen cells' weights.
    """
    first = int(store.donor_ptr[donors[0]])
    ids = store.source_joinid(first, int(store.donor_ptr[donors[-1] + 1]))
    target = None
    if balance is not None and config.mode == "random":
        counts = store.category_counts(balance).astype(np.float64)
        target = counts / counts.sum()
    batch = store.donor_batch if standardize else None
    codes = None if target is None else store.codes(balance)
    maps = store.batch_type_maps if standardize == "batch_cell_type" else None
    bags, rows = [], []
    for donor in donors:
        start, stop = int(store.donor_ptr[donor]), int(store.donor_ptr[donor + 1])
        if config.mode == "centrality" and config.graph_cells is not None:
            stop = min(stop, start + config.graph_cells)
        x = np.asarray(store.features[start:stop], dtype=np.float32)
        if maps is not None:
            x = apply_affine(x, maps[0], maps[1], int(batch[donor]),
                             np.asarray(store.codes(maps[2])[start:stop]))
        elif standardize:
            x = store.standardize(x, int(batch[donor]))
        offsets = np.arange(half, stop - start, 2) if half is not None else None
        if offsets is not None:
            x = x[offsets]
        if target is None:
            chosen = select_cells(x, config.cells, config.mode, k=config.k, seed=config.seed,
                                  donor=donor)
        else:
            own = np.asarray(codes[start:stop])
            chosen = select_balanced(own if offsets is None else own[offsets], config.cells,
                                     target, config.seed, donor)
        bags.append(x[chosen])
        rows.append(start + (chosen if offsets is None else offsets[chosen]))
    store_rows = np.concatenate(rows)
    z, weights, outputs = _forward(
        model, bags, device, None if composition is None else composition[donors])
    return EmbeddedBatch(np.asarray(donors, dtype=np.int64), z,
                         np.array([len(b) for b in bags], dtype=np.int64), store_rows,
                         ids[store_rows - first], weights, outputs)


def _forward(model: SampleCLR, bags: list[np.ndarray], device: str,
             composition: torch.Tensor | None = None
             ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """``z`` ``[B, D]``, the real cells' weights ``[sum(n_b), H]`` and the head outputs
    ``[B, k]`` by task of padded batches (the heads reading ``composition``, ``[B, K]``,
    where the model's do)."""
    zs, weights = [], []
    outputs: dict[str, list[np.ndarray]] = {}
    for group in _groups([len(b) for b in bags]):
        length = max(len(bags[i]) for i in group)
        cells = np.zeros((len(group), length, bags[group[0]].shape[1]), dtype=np.float32)
        mask = np.zeros((len(group), length), dtype=bool)
        for row, i in enumerate(group):
            cells[row, : len(bags[i])] = bags[i]
            mask[row, : len(bags[i])] = True
        with torch.no_grad():
            out = model(torch.from_numpy(cells).to(device), torch.from_numpy(mask).to(device),
                        composition=None if composition is None
                        else composition[group].to(device))
        zs.append(out.z.float().cpu().numpy())
        w = out.weights.float().cpu().numpy()
        weights.extend(w[row, : len(bags[i])] for row, i in enumerate(group))
        for name, values in out.task_outputs.items():
            outputs.setdefault(name, []).append(values.float().cpu().numpy())
    return (np.concatenate(zs), np.concatenate(weights),
            {name: np.concatenate(parts) for name, parts in outputs.items()})


def _groups(lengths: list[int]) -> list[list[int]]:
    """Consecutive bags grouped so that each padded forward pass fits the cell budget."""
    groups: list[list[int]] = [[]]
    longest = 0
    for i, n in enumerate(lengths):
        if groups[-1] and (len(groups[-1]) + 1) * max(longest, n) > _CELL_BUDGET:
            groups.append([])
            longest = 0
        groups[-1].append(i)
        longest = max(longest, n)
    return groups


class EmbedWorker:
    """A Ray actor: the model, loaded once, and the store, opened once.

    Parameters
    ----------
    store_path, run_dir
        The bag store and the training run (``RUN/model.pt``).
    config
        The embedding config as a mapping.
    limit_threads
        Use one CPU thread (an actor holds one CPU); an in-process worker leaves the
        process's setting alone.
    composition
        Every store donor's composition as the model's heads read it
        (:func:`~sampleclr_scale.train.setup.head_inputs`, computed once by the driver);
        None when they read z alone.
    """

    def __init__(self, store_path: str, run_dir: str, config: dict[str, Any],
                 limit_threads: bool = True, composition: torch.Tensor | None = None
                 ) -> None:
        self.config = EmbedConfig.model_validate(config)
        self.device = "cuda" if self.config.use_gpu else "cpu"
        if limit_threads and not self.config.use_gpu:
            torch.set_num_threads(1)
        self.store = BagStore(store_path)
        model, artifact = load_model(run_dir)
        self.model = model.to(self.device)
        mode = artifact.get("standardize")
        self.standardize = "batch" if mode is True else (mode or None)
        self.balance = training_balance(artifact)
        self.composition = composition

    def ready(self) -> bool:
        """True once constructed (the driver waits on it before starting the clock)."""
        return True

    def embed(self, donors: list[int]) -> EmbeddedBatch:
        """Embed a run of donors (see :func:`embed_donors`)."""
        return embed_donors(self.store, self.model, donors, self.config, self.device,
                            self.standardize, self.balance, self.composition)
