"""The self-supervised objectives: one config class and one builder each.

An objective is registered here with :func:`register`: a frozen pydantic config whose
``kind`` literal names it, and a builder ``(config, prior) -> nn.Module``. The training
config's ``loss`` (:data:`sampleclr_scale.config.LossConfig`) is the union of the
registered configs, discriminated by ``kind``; :func:`build_objective` makes the module.
Every objective module has the call signature of :class:`Objective`, so the training
loop calls any of them the same way. Adding an objective is a module with its loss and
one registration below.

This module imports no torch (the loss modules are imported by the builders), so reading
a config stays light.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from sampleclr_scale.errors import InputError
from sampleclr_scale.prior.graph import PriorKind

if TYPE_CHECKING:
    from torch import Tensor, nn

Temperature = Annotated[float, Field(gt=0, allow_inf_nan=False)]
"""A positive finite temperature."""
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]
"""A non-negative finite weight or stabiliser."""
Negatives = Literal["all", "same_batch"]
"""The X-CLR negatives: every donor of the global batch, or those of the anchor's batch."""


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


class ObjectiveConfig(BaseModel):
    """Base of the objectives' configs: frozen, unknown keys refused.

    The same model settings as :class:`sampleclr_scale.config.StageConfig` (which this
    module cannot import: the stage configs import the registry).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    kind: str
    """Name of the objective (each subclass narrows it to one literal)."""

    @property
    def store_prior(self) -> str | None:
        """The donor-similarity prior that the run loads from the bag store, or None."""
        return None

    @property
    def needs_batches(self) -> bool:
        """Whether the objective needs the donors' technical batch codes."""
        return False


Builder = Callable[[Any, "Tensor | None"], "nn.Module"]


@dataclass(frozen=True)
class Registration:
    """A registered objective: its config class and its builder."""

    config: type[ObjectiveConfig]
    build: Builder


REGISTRY: dict[str, Registration] = {}
"""Registered objectives by ``kind``, in registration order (the first is the default)."""


def register(config: type[ObjectiveConfig]) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder`` for ``config`` under its ``kind`` literal.

    Register before :mod:`sampleclr_scale.config` is imported: the union of the configs
    is made when it is.
    """
    kinds = get_args(config.model_fields["kind"].annotation)
    if len(kinds) != 1 or kinds[0] in REGISTRY:
        raise ValueError(f"{config.__name__}.kind must be one Literal not yet registered, "
                         f"got {kinds} (registered: {list(REGISTRY)})")
    kind = kinds[0]

    def decorate(builder: Builder) -> Builder:
        REGISTRY[kind] = Registration(config, builder)
        return builder

    return decorate


# --- the objectives ---------------------------------------------------------------------


class XCLRConfig(ObjectiveConfig):
    """X-CLR over the global batch of all workers; InfoNCE without a prior."""

    kind: Literal["xclr"] = "xclr"
    """X-Sample Contrastive loss (Sobal et al. 2024), the SampleCLR objective."""
    tau: Temperature = 0.1
    """Temperature of the representation similarities."""
    tau_graph: Temperature = 0.1
    """Temperature of the prior similarities (with a prior)."""
    prior: PriorKind | None = None
    """Donor similarity prior stored in the bag store (``sampleclr-scale prior``); None is
    the identity prior (InfoNCE)."""
    negatives: Negatives = "all"
    """Contrast each donor with every donor of the global batch (``all``) or only with
    the donors of its own technical batch (``same_batch``, needs the batches' codes)."""

    @property
    def store_prior(self) -> str | None:
        """The prior named by ``prior``."""
        return self.prior

    @property
    def needs_batches(self) -> bool:
        """True for negatives from the anchor's own batch."""
        return self.negatives == "same_batch"


@register(XCLRConfig)
def _build_xclr(config: XCLRConfig, prior: Tensor | None) -> nn.Module:
    from sampleclr_scale.losses.xclr import XCLRLoss

    return XCLRLoss(tau=config.tau, tau_graph=config.tau_graph, prior=prior,
                    negatives=config.negatives)


class VICRegConfig(ObjectiveConfig):
    """VICReg on the two views of the global batch (Bardes, Ponce & LeCun 2022)."""

    kind: Literal["vicreg"] = "vicreg"
    """Variance-invariance-covariance regularisation, for comparison."""
    lambda_: Weight = 25.0
    """Weight of the invariance term."""
    mu: Weight = 25.0
    """Weight of the variance term."""
    nu: Weight = 1.0
    """Weight of the covariance term."""
    eps: Weight = 1e-4
    """Stabiliser of the standard deviation in the variance term."""


@register(VICRegConfig)
def _build_vicreg(config: VICRegConfig, prior: Tensor | None) -> nn.Module:
    from sampleclr_scale.losses.vicreg import VICRegLoss

    return VICRegLoss(lambda_=config.lambda_, mu=config.mu, nu=config.nu, eps=config.eps)


class BarlowConfig(ObjectiveConfig):
    """Barlow Twins on the two views of the global batch (Zbontar et al. 2021)."""

    kind: Literal["barlow"] = "barlow"
    """Redundancy reduction between the views, for comparison."""
    lambda_: Weight = 5e-3
    """Weight of the redundancy-reduction term."""
    eps: Weight = 1e-5
    """Stabiliser of the batch standardisation."""


@register(BarlowConfig)
def _build_barlow(config: BarlowConfig, prior: Tensor | None) -> nn.Module:
    from sampleclr_scale.losses.barlow import BarlowTwinsLoss

    return BarlowTwinsLoss(lambda_=config.lambda_, eps=config.eps)


# --- the union and the builder ----------------------------------------------------------


def default_loss_config() -> ObjectiveConfig:
    """The default objective (the first registered, X-CLR) with its default settings."""
    return next(iter(REGISTRY.values())).config()


def loss_config_type() -> Any:
    """The union of the registered configs, discriminated by ``kind``.

    A mapping without ``kind`` is the default objective; a key that the chosen kind does
    not have is refused with the kinds that have it; errors are located at the key
    (``loss.prior``), not at pydantic's union member (``loss.xclr.prior``).
    """
    union = functools.reduce(operator.or_, (r.config for r in REGISTRY.values()))
    return Annotated[union, Field(discriminator="kind"), WrapValidator(_validate_loss)]


def _validate_loss(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    if isinstance(value, Mapping):
        value = {"kind": next(iter(REGISTRY)), **value}
        _check_keys(value)
    try:
        return handler(value)
    except ValidationError as err:
        errors = [{**e, "loc": e["loc"][1:] if e["loc"][:1] and e["loc"][0] in REGISTRY
                   else e["loc"]} for e in err.errors()]
        raise ValidationError.from_exception_data(err.title, errors) from None


def _check_keys(value: Mapping[str, Any]) -> None:
    """Refuse the keys that the chosen kind lacks, saying which kinds have them."""
    kind = value["kind"]
    if not isinstance(kind, str) or kind not in REGISTRY:
        return  # the discriminated union reports the unknown kind
    fields = [f for f in REGISTRY[kind].config.model_fields if f != "kind"]
    errors = []
    for key in sorted(value.keys() - {"kind", *fields}, key=str):
        owners = [k for k, r in REGISTRY.items() if key in r.config.model_fields]
        where = f"a setting of {' / '.join(owners)} only" if owners else "nor of any loss kind"
        message = f"not a setting of loss kind {kind!r} ({where}); {kind} settings: {fields}"
        errors.append({"type": PydanticCustomError("extra_forbidden", message),
                       "loc": (key,), "input": value[key]})
    if errors:
        raise ValidationError.from_exception_data("loss", errors)


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
    registration = REGISTRY.get(config.kind)
    if registration is None or not isinstance(config, registration.config):
        raise InputError(f"no objective is registered for {type(config).__name__} "
                         f"(kind {config.kind!r})", f"registered kinds: {sorted(REGISTRY)}")
    if (prior is None) != (config.store_prior is None):
        raise InputError(
            f"loss kind {config.kind!r} names prior {config.store_prior!r} but was given "
            f"{'no' if prior is None else 'a'} prior tensor",
            "load the named prior from the store (train.setup.load_prior_tensor)")
    return registration.build(config, prior)
