"""Synthetic donor cohorts laid out like CELLxGENE Census, with known ground truth.

Used by the tests, the demo and the benchmarks. The biology is chosen so that a method
that sees cell *distributions* (SampleCLR) can beat one that sees only per-donor means
(pseudobulk) on disease severity:

- Cell types. About ten blood cell types (``_CELL_TYPES``), each with a baseline
  proportion and a mean ``mu_k`` in a 16-dimensional latent space.
- Composition. A donor's log-proportions are the baseline plus
  ``severity * composition_effect * c_k`` (monocytes and plasmablasts up, T cells and
  pDCs down) plus donor-level noise.
- Cell state. In some types (``state=True``) severity splits the cells symmetrically
  along a type-specific unit direction ``v_k``:
  ``x = mu_k + noise + sign * severity * state_effect * v_k`` with ``sign = +/-1`` in
  equal numbers within each donor and type. The within-type mean does not move, the
  spread along ``v_k`` grows with severity: invisible to a per-type pseudobulk.
- Weaker donor effects: age shifts every cell a little along one direction, sex along
  another, and each donor has a small random offset of its own.
- Technical effects. Each site (Census ``dataset_id``) shifts the embedding by a fixed
  random vector of scale ``site_effect`` (an imperfectly batch-corrected scVI latent) and
  scales the library size; the two assays differ in library size. On request
  (:mod:`~sampleclr_scale.simulate.site_effects`) each site also shifts each cell type by its
  own vector, multiplies each embedding feature by its own gain and moves the composition
  a little. Sites are assigned independently of severity unless ``confounding`` puts most
  of the most severe donors into site 0.
- Scenarios like real cohorts. ``composition``: severity only expands CD14 monocytes and
  shrinks CD4 T cells; ``realistic``: the same composition change half as strong, CD14
  monocytes' mean state shifted along a program, CD8 T cells' states split. Both come with
  the per-cell-type site effects (``CELL_TYPE_SITE_EFFECTS``).

Outputs. ``obsm[embedding_name]`` is a near-isometric linear image of the latent state
plus the site shift and a little noise. ``X`` holds negative-binomial raw counts: a
softmax over genes of a linear map of the latent state, times the cell's library size.

Census quirks reproduced on request: ``donor_id`` is free text that is only unique within
a ``dataset_id`` (``"donor-0"`` exists in every site); ``duplicate_fraction`` appends
exact copies of some of a donor's cells with ``is_primary_data == False`` (right after
that donor's primary cells); ``special_donor_cells`` adds the pseudo-donors ``"pooled"``
(first site) and ``"unknown"`` (last site) after all real donors, whose cells follow
healthy biology and whose covariates are not recorded (``severity == -1``, ``age`` NaN,
``sex`` and ``development_stage`` ``"unknown"``).

Census datasets on request: given one :class:`CensusDataset` per site, the sites' cells
carry those datasets' ``dataset_id`` (e.g. a real Census dataset id), diseases, tissues
(a donor's cells may come from several), assays and ``suspension_type``, and the datasets
table their titles, so that a Census-shaped copy holds what a recipe selects and scores.

Every donor's cells come from a random generator seeded by ``(seed, donor index)``, so the
data do not depend on how they are cut into chunks.
"""

from __future__ import annotations

import math
import numbers
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import anndata
import numpy as np
import pandas as pd
from anndata.experimental import concat_on_disk
from scipy import sparse

from sampleclr_scale.errors import InputError
from sampleclr_scale.simulate._soma_writer import write_census_collection, write_experiment
from sampleclr_scale.simulate.site_effects import SiteEffects, confounded_sites
from sampleclr_scale.storage import Location, staged_output
from sampleclr_scale.storage.outputs import OutputKind

__all__ = [
    "CensusDataset",
    "CohortSpec",
    "ground_truth",
    "simulate_cells",
    "simulate_donors",
    "write_h5ad",
    "write_soma",
]


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
_SIMULATED = OutputKind("a simulated cohort", commit=None, recognise=lambda _: False)
"""A simulated source (.h5ad, SOMA): only ever written new, so nothing is replaceable."""
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
# independent random streams: cohort parameters, gene table, donor table, cells
_COHORT_STREAM, _GENE_STREAM, _DONOR_STREAM, _CELL_STREAM, _SPECIAL_STREAM, _SITE_STREAM = range(6)


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


def simulate_donors(spec: CohortSpec) -> pd.DataFrame:
    """Draw the donor table of a cohort.

    Parameters
    ----------
    spec
        The cohort parameters.

    Returns
    -------
    pandas.DataFrame
        One row per donor, index ``0 .. n_donors - 1``, columns ``dataset_id``,
        ``donor_id`` (unique only within a ``dataset_id``), ``disease``, ``severity``
        (balanced over levels), ``age`` (whole years in [20, 85], weakly increasing with
        severity), ``sex``, ``assay`` (fixed by the site) and ``n_cells`` (primary cells).
    """
    rng = np.random.default_rng([spec.seed, _DONOR_STREAM])
    n = spec.n_donors
    severity = rng.permutation(np.arange(n) % spec.severity_levels)
    site = rng.permutation(np.arange(n) % spec.n_sites)
    site = confounded_sites(site, severity, spec.n_sites, spec.severity_levels,
                            spec.confounding, spec.seed)
    within_site = pd.Series(site).groupby(site).cumcount().to_numpy()
    age_trend = 10.0 * severity / (spec.severity_levels - 1)
    age = np.clip(np.round(45.0 + age_trend + rng.normal(0.0, 14.0, n)), *_AGE_RANGE)
    log_cells = rng.uniform(math.log(spec.min_cells), math.log(spec.max_cells), n)
    n_cells = np.round(np.exp(log_cells))
    return pd.DataFrame(
        {
            "dataset_id": [_site_name(s) for s in site],
            "donor_id": [f"donor-{j}" for j in within_site],
            "disease": [_DISEASES[min(int(s), 1)] for s in severity],
            "severity": severity.astype(np.int64),
            "age": age.astype(np.float64),
            "sex": rng.choice(_SEXES[:2], size=n),
            "assay": [_ASSAYS[s % 2] for s in site],
            "n_cells": n_cells.astype(np.int64),
        }
    )


def simulate_cells(
    spec: CohortSpec, donors: pd.DataFrame, chunk_cells: int = 200_000, *,
    datasets: Sequence[CensusDataset] | None = None,
) -> Iterator[anndata.AnnData]:
    """Simulate the cells of ``donors`` as a stream of AnnData chunks.

    Parameters
    ----------
    spec
        The cohort parameters.
    donors
        The donor table, normally ``simulate_donors(spec)`` or a subset of its rows; the
        index labels seed each donor's random draws.
    chunk_cells
        Target cells per chunk. Chunks are cut between donors, so a donor larger than
        this makes a larger chunk.
    datasets
        One :class:`CensusDataset` per site: the sites' cells then carry those datasets'
        ``dataset_id``, ``disease``, ``tissue``, ``tissue_general``, ``assay`` and
        ``suspension_type`` (a column added) instead of the built-in labels.

    Yields
    ------
    anndata.AnnData
        Cells of whole donors, donors in table order (then the pseudo-donors), each donor's
        cells contiguous. ``obs`` has Census-like columns with identical categoricals in
        every chunk, ``X`` is CSR float32 raw counts with Census ``var`` columns, and
        ``obsm[spec.embedding_name]`` is float32 ``[n, embedding_dim]``.
    """
    if not _is_int(chunk_cells, 1):
        raise InputError(f"chunk_cells = {chunk_cells!r} is invalid", "pass an integer >= 1")
    missing = [c for c in _DONOR_COLUMNS if c not in donors.columns]
    labels = donors.index
    if missing or not pd.api.types.is_integer_dtype(labels) or (labels < 0).any():
        raise InputError(
            f"the donor table lacks columns {missing} or has a non-integer or negative index",
            "pass the output of simulate_donors(spec), or rows of it",
        )
    labels = None if datasets is None else _CensusLabels.of(spec, datasets)
    return _chunks(spec, donors, chunk_cells, labels)


def _chunks(spec: CohortSpec, donors: pd.DataFrame, chunk_cells: int,
            labels: _CensusLabels | None) -> Iterator[anndata.AnnData]:
    """The generator behind ``simulate_cells`` (which validates its input eagerly)."""
    model = _Model.draw(spec)
    categories = _obs_categories(spec, donors)
    var = _var_table(spec)
    pending: list[_Block] = []
    n_pending = 0
    for unit in _units(spec, donors, categories):
        block = _simulate_block(spec, model, unit)
        if pending and n_pending + block.n > chunk_cells:
            yield _assemble(spec, pending, categories, var, labels)
            pending, n_pending = [], 0
        pending.append(block)
        n_pending += block.n
    if pending:
        yield _assemble(spec, pending, categories, var, labels)


def write_h5ad(spec: CohortSpec, path: str | Path, chunk_cells: int = 200_000) -> Path:
    """Simulate a cohort into a new ``.h5ad`` file with memory bounded by one chunk.

    Chunks are written as separate files beside the target and joined with
    ``anndata.experimental.concat_on_disk``; the result is renamed into place at the end.

    Parameters
    ----------
    spec
        The cohort parameters.
    path
        The file to create; it must not exist.
    chunk_cells
        Cells simulated (and held in memory) at a time.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    with _new_output(path) as staged, tempfile.TemporaryDirectory(
            prefix=f".{staged.name}.parts-", dir=staged.parent) as scratch:
        parts: list[Path] = []
        for i, chunk in enumerate(simulate_cells(spec, simulate_donors(spec), chunk_cells)):
            parts.append(Path(scratch) / f"part-{i:05d}.h5ad")
            chunk.write_h5ad(parts[-1])
        joined = parts[0] if len(parts) == 1 else Path(scratch) / "joined.h5ad"
        if len(parts) > 1:  # the .h5ad suffix tells concat_on_disk the format
            concat_on_disk(parts, joined, merge="same")
        joined.rename(staged)
    return Path(path)


def write_soma(
    spec: CohortSpec,
    uri: str | Path,
    *,
    census_like: bool = False,
    datasets: Sequence[CensusDataset] | None = None,
    chunk_cells: int = 200_000,
) -> str:
    """Simulate a cohort into a new SOMA Experiment, or a Census-shaped SOMA Collection.

    The experiment has measurement ``"RNA"`` with X layer ``"raw"`` and
    ``obsm[spec.embedding_name]``; obs ``soma_joinid`` runs ``0 .. n - 1`` in cell order.
    Chunks are appended with ``tiledbsoma.io`` registration (each chunk registered on its
    own, joinids shifted past the rows already written), so memory is bounded by one
    chunk. Everything is written beside ``uri`` and renamed into place at the end.

    Parameters
    ----------
    spec
        The cohort parameters.
    uri
        Local directory to create; it must not exist.
    census_like
        If true, ``uri`` becomes a Collection laid out like CELLxGENE Census
        (``census_info/summary``, ``census_info/datasets``, experiment at
        ``census_data/homo_sapiens``) that ``cellxgene_census.open_soma(uri=...)`` opens.
    datasets
        One :class:`CensusDataset` per site: the obs values of each site's cells (see
        :func:`simulate_cells`), and its row of ``census_info/datasets``.
    chunk_cells
        Cells simulated (and held in memory) at a time.

    Returns
    -------
    str
        The URI written: the experiment, or the collection when ``census_like``.
    """
    chunks = simulate_cells(spec, simulate_donors(spec), chunk_cells, datasets=datasets)
    titles = {d.dataset_id: (d.collection_name, d.title) for d in datasets or ()}
    width = max(spec.n_genes, spec.embedding_dim)
    with _new_output(uri) as staged:
        if census_like:
            write_census_collection(str(staged), chunks, width, n_donors=spec.n_donors,
                                    titles=titles)
        else:
            write_experiment(str(staged), chunks, width)
    return str(Path(uri))


# ---------------------------------------------------------------------------- model


@dataclass(frozen=True)
class _Model:
    """The cohort-wide parameters: type means, state directions, maps to outputs."""

    type_means: np.ndarray  # [K, L]
    state_dirs: np.ndarray  # [K, L] unit rows
    log_proportions: np.ndarray  # [K] baseline
    composition: np.ndarray  # [K]
    shapes: tuple[ShapeKind | None, ...]  # [K] within-type change with severity
    age_dir: np.ndarray  # [L]
    sex_dir: np.ndarray  # [L]
    embed_map: np.ndarray  # [L, D], orthonormal rows or columns
    site_shifts: np.ndarray  # [S, D]
    site_library: np.ndarray  # [S] multiplicative library factor
    site_log_proportions: np.ndarray  # [S, K] technical change of the composition
    site_effects: SiteEffects  # per-(site, type) shifts and per-(site, feature) gains
    gene_base: np.ndarray  # [G] baseline log abundance
    gene_loadings: np.ndarray  # [L, G]

    @classmethod
    def draw(cls, spec: CohortSpec) -> _Model:
        rng = np.random.default_rng([spec.seed, _COHORT_STREAM])
        types = _CELL_TYPES[: spec.n_cell_types]
        dim = _LATENT_DIM
        return cls(
            type_means=rng.normal(0.0, _TYPE_SPREAD, (len(types), dim)),
            state_dirs=_unit_rows(rng.normal(size=(len(types), dim))),
            log_proportions=np.log([t.proportion for t in types]),
            composition=np.array([_composition_of(spec, t) for t in types]),
            shapes=tuple(_shape_of(spec, t) for t in types),
            age_dir=_unit_rows(rng.normal(size=(1, dim)))[0],
            sex_dir=_unit_rows(rng.normal(size=(1, dim)))[0],
            embed_map=_orthonormal(dim, spec.embedding_dim, rng),
            site_shifts=spec.site_effect * rng.normal(size=(spec.n_sites, spec.embedding_dim)),
            site_library=np.exp(
                spec.site_effect * _SITE_LIBRARY_SD * rng.normal(size=spec.n_sites)
            ),
            gene_base=rng.normal(0.0, 1.0, spec.n_genes),
            gene_loadings=rng.normal(0.0, _GENE_LOADING, (dim, spec.n_genes)),
            site_log_proportions=spec.site_composition * np.random.default_rng(
                [spec.seed, _SITE_STREAM]).normal(size=(spec.n_sites, len(types))),
            site_effects=SiteEffects.draw(spec.seed, spec.n_sites, len(types),
                                          spec.embedding_dim, spec.site_type_effect,
                                          spec.site_gain),
        )


class _Unit(NamedTuple):
    """One donor (or pseudo-donor) to simulate; string columns as category codes."""

    key: tuple[int, ...]  # seed of the unit's random generator
    prefix: str  # cell ids are f"{prefix}-{j}"
    n_cells: int
    severity: int  # -1 = not recorded (simulated as healthy)
    age: float  # NaN = not recorded
    codes: dict[str, int]  # obs column -> category code, constant over the donor's cells


class _Block(NamedTuple):
    """The simulated cells of one unit."""

    unit: _Unit
    cell_types: np.ndarray  # [n] codes
    cell_states: np.ndarray  # [n] codes into _CELL_STATES
    is_primary: np.ndarray  # [n] bool
    X: sparse.csr_matrix
    embedding: np.ndarray  # [n, D] float32
    rows: np.ndarray  # [n] the primary cell each row is (or copies), 0 .. unit.n_cells - 1

    @property
    def n(self) -> int:
        return len(self.cell_types)


def _simulate_block(spec: CohortSpec, model: _Model, unit: _Unit) -> _Block:
    """Simulate one donor's primary cells, then append its duplicates."""
    rng = np.random.default_rng(unit.key)
    n, severity = unit.n_cells, max(unit.severity, 0)
    site = unit.codes["dataset_id"]
    logits = model.log_proportions + severity * spec.composition_effect * model.composition
    logits = logits + rng.normal(0.0, _PROPORTION_NOISE, len(logits))
    logits = logits + model.site_log_proportions[site]
    types = rng.choice(len(logits), size=n, p=_softmax(logits))

    age_z = 0.0 if math.isnan(unit.age) else (unit.age - np.mean(_AGE_RANGE)) / np.ptp(_AGE_RANGE)
    sex_sign = _SEX_SIGN[unit.codes["sex"]]
    donor_shift = (
        rng.normal(0.0, _DONOR_NOISE, _LATENT_DIM)
        + _AGE_EFFECT * age_z * model.age_dir
        + _SEX_EFFECT * sex_sign * model.sex_dir
    )
    latent = model.type_means[types] + donor_shift + rng.normal(0.0, _CELL_NOISE, (n, _LATENT_DIM))
    states = np.zeros(n, dtype=np.int8)
    strength = severity * spec.state_effect
    for k, shape in enumerate(model.shapes):
        if shape is not None:
            members = np.flatnonzero(types == k)
            offsets, codes = _SHAPE_CHANGES[shape](latent[members] - model.type_means[k]
                                                   - donor_shift, strength, model.state_dirs[k],
                                                   rng)
            latent[members] += offsets
            states[members] = codes if strength > 0 else 0

    embedding = model.site_effects.apply(latent @ model.embed_map, types, site)
    embedding += model.site_shifts[site]
    embedding += rng.normal(0.0, _EMBED_NOISE, embedding.shape)
    expression = _softmax(model.gene_base + latent @ model.gene_loadings)
    library = _ASSAY_UMIS[unit.codes["assay"]] * model.site_library[site]
    library = library * np.exp(rng.normal(-(_LIBRARY_SD**2) / 2, _LIBRARY_SD, (n, 1)))
    rate = library * expression * rng.gamma(_NB_SHAPE, 1.0 / _NB_SHAPE, expression.shape)
    counts = rng.poisson(rate).astype(np.float32)

    n_copies = round(spec.duplicate_fraction * n)
    rows = np.concatenate([np.arange(n), rng.choice(n, size=n_copies, replace=False)])
    return _Block(
        unit=unit,
        cell_types=types[rows],
        cell_states=states[rows],
        is_primary=np.arange(len(rows)) < n,
        X=sparse.csr_matrix(counts[rows]),
        embedding=embedding[rows].astype(np.float32),
        rows=rows,
    )


def _split(deviation: np.ndarray, strength: float, direction: np.ndarray,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Half the cells move by ``+strength`` along ``direction``, half by ``-strength``."""
    signs = np.where(rng.permutation(len(deviation)) % 2 == 0, 1.0, -1.0)
    codes = np.where(signs > 0, _CELL_STATES.index("split+"), _CELL_STATES.index("split-"))
    return np.outer(signs * strength, direction), codes


def _spread(deviation: np.ndarray, strength: float, direction: np.ndarray,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The spread along ``direction`` grows by ``1 + _SPREAD_GAIN * strength`` (same mean)."""
    along = deviation @ direction
    codes = np.full(len(deviation), _CELL_STATES.index("spread"))
    return np.outer(_SPREAD_GAIN * strength * along, direction), codes


def _substate(deviation: np.ndarray, strength: float, direction: np.ndarray,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A share of the cells moves away along ``direction``; the rest keeps the mean."""
    n = len(deviation)
    moved = rng.permutation(n) < round(min(_SUBSTATE_SHARE * strength, 0.5) * n)
    share = moved.mean() if n else 0.0
    shift = _SUBSTATE_SHIFT * np.where(moved, 1.0 - share, -share) * (strength > 0)
    codes = np.where(moved, _CELL_STATES.index("substate"), 0)
    return np.outer(shift, direction), codes


def _shift(deviation: np.ndarray, strength: float, direction: np.ndarray,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Every cell moves by ``_SHIFT_GAIN * strength`` along ``direction`` (the mean moves)."""
    codes = np.full(len(deviation), _CELL_STATES.index("shift"))
    return np.tile(_SHIFT_GAIN * strength * direction, (len(deviation), 1)), codes


_SHAPE_CHANGES = {"split": _split, "spread": _spread, "substate": _substate, "shift": _shift}


# ---------------------------------------------------------------------------- tables


def _obs_categories(spec: CohortSpec, donors: pd.DataFrame) -> dict[str, list[str]]:
    """Fixed category lists of the string obs columns (in column order), same in every chunk."""
    stages = sorted({_stage(a) for a in donors["age"]}, key=lambda s: int(s.split("-")[0]))
    donor_ids = list(pd.unique(donors["donor_id"].astype(str)))
    specials = (
        [d for d in _SPECIAL_DONORS if d not in donor_ids] if spec.special_donor_cells else []
    )
    return {
        "dataset_id": [_site_name(s) for s in range(spec.n_sites)],
        "donor_id": donor_ids + specials,
        "cell_type": [t.name for t in _CELL_TYPES[: spec.n_cell_types]],
        "cell_state": list(_CELL_STATES),
        "disease": list(_DISEASES),
        "tissue": ["blood"],
        "tissue_general": ["blood"],
        "assay": list(_ASSAYS),
        "sex": list(_SEXES),
        "development_stage": [*stages, _UNKNOWN],
    }


def _units(
    spec: CohortSpec, donors: pd.DataFrame, categories: dict[str, list[str]]
) -> Iterator[_Unit]:
    """The donors to simulate, in order: the table's rows, then the pseudo-donors."""
    constant = ("dataset_id", "donor_id", "disease", "assay", "sex")
    table = {c: _codes(donors[c].astype(str), categories[c], c) for c in constant}
    for row, label in enumerate(donors.index):
        age = float(donors["age"].iloc[row])
        codes = {c: int(table[c][row]) for c in constant}
        codes |= {"tissue": 0, "tissue_general": 0}
        codes["development_stage"] = categories["development_stage"].index(_stage(age))
        yield _Unit(
            key=(spec.seed, _CELL_STREAM, int(label)),
            prefix=f"d{label}",
            n_cells=int(donors["n_cells"].iloc[row]),
            severity=int(donors["severity"].iloc[row]),
            age=age,
            codes=codes,
        )
    if spec.special_donor_cells:
        for i, name in enumerate(_SPECIAL_DONORS):
            site = 0 if i == 0 else spec.n_sites - 1
            codes = {
                "dataset_id": site,
                "donor_id": categories["donor_id"].index(name),
                "disease": 0,
                "assay": site % 2,
                "sex": _SEXES.index(_UNKNOWN),
                "tissue": 0,
                "tissue_general": 0,
                "development_stage": len(categories["development_stage"]) - 1,
            }
            yield _Unit(
                key=(spec.seed, _SPECIAL_STREAM, i),
                prefix=name,
                n_cells=spec.special_donor_cells,
                severity=-1,
                age=math.nan,
                codes=codes,
            )


def _assemble(
    spec: CohortSpec, blocks: list[_Block], categories: dict[str, list[str]], var: pd.DataFrame,
    labels: _CensusLabels | None = None,
) -> anndata.AnnData:
    """Join simulated blocks into one AnnData chunk (labelled as Census datasets if given)."""
    sizes = [b.n for b in blocks]
    per_cell = {"cell_type": [b.cell_types for b in blocks],
                "cell_state": [b.cell_states for b in blocks]}
    obs = {
        column: pd.Categorical.from_codes(
            np.concatenate(per_cell[column]) if column in per_cell
            else np.repeat([b.unit.codes[column] for b in blocks], sizes),
            categories=cats,
        )
        for column, cats in categories.items()
    }
    if labels is not None:
        obs.update(labels.obs(blocks))
    obs["is_primary_data"] = np.concatenate([b.is_primary for b in blocks])
    obs["severity"] = np.repeat([b.unit.severity for b in blocks], sizes).astype(np.int64)
    obs["age"] = np.repeat([b.unit.age for b in blocks], sizes).astype(np.float64)
    ids = [f"{b.unit.prefix}-{j}" for b in blocks for j in range(b.n)]
    return anndata.AnnData(
        X=sparse.vstack([b.X for b in blocks], format="csr", dtype=np.float32),
        obs=pd.DataFrame(obs, index=pd.Index(ids, dtype=str)),
        var=var,
        obsm={spec.embedding_name: np.concatenate([b.embedding for b in blocks])},
    )


class _CensusLabels(NamedTuple):
    """The sites of a cohort as Census datasets, with the obs categories they use."""

    datasets: tuple[CensusDataset, ...]  # one per site
    categories: dict[str, list[str]]  # obs column -> every value, the same in every chunk

    @classmethod
    def of(cls, spec: CohortSpec, datasets: Sequence[CensusDataset]) -> _CensusLabels:
        """Check one dataset per site with distinct ids; collect their values."""
        datasets = tuple(datasets)
        ids = [d.dataset_id for d in datasets if isinstance(d, CensusDataset)]
        if len(ids) != len(datasets) or len(ids) != spec.n_sites or len(set(ids)) != len(ids):
            raise InputError(
                f"datasets must be {spec.n_sites} CensusDataset with distinct dataset_id "
                f"values, one per site, got {datasets!r}",
                f"pass one CensusDataset per site (CohortSpec.n_sites = {spec.n_sites})",
            )
        categories: dict[str, list[str]] = {}
        for dataset in datasets:
            for column, values in dataset._values().items():
                categories[column] = list(dict.fromkeys([*categories.get(column, []), *values]))
        return cls(datasets, categories)

    def obs(self, blocks: list[_Block]) -> dict[str, pd.Categorical]:
        """The labelled obs columns of ``blocks`` (cells in block order)."""
        parts = [self.datasets[b.unit.codes["dataset_id"]]._labels(b.unit, b.rows)
                 for b in blocks]
        return {column: pd.Categorical(np.concatenate([p[column] for p in parts]),
                                       categories=values)
                for column, values in self.categories.items()}


def _var_table(spec: CohortSpec) -> pd.DataFrame:
    """Census-style gene table with synthetic Ensembl-like ids."""
    rng = np.random.default_rng([spec.seed, _GENE_STREAM])
    ids = [f"ENSGSYN{g:08d}" for g in range(spec.n_genes)]
    return pd.DataFrame(
        {
            "feature_id": ids,
            "feature_name": [f"SYN{g}" for g in range(spec.n_genes)],
            "feature_length": rng.integers(300, 10_000, spec.n_genes, dtype=np.int64),
        },
        index=pd.Index(ids, dtype=str),
    )


# ---------------------------------------------------------------------------- writers


# ---------------------------------------------------------------------------- helpers


def _new_output(path: str | Path) -> AbstractContextManager[Path]:
    """Stage a new output and publish it atomically at the end (local path or URI)."""
    if Location(path).exists():
        raise InputError(f"output path {path} already exists", "delete it or pick another path")
    return staged_output(path, overwrite=False, kind=_SIMULATED)


def _is_int(value: object, minimum: int) -> bool:
    """An integer (not a bool) of at least ``minimum``."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= minimum


def _is_label(value: object) -> bool:
    """A non-empty string."""
    return isinstance(value, str) and value != ""


def _is_real(value: object) -> bool:
    """A finite, non-negative real number."""
    return isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0


def _site_name(site: int) -> str:
    return f"site-{site}"


def _stage(age: float) -> str:
    return f"{round(age)}-year-old stage"


def _codes(values: pd.Series, categories: list[str], column: str) -> np.ndarray:
    """Category codes of ``values``; unknown values are an InputError."""
    codes = pd.Categorical(values, categories=categories).codes
    if (codes < 0).any():
        bad = sorted(set(values[codes < 0]))
        raise InputError(
            f"donor table column {column!r} has unexpected values {bad}",
            f"use values from {categories}",
        )
    return codes


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _orthonormal(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``[rows, cols]`` matrix with orthonormal rows or columns (whichever fit)."""
    q, _ = np.linalg.qr(rng.normal(size=(max(rows, cols), min(rows, cols))))
    return q if rows >= cols else q.T
