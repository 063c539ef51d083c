"""The residual MLP that both the cell-importance aggregator and the encoder are made of."""

from __future__ import annotations

from typing import get_args

from torch import Tensor, nn

from sampleclr_scale.errors import InputError
from sampleclr_scale.model.config import NormKind

_NORMS = get_args(NormKind)


class ResidualMLP(nn.Module):
    """Residual MLP: input layer, residual hidden blocks, output layer.

    SampleCLR ("Great patients embed alike: contrastive learning for sample representation
    from single-cell data", ICLR 2026 submission), appendix A.4: "input and output layers,
    transforming the data to correct dimensionality, and the series of hidden
    fully-connected layers of fixed dimensionality with residual connections. Each layer is
    followed by either batch or layer normalisation and ReLU" (skip connections as in
    He et al., "Deep residual learning for image recognition", CVPR 2016).

    ``x -> relu(norm(W_0 x)) = h``; ``h <- h + relu(norm(W_k h))`` for
    ``k = 1..n_layers-1``; ``-> W_out h``. Dropout, when set, follows each ReLU.

    Parameters
    ----------
    in_dim, hidden, out_dim : int
        Input, hidden and output widths.
    n_layers : int
        Linear layers of width ``hidden``: the input layer and ``n_layers - 1`` residual
        blocks (the paper's ``num_layers``). The output Linear is not counted.
    norm : {"layernorm", "batchnorm", "none"}
        Normalisation after each hidden Linear.
    dropout : float
        Dropout probability after each hidden ReLU, in ``[0, 1)``.

    Notes
    -----
    Inputs may have any leading dimensions (``[..., in_dim]``); they are flattened into
    rows first, so BatchNorm normalises over all rows.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int,
        out_dim: int,
        n_layers: int,
        norm: NormKind = "layernorm",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_positive("ResidualMLP", in_dim=in_dim, hidden=hidden, out_dim=out_dim,
                        n_layers=n_layers)
        if norm not in _NORMS:
            raise InputError(f"unknown norm {norm!r}", f"use one of {', '.join(_NORMS)}")
        _check_dropout("ResidualMLP", dropout)
        self.in_dim = in_dim
        self.input = _hidden_layer(in_dim, hidden, norm, dropout)
        self.blocks = nn.ModuleList(
            _hidden_layer(hidden, hidden, norm, dropout) for _ in range(n_layers - 1)
        )
        self.output = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[..., in_dim]`` to ``[..., out_dim]``.

        Parameters
        ----------
        x : Tensor
            Inputs with ``in_dim`` features in the last dimension.

        Returns
        -------
        Tensor
            Outputs with the same leading dimensions.
        """
        if x.shape[-1] != self.in_dim:
            raise InputError(
                f"ResidualMLP expects {self.in_dim} input features, got shape {tuple(x.shape)}",
                "pass inputs whose last dimension matches in_dim",
            )
        h = self.input(x.reshape(-1, self.in_dim))
        for block in self.blocks:
            h = h + block(h)
        return self.output(h).reshape(*x.shape[:-1], -1)


def _hidden_layer(in_dim: int, out_dim: int, norm: NormKind, dropout: float) -> nn.Sequential:
    """Linear, optional norm, ReLU, optional dropout."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    if norm == "layernorm":
        layers.append(nn.LayerNorm(out_dim))
    elif norm == "batchnorm":
        layers.append(nn.BatchNorm1d(out_dim))
    layers.append(nn.ReLU())
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _check_positive(owner: str, **sizes: int) -> None:
    """Raise :class:`InputError` unless every size is a positive integer."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{owner}: {name} must be a positive integer, got {value!r}",
                             f"pass {name} >= 1")


def _check_dropout(owner: str, dropout: float) -> None:
    """Raise :class:`InputError` unless ``dropout`` is a probability in ``[0, 1)``."""
    if not 0.0 <= dropout < 1.0:
        raise InputError(f"{owner}: dropout must lie in [0, 1), got {dropout!r}",
                         "pass a probability such as 0.1, or 0 to disable dropout")
