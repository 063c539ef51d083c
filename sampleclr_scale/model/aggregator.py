"""Cell-importance aggregation: H learned weightings of a bag's cells, concatenated."""

from __future__ import annotations

from typing import get_args

import torch
from torch import Tensor, nn

from sampleclr_scale.errors import InputError
from sampleclr_scale.model.blocks import ResidualMLP, _check_positive
from sampleclr_scale.model.config import NormKind, WeightingKind

_WEIGHTINGS = get_args(WeightingKind)


class CellImportanceAggregator(nn.Module):
    """Per-head weighted sums of a bag's cells, with learned cell-importance weights.

    SampleCLR ("Great patients embed alike: contrastive learning for sample representation
    from single-cell data", ICLR 2026 submission), section 4, module w: a per-cell MLP
    gives ``H`` importance logits per cell, each head's weights aggregate the bag by a
    weighted sum, and the ``H`` sums are concatenated (``a_i``, Algorithm 1). A
    multi-head form of attention-based multiple-instance pooling (Ilse et al.,
    "Attention-based deep multiple instance learning", ICML 2018).

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
        Dropout in the scoring MLP.
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
    ) -> None:
        super().__init__()
        _check_positive("CellImportanceAggregator", input_dim=input_dim, n_heads=n_heads)
        if weighting not in _WEIGHTINGS:
            raise InputError(f"unknown weighting {weighting!r}",
                             f"use one of {', '.join(_WEIGHTINGS)}")
        self.input_dim = input_dim
        self.n_heads = n_heads
        self.weighting = weighting
        self.scorer = ResidualMLP(input_dim, hidden, n_heads, n_layers, norm, dropout)

    @property
    def output_dim(self) -> int:
        """Size ``H * d`` of the aggregated vector."""
        return self.n_heads * self.input_dim

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
            ``aggregated`` ``[B, H * d]``, head ``h`` in columns ``h*d:(h+1)*d``
            (``sum_i weights[b, i, h] * cells[b, i]``), and ``weights`` ``[B, m, H]``,
            zero at padded cells.
        """
        _check_bags(cells, mask, self.input_dim)
        scores = self.scorer(cells[mask])
        logits = scores.new_full((*mask.shape, self.n_heads), float("-inf"))
        logits[mask] = scores
        if self.weighting == "softmax":
            weights = torch.softmax(logits, dim=1)
        else:
            n_real = mask.sum(dim=1).to(scores.dtype)
            weights = torch.sigmoid(logits) / n_real[:, None, None]
        real_cells = cells.masked_fill(~mask.unsqueeze(-1), 0.0)
        aggregated = torch.einsum("bmh,bmd->bhd", weights, real_cells).flatten(1)
        return aggregated, weights

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, n_heads={self.n_heads}, weighting={self.weighting!r}"


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
