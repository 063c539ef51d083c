"""What the evaluation stage scores: covariates, their kinds, neighbours, baseline seeds.

The defaults fit the simulated cohort (``sampleclr_scale.simulate.cohorts``): disease,
severity and age are relevant, site, assay and sex technical, severity the trajectory
rooted at the healthiest donors.
"""

from __future__ import annotations

from typing import Literal, Self

import pandas as pd
from pydantic import Field, model_validator

from sampleclr_scale.config import StageConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.storage import files_output

METRICS_FILE = "metrics.json"
REPORT = files_output("a report", (METRICS_FILE, "report.md", "figures"), commit=METRICS_FILE)
"""What ``evaluate`` writes: ``metrics.json``, ``report.md`` and ``figures/``."""

CovariateKind = Literal["categorical", "ordinal", "continuous"]


class EvaluateConfig(StageConfig):
    """SPARE evaluation settings (Shitov et al. 2025)."""

    relevant: dict[str, CovariateKind] = Field(default_factory=lambda: {
        "disease": "categorical", "severity": "ordinal", "age": "continuous"})
    """Biologically relevant donor-table columns and their kinds; information retention
    (kNN prediction from the representation) is scored on each."""
    technical: dict[str, CovariateKind] = Field(default_factory=lambda: {
        "dataset_id": "categorical", "assay": "categorical", "sex": "categorical"})
    """Technical donor-table columns and their kinds; batch mixing (1 - information
    retention) is scored on each."""
    trajectory: str | None = "severity"
    """Donor-table column that orders donors along a trajectory (numbers, an ordered
    categorical, or values whose sorted order is their rank); None skips the trajectory
    score."""
    trajectory_root: Literal["min", "max"] = "min"
    """The root of the diffusion pseudotime: the donor with the smallest (``min``) or
    largest (``max``) trajectory value, the first in donor order on ties."""
    replicate_column: str | None = None
    """Donor-table column whose equal values mark replicates (samples of one person);
    None skips replicate robustness."""
    k: int = Field(default=3, ge=1)
    """Neighbours of a donor in the kNN prediction (SPARE uses 3)."""
    trajectory_k: int = Field(default=15, ge=1)
    """Neighbours of a donor in the diffusion-pseudotime graph (scanpy's default 15; a
    graph of 3 neighbours often falls apart into pieces)."""
    seeds: int = Field(default=3, ge=1)
    """Seeds of the random-vector baseline, reported as mean +- std."""
    split: Literal["all", "validation"] = "all"
    """Donors scored: all donors of the store, or only the validation donors (never seen
    by a supervised head). With ``all`` every method is also scored on the validation
    donors alone (held-out scores: distances restricted to the validation donors, so
    their neighbours are each other), reported beside the scores on all donors; with
    ``validation`` the scores are those held-out scores and no second block is added."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        both = sorted(set(self.relevant) & set(self.technical))
        if both:
            raise ValueError(f"covariates cannot be both relevant and technical: {both}")
        if not (self.relevant or self.technical or self.trajectory):
            raise ValueError("nothing to evaluate: give relevant, technical or trajectory")
        return self

    @property
    def columns(self) -> list[str]:
        """Every donor-table column the evaluation reads, in first-mention order."""
        named = [*self.relevant, *self.technical, self.trajectory, self.replicate_column]
        return list(dict.fromkeys(c for c in named if c is not None))

    def check_columns(self, donors: pd.DataFrame, where: str) -> None:
        """Refuse covariates the donor table lacks, or continuous ones that are not numbers.

        Parameters
        ----------
        donors : pd.DataFrame
            The donor table of the bag store.
        where : str
            The store's path, for the message.

        Raises
        ------
        InputError
            Naming the column and the available ones.
        """
        for column in self.columns:
            if column not in donors.columns:
                raise InputError(
                    f"covariate {column!r} is not a column of the donor table of {where}",
                    f"use one of {sorted(donors.columns)} in the evaluation config, or "
                    f"re-ingest with --meta {column}",
                )
        kinds = {**self.relevant, **self.technical}
        for column, kind in kinds.items():
            if kind == "continuous" and not pd.api.types.is_numeric_dtype(donors[column]):
                raise InputError(
                    f"covariate {column!r} of {where} is declared continuous but holds "
                    f"{donors[column].dtype} values",
                    f"declare it categorical or ordinal: {column}: ordinal",
                )
