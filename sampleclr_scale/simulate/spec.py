"""What a simulated cohort is: its settings, its scenarios, the Census datasets its sites
may carry, and its ground truth (the module :mod:`~sampleclr_scale.simulate.cohorts`
describes the biology and writes the cohorts)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from sampleclr_scale.errors import InputError

if TYPE_CHECKING:
    from sampleclr_scale.simulate.model import _Unit

_COHORT_STREAM, _GENE_STREAM, _DONOR_STREAM, _CELL_STREAM, _SPECIAL_STREAM, _SITE_STREAM = range(6)
"""Seed streams: each random draw of a cohort uses its own ``(seed, stream, ...)``."""


class _CellType(NamedTuple):
    name: str
    proportion: float  # baseline share of a healthy donor's cells
    composition: float  # log-proportion change per severity level, times composition_effect
    state: bool  # whether severity splits the type's cell states in the "mixed" scenario
    shape: ShapeKind | None  # the type's severity-driven shape change in the "shape" scenario


ShapeKind = Literal["split", "spread", "substate", "shift"]
"""A change of one cell type's state distribution along its direction: mean-preserving
(``split``, ``spread``, ``substate``) or a shift of the whole type (``shift``, a program
such as interferon response that moves the type's mean; only in ``realistic``)."""


Scenario = Literal["mixed", "shape", "composition", "realistic"]
"""What severity changes: composition and within-type states, states only, composition
only, or composition (half as strongly) plus one type's mean state plus another's split."""


_CELL_TYPES: tuple[_CellType, ...] = (
    _CellType("CD14 monocyte", 0.20, 1.0, True, "split"),
    _CellType("CD4 T cell", 0.25, -0.6, True, "spread"),
    _CellType("CD8 T cell", 0.13, -0.6, True, None),
    _CellType("NK cell", 0.10, -0.3, False, None),
    _CellType("B cell", 0.10, 0.0, True, "substate"),
    _CellType("CD16 monocyte", 0.06, 0.5, False, None),
    _CellType("platelet", 0.10, 0.3, False, None),
    _CellType("conventional dendritic cell", 0.03, -0.3, False, None),
    _CellType("plasmacytoid dendritic cell", 0.02, -0.8, False, None),
    _CellType("plasmablast", 0.01, 1.5, False, None),
)


# Per-cell-type site effects of the cohorts like real ones (composition, realistic), and
# available to the others (bench quality's shape_celltype, mixed_celltype).
CELL_TYPE_SITE_EFFECTS: dict[str, float] = {
    "site_effect": 0.5, "site_type_effect": 0.6, "site_gain": 0.25, "site_composition": 0.2}


# Each scenario's defaults: what changes with severity, and the site effects.
_SCENARIOS: dict[str, dict[str, float]] = {
    "mixed": {},
    "shape": {"composition_effect": 0.0, "state_effect": 1.0, "site_effect": 1.0},
    "composition": {"state_effect": 0.0, "composition_effect": 0.35,
                    **CELL_TYPE_SITE_EFFECTS},
    "realistic": {"composition_effect": 0.2, "state_effect": 0.6,
                  **CELL_TYPE_SITE_EFFECTS},
}


# composition and realistic: severity moves only these types' log-proportions (one
# expands, one shrinks, as neutrophils and lymphocytes do in severe COVID-19) and, in
# realistic, shifts one type's mean state and splits another's.
_TWO_TYPE_COMPOSITION = {"CD14 monocyte": 1.0, "CD4 T cell": -1.0}


_REALISTIC_SHAPES: dict[str, ShapeKind] = {"CD14 monocyte": "shift", "CD8 T cell": "split"}


_SHIFT_GAIN = 1.5  # "shift": the type's mean moves by this times severity * state_effect


_SPREAD_GAIN = 0.5  # "spread": sd along v grows by this times severity * state_effect


_SUBSTATE_SHARE = 0.1  # "substate": share of the type's cells per severity level


_SUBSTATE_SHIFT = 3.0  # "substate": distance of the sub-state from the type's state


# obs column cell_state
_CELL_STATES = ("base", "split+", "split-", "spread", "substate", "shift")


_ASSAYS = ("10x 3' v3", "10x 5' v2")  # site i uses _ASSAYS[i % 2]


_ASSAY_UMIS = (5000.0, 3000.0)  # mean library size per assay


_DISEASES = ("normal", "COVID-19")


_SEXES = ("female", "male", "unknown")


_SEX_SIGN = (-1.0, 1.0, 0.0)


_UNKNOWN = "unknown"


_SPECIAL_DONORS = ("pooled", _UNKNOWN)


_DONOR_COLUMNS = ("dataset_id", "donor_id", "disease", "severity", "age", "sex", "assay", "n_cells")


_LATENT_DIM = 16


_TYPE_SPREAD = 1.5  # sd of the cell-type means' coordinates


_CELL_NOISE = 1.0  # sd of a cell around its type mean, per latent coordinate


_DONOR_NOISE = 0.2  # sd of a donor's own offset, per latent coordinate


_PROPORTION_NOISE = 0.3  # sd of a donor's log-proportions around the expected ones


_AGE_EFFECT = 0.5  # latent shift along the age direction from the youngest to the oldest


_SEX_EFFECT = 0.25  # latent shift along the sex direction, +/- for male/female


_EMBED_NOISE = 0.1  # sd of the noise added to the embedding


_GENE_LOADING = 0.3  # sd of the latent -> gene-logit weights


_LIBRARY_SD = 0.4  # sd of a cell's log library size


_SITE_LIBRARY_SD = 0.5  # sd of a site's log library factor, times site_effect


_NB_SHAPE = 10.0  # gamma shape of the negative binomial (inverse dispersion)


_AGE_RANGE = (20.0, 85.0)


@dataclass(frozen=True)
class CohortSpec:
    """Parameters of a synthetic cohort; see the module docstring for the biology.

    Parameters
    ----------
    n_donors
        Real donors (the ``"pooled"``/``"unknown"`` pseudo-donors are extra).
    min_cells, max_cells
        Primary cells per donor, drawn log-uniformly in ``[min_cells, max_cells]``.
    n_cell_types
        The first ``n_cell_types`` of the built-in cell types (1 to 10).
    n_genes
        Genes in ``X`` (at least 1; a handful is enough when only the embedding matters).
    embedding_dim, embedding_name
        Width and ``obsm`` key of the cell embedding. The latent state has 16 dimensions:
        a narrower embedding is a random projection of it and loses part of the signal.
    n_sites
        Technical sites, written as ``dataset_id`` ``"site-0"``, ``"site-1"``, ...
    severity_levels
        Ordinal severity ``0 .. severity_levels - 1``; 0 is healthy (``"normal"``).
    scenario
        What severity changes. ``"mixed"``: composition and, in four types, a symmetric
        split of cell states. ``"shape"``: only within-type state distributions, each a
        mean-preserving change along the type's direction ``v_k``: a symmetric split in
        CD14 monocytes, a wider spread in CD4 T cells, a sub-state appearing in B cells
        (a share of the cells moves away, the rest compensates); composition varies per
        donor independently of severity. ``"composition"``: only composition. Use
        :meth:`for_scenario` for each scenario's defaults (a strong site shift).
    composition_effect, state_effect, site_effect
        Strengths of the severity -> composition shift, the severity -> within-type state
        change, and the per-site technical shift of the embedding.
    site_composition
        Sd of a per-site technical change of the log-proportions of every cell type
        (e.g. a dissociation protocol that loses some types); 0 disables it.
    site_type_effect, site_gain
        Sd of a shift of the embedding per (site, cell type), and of a log gain per
        (site, embedding feature) (:mod:`~sampleclr_scale.simulate.site_effects`); 0 disables
        them. Per-site centring or standardisation does not remove either.
    confounding
        Probability that a donor of the highest severity level is moved into site 0
        (swapping with a lower-level donor there): a design where one batch holds
        mostly one severity level. 0 keeps sites independent of severity.
    duplicate_fraction
        Extra copies, as a fraction of a donor's cells, with ``is_primary_data == False``.
    special_donor_cells
        If positive, this many cells each for the pseudo-donors ``"pooled"`` and ``"unknown"``.
    seed
        Seed of every random draw.
    """

    n_donors: int = 200
    min_cells: int = 200
    max_cells: int = 3000
    n_cell_types: int = 10
    n_genes: int = 200
    embedding_dim: int = 32
    embedding_name: str = "scvi"
    n_sites: int = 4
    severity_levels: int = 4
    scenario: Scenario = "mixed"
    composition_effect: float = 0.3
    state_effect: float = 1.5
    site_effect: float = 0.5
    site_composition: float = 0.0
    site_type_effect: float = 0.0
    site_gain: float = 0.0
    confounding: float = 0.0
    duplicate_fraction: float = 0.0
    special_donor_cells: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        rules = (
            ("n_donors", _is_int(self.n_donors, 1), "an integer >= 1"),
            ("min_cells", _is_int(self.min_cells, 1), "an integer >= 1"),
            ("max_cells", _is_int(self.max_cells, 1), "an integer >= 1"),
            (
                "min_cells",
                not (_is_int(self.min_cells, 1) and _is_int(self.max_cells, 1))
                or self.min_cells <= self.max_cells,
                f"<= max_cells ({self.max_cells})",
            ),
            (
                "n_cell_types",
                _is_int(self.n_cell_types, 1) and self.n_cell_types <= len(_CELL_TYPES),
                f"an integer from 1 to {len(_CELL_TYPES)}",
            ),
            ("n_genes", _is_int(self.n_genes, 1), "an integer >= 1"),
            ("embedding_dim", _is_int(self.embedding_dim, 1), "an integer >= 1"),
            (
                "embedding_name",
                isinstance(self.embedding_name, str) and self.embedding_name.isidentifier(),
                "a non-empty identifier such as 'scvi'",
            ),
            ("n_sites", _is_int(self.n_sites, 1), "an integer >= 1"),
            ("severity_levels", _is_int(self.severity_levels, 2), "an integer >= 2"),
            ("scenario", self.scenario in _SCENARIOS, f"one of {sorted(_SCENARIOS)}"),
            ("composition_effect", _is_real(self.composition_effect), "a finite number >= 0"),
            ("state_effect", _is_real(self.state_effect), "a finite number >= 0"),
            ("site_effect", _is_real(self.site_effect), "a finite number >= 0"),
            ("site_composition", _is_real(self.site_composition), "a finite number >= 0"),
            ("site_type_effect", _is_real(self.site_type_effect), "a finite number >= 0"),
            ("site_gain", _is_real(self.site_gain), "a finite number >= 0"),
            ("confounding", _is_real(self.confounding) and self.confounding <= 1,
             "a number in [0, 1]"),
            (
                "duplicate_fraction",
                _is_real(self.duplicate_fraction) and self.duplicate_fraction <= 1,
                "a number in [0, 1]",
            ),
            ("special_donor_cells", _is_int(self.special_donor_cells, 0), "an integer >= 0"),
            ("seed", _is_int(self.seed, 0), "an integer >= 0"),
        )
        for name, ok, rule in rules:
            if not ok:
                raise InputError(
                    f"CohortSpec.{name} = {getattr(self, name)!r} is invalid",
                    f"make {name} {rule}",
                )

    @classmethod
    def for_scenario(cls, scenario: Scenario, **overrides: Any) -> CohortSpec:
        """A cohort of ``scenario`` with that scenario's default effect strengths.

        Parameters
        ----------
        scenario
            ``"mixed"`` (the defaults of this class), ``"shape"``, ``"composition"`` or
            ``"realistic"``.
        **overrides
            Any other field.

        Returns
        -------
        CohortSpec
            The validated parameters.
        """
        if scenario not in _SCENARIOS:
            raise InputError(f"unknown scenario {scenario!r}",
                             f"use one of {', '.join(sorted(_SCENARIOS))}")
        return cls(**{**_SCENARIOS[scenario], "scenario": scenario, **overrides})


@dataclass(frozen=True)
class CensusDataset:
    """How one simulated site looks in Census: a CELLxGENE dataset with its own obs values.

    Only the labels change: the cells of site ``i`` are simulated as without it (the
    site's shift and library size, the built-in assay's library size), then carry the
    ``i``-th dataset's values, so that a Census-shaped copy can hold the ``dataset_id``,
    diseases, tissues, assays and suspension types a recipe selects and scores (pass one
    per site to :func:`write_soma` or :func:`simulate_cells` as ``datasets``).

    Parameters
    ----------
    dataset_id
        The site's ``dataset_id`` (e.g. the id of the Census dataset a recipe selects).
    title, collection_name
        ``dataset_title`` and ``collection_name`` of its row in ``census_info/datasets``.
    diseases
        ``disease`` by severity level: level ``s`` is ``diseases[min(s, len - 1)]``; the
        pseudo-donors (severity not recorded) get ``diseases[0]``.
    tissues, tissues_per_donor
        ``tissue`` values. The primary cells of donor ``j`` (its label in the donor table;
        pseudo-donor ``j`` is the j-th) come from ``min(tissues_per_donor, len(tissues))``
        tissues, ``tissues[j % len], tissues[(j + 1) % len], ...``, in equal consecutive
        parts (a copy keeps its cell's tissue): one donor sampled at several sites of the
        body, as in the lung atlas.
    tissue_general
        ``tissue_general`` of every cell.
    assays, suspension_types
        ``assay`` and ``suspension_type`` of donor ``j``: ``assays[j % len(assays)]``,
        likewise; ``assays=None`` keeps the simulator's assay (alternating by site).
    """

    dataset_id: str
    title: str = "Synthetic cohort"
    collection_name: str = "sampleclr_scale synthetic cohort"
    diseases: tuple[str, ...] = _DISEASES
    tissues: tuple[str, ...] = ("blood",)
    tissues_per_donor: int = 1
    tissue_general: str = "blood"
    assays: tuple[str, ...] | None = None
    suspension_types: tuple[str, ...] = ("cell",)

    def __post_init__(self) -> None:
        labels = ("diseases", "tissues", "suspension_types") + ("assays",) * (
            self.assays is not None)
        for name in ("dataset_id", "title", "collection_name", "tissue_general"):
            _require(self, name, _is_label(getattr(self, name)), "a non-empty string")
        for name in labels:
            values = getattr(self, name)
            ok = isinstance(values, tuple) and values and all(map(_is_label, values))
            _require(self, name, ok, "a non-empty tuple of non-empty strings")
        _require(self, "tissues_per_donor", _is_int(self.tissues_per_donor, 1),
                 "an integer >= 1")

    def _labels(self, unit: _Unit, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The obs values of this dataset for ``rows`` (primary-cell numbers) of ``unit``."""
        number = unit.key[-1]
        level = min(max(unit.severity, 0), len(self.diseases) - 1)
        parts = min(self.tissues_per_donor, len(self.tissues))
        part = rows * parts // max(unit.n_cells, 1)
        assays = self.assays or (_ASSAYS[unit.codes["assay"]],)
        constant = {
            "dataset_id": self.dataset_id,
            "disease": self.diseases[level],
            "tissue_general": self.tissue_general,
            "assay": assays[number % len(assays)],
            "suspension_type": self.suspension_types[number % len(self.suspension_types)],
        }
        tissues = np.asarray(self.tissues, dtype=object)[(number + part) % len(self.tissues)]
        return {**{c: np.full(len(rows), v, dtype=object) for c, v in constant.items()},
                "tissue": tissues}

    def _values(self) -> dict[str, tuple[str, ...]]:
        """Every value this dataset may give each obs column it labels."""
        return {"dataset_id": (self.dataset_id,), "disease": self.diseases,
                "tissue": self.tissues, "tissue_general": (self.tissue_general,),
                "assay": self.assays or _ASSAYS, "suspension_type": self.suspension_types}


def _require(owner: object, name: str, ok: bool, rule: str) -> None:
    """Refuse ``owner.name`` unless ``ok``: an InputError saying it must be ``rule``."""
    if not ok:
        raise InputError(f"{type(owner).__name__}.{name} = {getattr(owner, name)!r} is invalid",
                         f"make {name} {rule}")


def ground_truth(spec: CohortSpec) -> dict[str, Any]:
    """What severity and the sites do in a cohort, per cell type (JSON-ready).

    Parameters
    ----------
    spec
        The cohort parameters.

    Returns
    -------
    dict
        ``scenario``, the effect strengths, and per cell type its baseline proportion,
        its log-proportion change per severity level (``composition``, already times
        ``composition_effect``) and its within-type ``shape`` change (``"split"``,
        ``"spread"``, ``"substate"`` or None). Each cell's own state is the obs column
        ``cell_state``.
    """
    effects = ("composition_effect", "state_effect", "site_effect", "site_composition",
               "site_type_effect", "site_gain", "confounding")
    return {
        "scenario": spec.scenario,
        **{name: float(getattr(spec, name)) for name in effects},
        "cell_types": {
            t.name: {"proportion": t.proportion,
                     "composition": _composition_of(spec, t) * spec.composition_effect + 0.0,
                     "shape": _shape_of(spec, t) if spec.state_effect > 0 else None}
            for t in _CELL_TYPES[: spec.n_cell_types]
        },
    }


def _shape_of(spec: CohortSpec, cell_type: _CellType) -> ShapeKind | None:
    """The within-type change of ``cell_type`` in the cohort's scenario."""
    if spec.scenario == "mixed":
        return "split" if cell_type.state else None
    if spec.scenario == "realistic":
        return _REALISTIC_SHAPES.get(cell_type.name)
    return cell_type.shape if spec.scenario == "shape" else None


def _composition_of(spec: CohortSpec, cell_type: _CellType) -> float:
    """The type's log-proportion change per severity level, before ``composition_effect``."""
    if spec.scenario in ("composition", "realistic"):
        return _TWO_TYPE_COMPOSITION.get(cell_type.name, 0.0)
    return cell_type.composition


def _is_int(value: object, minimum: int) -> bool:
    """An integer (not a bool) of at least ``minimum``."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= minimum


def _is_label(value: object) -> bool:
    """A non-empty string."""
    return isinstance(value, str) and value != ""


def _is_real(value: object) -> bool:
    """A finite, non-negative real number."""
    return isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0
