"""Losses of SampleCLR: X-CLR over the global batch, VICReg, Barlow Twins, task losses, the
batch adversary's loss.

Pure torch, no I/O. Each loss is a thin ``nn.Module`` over pure term functions that are
tested separately. The pairwise losses gather the views of all data-parallel ranks with
:func:`gather_with_grad`, so a DDP run gives the loss and gradients of a 1-process run on
the concatenated batch. The objectives' settings are in
:mod:`sampleclr_scale.losses.configs` (a leaf the stage configs import, without torch),
and the loss module of each in :mod:`sampleclr_scale.losses.registry`.

The names below are imported on first use, so that importing the package (for its
configs) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sampleclr_scale._lazy import lazy_exports

if TYPE_CHECKING:
    from sampleclr_scale.losses.adversary import batch_adversary_loss
    from sampleclr_scale.losses.barlow import (
        BarlowTwinsLoss,
        barlow_cross_correlation,
        barlow_invariance,
        barlow_redundancy,
    )
    from sampleclr_scale.losses.configs import (
        BarlowConfig,
        ObjectiveConfig,
        VICRegConfig,
        XCLRConfig,
    )
    from sampleclr_scale.losses.gather import gather_no_grad, gather_with_grad
    from sampleclr_scale.losses.registry import build_objective
    from sampleclr_scale.losses.tasks import (
        MISSING_LABEL,
        TASK_KINDS,
        TaskLoss,
        classification_loss,
        ordinal_loss,
        ordinal_predict,
        regression_loss,
    )
    from sampleclr_scale.losses.vicreg import (
        VICRegLoss,
        vicreg_covariance,
        vicreg_invariance,
        vicreg_variance,
    )
    from sampleclr_scale.losses.xclr import (
        XCLRLoss,
        same_batch_mask,
        soft_cross_entropy,
        xclr_loss,
        xclr_targets,
    )

__all__ = [
    "MISSING_LABEL",
    "TASK_KINDS",
    "BarlowConfig",
    "BarlowTwinsLoss",
    "ObjectiveConfig",
    "TaskLoss",
    "VICRegConfig",
    "VICRegLoss",
    "XCLRConfig",
    "XCLRLoss",
    "barlow_cross_correlation",
    "barlow_invariance",
    "barlow_redundancy",
    "batch_adversary_loss",
    "build_objective",
    "classification_loss",
    "gather_no_grad",
    "gather_with_grad",
    "ordinal_loss",
    "ordinal_predict",
    "regression_loss",
    "same_batch_mask",
    "soft_cross_entropy",
    "vicreg_covariance",
    "vicreg_invariance",
    "vicreg_variance",
    "xclr_loss",
    "xclr_targets",
]

__getattr__, __dir__ = lazy_exports(
    __name__, ("adversary", "configs", "gather", "registry", "tasks", "vicreg", "barlow",
               "xclr"), __all__)
