"""A batch adversary on the sample representation: a classifier behind gradient reversal.

Domain-adversarial training (Ganin & Lempitsky, "Unsupervised domain adaptation by
backpropagation", ICML 2015; Ganin et al., "Domain-adversarial training of neural
networks", JMLR 2016): a classifier learns to tell a donor's technical batch from its
representation, while the gradient that reaches the representation is reversed, so the
encoder learns to make the batches indistinguishable. The model-side counterpart of the
store's per-(batch, cell type) correction, which acts on the cells before the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sampleclr_scale.model.heads import ClassificationHead


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient negated backward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        return -grad


def reverse_gradient(x: Tensor) -> Tensor:
    """``x`` unchanged, with its gradient negated on the way back (Ganin & Lempitsky 2015).

    Parameters
    ----------
    x : Tensor
        Any tensor.

    Returns
    -------
    Tensor
        A tensor equal to ``x`` whose gradient flows back to ``x`` times -1.
    """
    return _ReverseGradient.apply(x)


class BatchAdversary(nn.Module):
    """Logits of a donor's technical batch from its unit-norm representation, behind a
    gradient reversal.

    Domain-adversarial training (Ganin & Lempitsky, ICML 2015): the classifier minimises
    its cross-entropy; the encoder, through :func:`reverse_gradient`, maximises it. The
    classifier reads ``z`` scaled to unit norm, the representation that the contrastive
    loss and the SPARE metrics compare (by cosine).

    Parameters
    ----------
    in_dim : int
        Representation size.
    n_batches : int
        Technical batches to tell apart (at least 2).
    hidden, n_layers : int
        Hidden width and number of Linear layers of the classifier.

    Examples
    --------
    >>> adversary = BatchAdversary(in_dim=8, n_batches=3)
    >>> adversary(torch.randn(5, 8)).shape
    torch.Size([5, 3])
    """

    def __init__(self, in_dim: int, n_batches: int, hidden: int = 16, n_layers: int = 2
                 ) -> None:
        super().__init__()
        self.classifier = ClassificationHead(in_dim, n_batches, hidden, n_layers)

    def forward(self, z: Tensor) -> Tensor:
        """``[b, n_batches]`` batch logits of the representations ``z`` ``[b, in_dim]``."""
        return self.classifier(reverse_gradient(F.normalize(z, dim=-1)))
