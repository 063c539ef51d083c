"""The batch adversary's loss: cross-entropy of the donors' technical batches.

Domain-adversarial training (Ganin & Lempitsky, "Unsupervised domain adaptation by
backpropagation", ICML 2015): the adversary
(:class:`~sampleclr_scale.model.adversary.BatchAdversary`) minimises this loss, and the
gradient reversal in front of it makes the encoder maximise it. Each view is classified
on its own; a donor's two views share its batch.

Under DDP each rank averages over its own rows and DDP averages the gradients over the
ranks: with equal rows per rank (the loader's batches), the loss and gradients of a
1-process run on the whole global batch.
"""

from __future__ import annotations

from torch import Tensor

from sampleclr_scale.losses.tasks import classification_loss


def batch_adversary_loss(logits_a: Tensor, logits_b: Tensor, batch_index: Tensor) -> Tensor:
    """Mean cross-entropy of both views' batch logits.

    Parameters
    ----------
    logits_a, logits_b : Tensor
        ``[b, n_batches]`` the adversary's logits of the first and second views.
    batch_index : Tensor
        ``[b]`` the donors' technical batch codes in ``0..n_batches-1``.

    Returns
    -------
    Tensor
        Scalar ``(CE(logits_a) + CE(logits_b)) / 2``, each the mean over the rows.
    """
    return 0.5 * (classification_loss(logits_a, batch_index)
                  + classification_loss(logits_b, batch_index))
