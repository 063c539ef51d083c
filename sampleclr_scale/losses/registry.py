"""The self-supervised objectives: each config class and the loss module it builds.

:data:`OBJECTIVES` maps every config of :data:`~sampleclr_scale.losses.configs.LOSS_CONFIGS`
to its loss module's class, whose ``from_config(config, prior)`` builds it;
:func:`build_objective` makes the module. Every objective has the call signature of
:class:`Objective`, so the training loop calls any of them the same way. Adding an
objective: a loss module with ``from_config``, its config class in
:mod:`~sampleclr_scale.losses.configs`, and one line in :data:`OBJECTIVES`.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from sampleclr_scale.errors import InputError
from sampleclr_scale.losses.barlow import BarlowTwinsLoss
from sampleclr_scale.losses.configs import (
    BarlowConfig,
    ObjectiveConfig,
    VICRegConfig,
    XCLRConfig,
)
from sampleclr_scale.losses.vicreg import VICRegLoss
from sampleclr_scale.losses.xclr import XCLRLoss


class Objective(Protocol):
    """The call signature shared by every objective module."""

    def __call__(self, z_a: Tensor, z_b: Tensor, donor_index: Tensor,
                 batch_index: Tensor | None = None) -> Tensor:
        """Scalar loss of this rank's ``[b, D]`` views ``z_a, z_b``.

        ``donor_index`` holds the ``[b]`` global donor ids of the rows and
        ``batch_index`` their ``[b]`` technical batch codes (or None); objectives that
        do not use them ignore them.
        """
        ...


OBJECTIVES: dict[type[ObjectiveConfig], type[nn.Module]] = {
    XCLRConfig: XCLRLoss,
    VICRegConfig: VICRegLoss,
    BarlowConfig: BarlowTwinsLoss,
}
"""The loss module of each objective's config class (all of ``LOSS_CONFIGS``)."""


def build_objective(config: ObjectiveConfig, prior: Tensor | None = None) -> nn.Module:
    """The loss module of ``config``.

    Parameters
    ----------
    config : ObjectiveConfig
        A registered objective's config (``TrainConfig.loss``).
    prior : Tensor, optional
        ``[n_donors, n_donors]`` donor similarity loaded for ``config.store_prior``;
        required exactly when the config names a prior.

    Returns
    -------
    nn.Module
        The objective, called as :class:`Objective`.
    """
    loss = OBJECTIVES.get(type(config))
    if loss is None:
        raise InputError(f"no objective is registered for {type(config).__name__} "
                         f"(kind {config.kind!r})",
                         f"registered: {sorted(c.__name__ for c in OBJECTIVES)}")
    if (prior is None) != (config.store_prior is None):
        raise InputError(
            f"loss kind {config.kind!r} names prior {config.store_prior!r} but was given "
            f"{'no' if prior is None else 'a'} prior tensor",
            "load the named prior from the store (train.setup.load_prior_tensor)")
    return loss.from_config(config, prior)
