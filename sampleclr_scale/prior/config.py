"""The prior stage's settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sampleclr_scale._types import PriorKind
from sampleclr_scale.config import StageConfig


class PriorConfig(StageConfig):
    """How to build a donor x donor prior similarity (``sampleclr-scale prior``)."""

    kind: PriorKind
    """``pseudobulk``: cosine of the donors' mean features; ``gloscope``: GloScope's
    symmetrised kNN KL divergence on principal components, as ``exp(-D / scale)``."""
    correct: Literal["auto", "batch_cell_type", "none"] = "auto"
    """The cells the prior compares: ``"batch_cell_type"`` with the store's per-(batch,
    cell type) correction applied (as training's ``standardize`` applies it), ``"none"``
    as stored, ``"auto"`` corrected when the store has those statistics. A prior of the
    stored cells ranks donors of one site together: on the quality benchmark's ``mixed``
    cohort 85 % of the GloScope targets' off-diagonal mass fell on same-site donors
    (25 % by chance), a structure the corrected cells the model reads cannot show, and
    one seed of six sat at the collapsed loss log(B) for four epochs
    (benchmarks/README.md, "The X-CLR collapse and the prior")."""
    k: int = Field(25, ge=1)
    """GloScope: neighbour rank of the KL estimator; must be below the smallest
    subsample."""
    cells_per_donor: int = Field(300, ge=2)
    """GloScope: cells per donor (all of a donor's cells if it has fewer)."""
    n_pcs: int = Field(10, ge=1)
    """GloScope: principal components, fitted on the pooled subsample (at most the
    feature width)."""
    scale: float = Field(5.0, gt=0)
    """GloScope: divergence at which the similarity falls to ``1/e`` (SampleCLR uses 5)."""
    neighbours: int = Field(30, ge=1)
    """Above ``dense_limit`` donors: the nearest donors by pseudobulk cosine paired with
    each donor (GloScope ranks donors by the means of their subsampled cells)."""
    dense_limit: int = Field(500, ge=0)
    """Largest number of donors for which all pairs are computed."""
    seed: int = Field(0, ge=0)
    """GloScope: which window of each donor's rows is used. Seed ``s`` reads the
    ``cells_per_donor`` rows starting at row ``s * cells_per_donor`` of the donor
    (cyclically), so different seeds read disjoint subsamples while a donor has enough
    cells."""
