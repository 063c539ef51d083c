"""The self-supervised objectives' settings: one config class each, and their union.

The training config's ``loss`` (:data:`sampleclr_scale.config.LossConfig`) is the union of
:data:`LOSS_CONFIGS`, discriminated by ``kind``. This module is a leaf: it imports
neither torch nor the loss modules, so reading a config stays light;
:mod:`sampleclr_scale.losses.registry` maps each config class to the loss module that it
builds.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from sampleclr_scale._types import PriorKind

Temperature = Annotated[float, Field(gt=0, allow_inf_nan=False)]
"""A positive finite temperature."""
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]
"""A non-negative finite weight or stabiliser."""
Negatives = Literal["all", "same_batch"]
"""The X-CLR negatives: every donor of the global batch, or those of the anchor's batch."""


class ObjectiveConfig(BaseModel):
    """Base of the objectives' configs: frozen, unknown keys refused.

    The same model settings as :class:`sampleclr_scale.config.StageConfig` (which this
    module does not import: the stage configs import it).
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


class XCLRConfig(ObjectiveConfig):
    """X-CLR over the global batch of all workers; InfoNCE without a prior."""

    kind: Literal["xclr"] = "xclr"
    """X-Sample Contrastive loss (Sobal et al. 2024), the SampleCLR objective."""
    tau: Temperature = 0.5
    """Temperature of the representation similarities. 0.5, not the paper's 0.1: at 0.1 the
    uniformity the loss asks for spreads the donors over the sphere as training goes on,
    and what varies continuously between them goes with it (``realistic`` cohort, five
    seeds: SPARE total 0.79 after 20 epochs, 0.70 after 40, trajectory 0.83 -> 0.69); at
    0.5, 0.82 after 40 (benchmarks/README.md, "Every scenario at 40 epochs")."""
    tau_graph: Temperature = 0.1
    """Temperature of the prior similarities (with a prior)."""
    prior: PriorKind | None = "gloscope"
    """Donor similarity prior stored in the bag store (``sampleclr-scale prior``; ``train``
    builds it with the prior stage's defaults into a store that has none); None is the
    identity prior (InfoNCE). GloScope by default: without a prior X-CLR places the
    severity levels of held-out donors about equally far apart (held-out trajectory of z
    0.25-0.33 on the ``realistic`` cohort), with it they keep their order (0.95-0.97);
    with the learned block standardised beside the composition channel
    (``TrainConfig.learned_block``) and the channel's weight fitted to the prior
    (``TrainConfig.composition_channel``), the worst margin over the best baseline of the
    quality benchmark's seven scenarios (all and held-out donors) was -0.008, mean over
    three draws of five seeds each, against -0.034 for the defaults without a prior on
    one draw; weighing the learned block by its split-half reliability then raised that
    worst scenario's (``composition``) to +0.000 / -0.000 (benchmarks/README.md, "Three
    draws of every cohort", "The GloScope prior by default", "The learned block's
    split-half reliability")."""
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


class BarlowConfig(ObjectiveConfig):
    """Barlow Twins on the two views of the global batch (Zbontar et al. 2021)."""

    kind: Literal["barlow"] = "barlow"
    """Redundancy reduction between the views, for comparison."""
    lambda_: Weight = 5e-3
    """Weight of the redundancy-reduction term."""
    eps: Weight = 1e-5
    """Stabiliser of the batch standardisation."""


LOSS_CONFIGS: tuple[type[ObjectiveConfig], ...] = (XCLRConfig, VICRegConfig, BarlowConfig)
"""Every objective's config class; the first is the default. A new objective adds its
config here and its loss module in :data:`sampleclr_scale.losses.registry.OBJECTIVES`
(a test checks that the two agree)."""


def _kind(config: type[ObjectiveConfig]) -> str:
    """The one ``kind`` literal of a config class."""
    kinds = get_args(config.model_fields["kind"].annotation)
    if len(kinds) != 1:
        raise TypeError(f"{config.__name__}.kind must be one Literal, got {kinds}")
    return kinds[0]


_BY_KIND: dict[str, type[ObjectiveConfig]] = {_kind(c): c for c in LOSS_CONFIGS}


def default_loss_config() -> ObjectiveConfig:
    """The default objective (the first of :data:`LOSS_CONFIGS`, X-CLR), default settings."""
    return LOSS_CONFIGS[0]()


def loss_config_type() -> Any:
    """The union of :data:`LOSS_CONFIGS`, discriminated by ``kind``.

    A mapping without ``kind`` is the default objective; a key that the chosen kind does
    not have is refused with the kinds that have it; errors are located at the key
    (``loss.prior``), not at pydantic's union member (``loss.xclr.prior``).
    """
    union = functools.reduce(operator.or_, LOSS_CONFIGS)
    return Annotated[union, Field(discriminator="kind"), WrapValidator(_validate_loss)]


def _validate_loss(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    if isinstance(value, Mapping):
        value = {"kind": _kind(LOSS_CONFIGS[0]), **value}
        _check_keys(value)
    try:
        return handler(value)
    except ValidationError as err:
        errors = [{**e, "loc": e["loc"][1:] if e["loc"][:1] and e["loc"][0] in _BY_KIND
                   else e["loc"]} for e in err.errors()]
        raise ValidationError.from_exception_data(err.title, errors) from None


def _check_keys(value: Mapping[str, Any]) -> None:
    """Refuse the keys that the chosen kind lacks, saying which kinds have them."""
    kind = value["kind"]
    if not isinstance(kind, str) or kind not in _BY_KIND:
        return  # the discriminated union reports the unknown kind
    fields = [f for f in _BY_KIND[kind].model_fields if f != "kind"]
    errors = []
    for key in sorted(value.keys() - {"kind", *fields}, key=str):
        owners = [k for k, c in _BY_KIND.items() if key in c.model_fields]
        where = f"a setting of {' / '.join(owners)} only" if owners else "nor of any loss kind"
        message = f"not a setting of loss kind {kind!r} ({where}); {kind} settings: {fields}"
        errors.append({"type": PydanticCustomError("extra_forbidden", message),
                       "loc": (key,), "input": value[key]})
    if errors:
        raise ValidationError.from_exception_data("loss", errors)
