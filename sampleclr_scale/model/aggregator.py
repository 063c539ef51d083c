"""Cell-importance aggregation: H learned weightings of a bag's cells, concatenated."""

from __future__ import annotations

from typing import get_args

import torch
from torch import Tensor, nn

from sampleclr_scale.errors import InputError
from sampleclr_scale.model.blocks import ResidualMLP, _check_positive
from sampleclr_scale.model.config import NormKind, PoolingKind, WeightingKind

_WEIGHTINGS = get_args(WeightingKind)
_POOLINGS = get_args(PoolingKind)


class CellImportanceAggregator(nn.Module):
    """Per-head weighted sums of a bag's cells, with learned cell-importance weights.

    SampleCLR ("Great patients embed alike: contrastive learning for sample representation
    from single-cell data", ICLR 2026 submission), section 4, module w: a per-cell MLP
    gives ``H`` importance logits per cell, each head's weights aggregate the bag by a
    weighted sum, and the ``H`` sums are concatenated (``a_i``, Algorithm 1). A
    multi-head form of attention-based multiple-instance pooling (Ilse et al.,
    "Attention-based deep multiple instance learning", ICML 2018).

    What is pooled (``pooling``): the raw cell features (``"cells"``, the paper's
    module), learned per-cell features ``phi(x)`` of a per-cell residual MLP
    (``"learned"``: DeepSets pooling, Zaheer et al., "Deep Sets", NeurIPS 2017, with
    attention weights), or both, concatenated (``"both"``). A weighted mean of raw
    features changes with a mean-preserving change of a cell type's state distribution
    (a split, a wider spread) only through asymmetric weights; the mean of a non-linear
    ``phi`` sees such changes directly. The per-cell weights stay, for interpretability.

    With ``center``, each bag's mean cell is subtracted from its cells first, so the
    representation does not change when every cell of a donor moves by the same vector:
    an additive technical shift of a site, or a donor's own offset. Those identify a donor
    more easily than the shape of its cell-state distribution and, left in, crowd it out
    of a contrastive representation (benchmarks/README.md, "Quality"). Differences
    between cell types, and so composition, stay visible.

    Weights are a deterministic function of the cells: no Gumbel or other sampling noise
    (the reference code's Gumbel-softmax at inference made embeddings random). Padded cells
    (mask False) never enter the scoring MLP (so BatchNorm statistics and the real cells'
    scores ignore them), get a weight of exactly zero, and are zeroed before the sum (so
    even infinite or NaN padding cannot leak into the result).

    Parameters
    ----------
    input_dim : int
        Cell feature dimension d.
    n_heads : int
        Importance heads H.
    hidden, n_layers : int
        Width and hidden-width Linear layers of the per-cell scoring MLP.
    norm : {"layernorm", "batchnorm", "none"}
        Normalisation in the scoring MLP.
    weighting : {"softmax", "sigmoid"}
        ``"softmax"``: ``softmax`` of the logits over the bag's real cells, per head
        (weights sum to 1). ``"sigmoid"``: ``sigmoid(logit) / n_real`` (each weight in
        ``[0, 1/n_real]``; the sum, the mean importance, keeps the abundance of important
        cells). Both are invariant to duplicating every cell of a bag.
    dropout : float
        Dropout in the scoring MLP and the cell-feature MLP.
    pooling : {"cells", "learned", "both"}
        What each head's weights sum: raw cell features, learned cell features, or both.
    cell_dim, cell_hidden, cell_layers : int
        Output width, hidden width and hidden-width layers of the cell-feature MLP
        ``phi`` (used by ``"learned"`` and ``"both"``).
    center : bool
        Subtract each bag's mean cell (over its real cells) before scoring and pooling.
    """

    def __init__(
        self,
        input_dim: int,
        n_heads: int = 4,
        hidden: int = 32,
        n_layers: int = 2,
        norm: NormKind = "layernorm",
        weighting: WeightingKind = "softmax",
        dropout: float = 0.0,
        pooling: PoolingKind = "cells",
        cell_dim: int = 32,
        cell_hidden: int = 64,
        cell_layers: int = 2,
        center: bool = False,
    ) -> None:
        super().__init__()
        _check_positive("CellImportanceAggregator", input_dim=input_dim, n_heads=n_heads,
                        cell_dim=cell_dim)
        for name, value, allowed in (("weighting", weighting, _WEIGHTINGS),
                                     ("pooling", pooling, _POOLINGS)):
            if value not in allowed:
                raise InputError(f"unknown {name} {value!r}", f"use one of {', '.join(allowed)}")
        self.input_dim = input_dim
        self.n_heads = n_heads
        self.weighting = weighting
        self.pooling = pooling
        self.center = center
        self.scorer = ResidualMLP(input_dim, hidden, n_heads, n_layers, norm, dropout)
        self.cell_encoder = None if pooling == "cells" else ResidualMLP(
            input_dim, cell_hidden, cell_dim, cell_layers, norm, dropout)
        self.pooled_dim = (input_dim if pooling != "learned" else 0) + (
            cell_dim if pooling != "cells" else 0)

    @property
    def output_dim(self) -> int:
        """Size ``H * p`` of the aggregated vector (``p`` pooled features per head)."""
        return self.n_heads * self.pooled_dim

    def forward(self, cells: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Aggregate each bag.

        Parameters
        ----------
        cells : Tensor
            ``[B, m, d]`` cell features.
        mask : Tensor
            ``[B, m]`` bool, True for real cells; every bag needs at least one.

        Returns
        -------
        tuple[Tensor, Tensor]
            ``aggregated`` ``[B, H * p]``, head ``h`` in columns ``h*p:(h+1)*p``
            (``sum_i weights[b, i, h] * f(cells[b, i])``, ``f`` the identity, ``phi`` or
            both concatenated), and ``weights`` ``[B, m, H]``, zero at padded cells.
        """
        _check_bags(cells, mask, self.input_dim)
        if self.center:
            cells = cells - _bag_means(cells, mask).unsqueeze(1)
        real = cells[mask]
        scores = self.scorer(real)
        logits = scores.new_full((*mask.shape, self.n_heads), float("-inf"))
        logits[mask] = scores
        if self.weighting == "softmax":
            weights = torch.softmax(logits, dim=1)
        else:
            n_real = mask.sum(dim=1).to(scores.dtype)
            weights = torch.sigmoid(logits) / n_real[:, None, None]
        parts = [] if self.pooling == "learned" else [real]
        if self.cell_encoder is not None:
            parts.append(self.cell_encoder(real))
        rows = torch.cat(parts, dim=-1)  # float32 cells beside bf16 ones under autocast
        pooled = rows.new_zeros((*mask.shape, self.pooled_dim))
        pooled[mask] = rows  # padding stays exactly zero
        aggregated = torch.einsum("bmh,bmp->bhp", weights, pooled).flatten(1)
        return aggregated, weights

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, n_heads={self.n_heads}, "
                f"weighting={self.weighting!r}, pooling={self.pooling!r}, center={self.center}")


def _bag_means(cells: Tensor, mask: Tensor) -> Tensor:
    """``[B, d]`` mean of each bag's real cells (padding, even non-finite, ignored)."""
    real_cells = cells.masked_fill(~mask.unsqueeze(-1), 0.0)
    return real_cells.sum(dim=1) / mask.sum(dim=1, keepdim=True).to(cells.dtype)


def _check_bags(cells: Tensor, mask: Tensor, input_dim: int) -> None:
    """Raise :class:`InputError` unless ``cells``/``mask`` are well-formed, non-empty bags."""
    if cells.ndim != 3 or cells.shape[-1] != input_dim:
        raise InputError(
            f"cells must be [B, m, {input_dim}], got {tuple(cells.shape)}",
            "pass one bag of cells per row, with the model's input_dim features",
        )
    if mask.dtype != torch.bool or mask.shape != cells.shape[:2]:
        raise InputError(
            f"mask must be bool [B, m] = {tuple(cells.shape[:2])}, got {mask.dtype} "
            f"{tuple(mask.shape)}",
            "pass the loader's mask: True for real cells, False for padding",
        )
    if not bool(mask.any(dim=1).all()):
        raise InputError("a bag has no real cell (its mask is all False)",
                         "give every bag at least one real cell")
