"""User-facing configuration of the SampleCLR model: architecture, presets, supervised tasks.

The torch modules (:mod:`~sampleclr_scale.model.blocks`, ``aggregator``, ``heads``,
``sampleclr``) take plain arguments; this module holds the validated, frozen description
a user writes (in YAML or Python) and a checkpoint stores, the way scvi-tools keeps its
user-facing model classes apart from its torch modules.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sampleclr_scale.errors import InputError

NormKind = Literal["layernorm", "batchnorm", "none"]
"""Normalisation after each hidden Linear layer."""
WeightingKind = Literal["softmax", "sigmoid"]
"""How cell-importance logits become weights."""
PoolingKind = Literal["cells", "learned", "both"]
"""What the cell-importance weights sum: raw cell features, learned ones, or both."""
TaskKind = Literal["classification", "ordinal", "regression"]
"""Kind of a supervised task."""

SMALL_PRESET_MAX_DONORS = 200
"""Cohorts with fewer donors than this get the ``"small"`` preset (SampleCLR, A.4)."""

_PRESETS: dict[str, dict[str, Any]] = {
    # SampleCLR appendix A.4, "tiny" model (about 10k parameters with a supervised head).
    "small": {
        "n_heads": 1,
        "aggregator_hidden": 32,
        "aggregator_layers": 2,
        "encoder_hidden": 32,
        "encoder_layers": 4,
        "output_dim": 32,
        "head_hidden": 16,
        "head_layers": 2,
    },
    # SampleCLR appendix A.4, large model (about 370k parameters at d = 30 with a
    # regression head). The number of aggregator heads is lost in the appendix's text;
    # 8 is the value of the authors' configs/models/large.json and reproduces the count.
    "large": {
        "n_heads": 8,
        "aggregator_hidden": 128,
        "aggregator_layers": 2,
        "encoder_hidden": 128,
        "encoder_layers": 16,
        "output_dim": 192,
        "head_hidden": 128,
        "head_layers": 3,
    },
}


class TaskSpec(BaseModel):
    """One supervised task predicted from the sample representation.

    SampleCLR ("Great patients embed alike: contrastive learning for sample representation
    from single-cell data", ICLR 2026 submission), section 4: classification of
    categorical covariates, ordinal regression of ranked ones, regression of continuous
    ones, several at once.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str = Field(min_length=1, pattern=r"^[^.]+$")
    """Task name: the key of its head and of its predictions (no dots)."""
    kind: TaskKind
    """``"classification"`` (C logits), ``"ordinal"`` (C-1 cumulative logits) or
    ``"regression"`` (one output)."""
    n_classes: int | None = None
    """Number of classes C (at least 2) for classification and ordinal tasks; unset for
    regression."""
    weight: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    """Weight of this task's loss in the total supervised loss."""

    @model_validator(mode="after")
    def _check_classes(self) -> Self:
        if self.kind == "regression":
            if self.n_classes is not None:
                raise ValueError(
                    f"task {self.name!r}: a regression task has no n_classes "
                    f"(got {self.n_classes})"
                )
        elif self.n_classes is None or self.n_classes < 2:
            raise ValueError(
                f"task {self.name!r}: a {self.kind} task needs n_classes >= 2 "
                f"(got {self.n_classes})"
            )
        return self


class ModelConfig(BaseModel):
    """Architecture of a SampleCLR model.

    SampleCLR ("Great patients embed alike: contrastive learning for sample representation
    from single-cell data", ICLR 2026 submission), section 4 and appendix A.4: a
    cell-importance aggregator with ``n_heads`` heads, a residual MLP encoder giving the
    sample representation, optional supervised heads on it. Layer counts follow the
    paper's configs: ``*_layers`` Linear layers of width ``*_hidden`` (the input layer and
    ``*_layers - 1`` residual blocks), plus the output layer.

    Use :meth:`preset` for the paper's two sizes and :func:`recommended_preset` to pick one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    input_dim: int = Field(ge=1)
    """Cell feature dimension d (e.g. 30 scVI latents or 50 PCs)."""
    n_heads: int = Field(default=4, ge=1)
    """Cell-importance heads H; the aggregated vector has H * d entries."""
    aggregator_hidden: int = Field(default=32, ge=1)
    """Width of the per-cell MLP that scores cell importance."""
    aggregator_layers: int = Field(default=2, ge=1)
    """Hidden-width Linear layers of the per-cell scoring MLP."""
    encoder_hidden: int = Field(default=32, ge=1)
    """Width of the encoder MLP from the aggregated vector to the representation."""
    encoder_layers: int = Field(default=4, ge=1)
    """Hidden-width Linear layers of the encoder."""
    output_dim: int = Field(default=32, ge=1)
    """Size of the sample representation z (32 small, 192 large)."""
    head_hidden: int = Field(default=16, ge=1)
    """Width of each supervised head's hidden layers."""
    head_layers: int = Field(default=2, ge=1)
    """Linear layers of each supervised head (1 = a single Linear on z)."""
    norm: NormKind = "layernorm"
    """Normalisation after each hidden Linear of the aggregator and the encoder:
    ``"layernorm"`` (per row: a donor's z does not depend on the other donors of the
    batch), ``"batchnorm"`` (as the paper's encoder) or ``"none"``."""
    weighting: WeightingKind = "softmax"
    """``"softmax"``: weights normalised over the bag's real cells, summing to 1 per head;
    ``"sigmoid"``: sigmoid weights divided by the number of real cells, whose sum keeps
    how many important cells (e.g. of a cell type) the bag has."""
    pooling: PoolingKind = "learned"
    """What each importance head's weights sum over the bag: ``"cells"`` (the raw cell
    features, as in the paper), ``"learned"`` (per-cell features of a residual MLP, as in
    DeepSets; the default) or ``"both"`` (concatenated)."""
    cell_dim: int = Field(default=32, ge=1)
    """Width of the learned per-cell features (``pooling`` ``"learned"`` or ``"both"``)."""
    cell_hidden: int = Field(default=64, ge=1)
    """Hidden width of the per-cell feature MLP."""
    cell_layers: int = Field(default=2, ge=1)
    """Hidden-width Linear layers of the per-cell feature MLP."""
    center: bool = True
    """Subtract each bag's mean cell before scoring and pooling: the representation then
    ignores a shift shared by all of a donor's cells (a site's additive batch effect, a
    donor's own offset) and keeps what differs between its cells (states, types). False
    is the paper's model."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout after each hidden layer (aggregator, encoder, heads); 0 disables it."""
    tasks: tuple[TaskSpec, ...] = ()
    """Supervised tasks, each with its own head on z; empty for a contrastive-only model."""
    head_composition: tuple[str, ...] = ()
    """Cell types whose share in the donor (CLR, centred per technical batch:
    :func:`~sampleclr_scale.store.composition.donor_composition`) each head reads beside z,
    one input each; empty: the heads read z alone. Views balanced over cell types hide
    composition from z by design, so a head on z alone cannot predict what only
    composition tells (a severity that expands one cell type)."""
    batch_adversary: int = Field(default=0, ge=0)
    """Technical batches that a batch adversary (a classifier of the donor's batch from z,
    behind a gradient reversal: :class:`~sampleclr_scale.model.adversary.BatchAdversary`)
    tells apart; 0: no adversary. It has the supervised heads' width and depth."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        names = [task.name for task in self.tasks]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"task names must be unique, repeated: {duplicated}")
        if self.batch_adversary == 1:
            raise ValueError("a batch adversary needs at least 2 batches to tell apart "
                             "(batch_adversary: 0 for none)")
        return self

    @classmethod
    def preset(cls, name: str, input_dim: int, **overrides: Any) -> ModelConfig:
        """The paper's ``"small"`` or ``"large"`` model for ``input_dim`` features.

        Parameters
        ----------
        name : str
            ``"small"`` (4 encoder layers of width 32, 1 head, z of size 32; about 8k-10k
            parameters for d = 30-50) or ``"large"`` (16 layers of width 128, 8 heads, z
            of size 192; about 330k parameters plus about 40k per supervised head).
        input_dim : int
            Cell feature dimension d.
        **overrides
            Any other :class:`ModelConfig` field (e.g. ``tasks``, ``norm``).

        Returns
        -------
        ModelConfig
            The validated configuration.

        Raises
        ------
        InputError
            If ``name`` is not a preset.
        """
        if name not in _PRESETS:
            raise InputError(
                f"unknown model preset {name!r}", f"use one of {', '.join(map(repr, _PRESETS))}"
            )
        return cls(**{**_PRESETS[name], "input_dim": input_dim, **overrides})


def recommended_preset(n_donors: int) -> Literal["small", "large"]:
    """The preset the paper uses for a cohort of ``n_donors`` donors.

    SampleCLR appendix A.4: the tiny model below 200 samples, the large one otherwise.

    Parameters
    ----------
    n_donors : int
        Number of (training) donors.

    Returns
    -------
    str
        ``"small"`` if ``n_donors < 200``, else ``"large"``.
    """
    if isinstance(n_donors, bool) or not isinstance(n_donors, Integral) or n_donors < 0:
        raise InputError(
            f"n_donors must be a non-negative integer, got {n_donors!r}",
            "pass the number of donors in the cohort",
        )
    return "small" if n_donors < SMALL_PRESET_MAX_DONORS else "large"
