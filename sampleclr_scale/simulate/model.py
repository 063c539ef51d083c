"""The generative model of the simulated cells: the latent cell-type means, the directions
severity moves cell states along, and one donor-site unit's cells drawn from them.

Package-private: :mod:`~sampleclr_scale.simulate.cohorts` draws cells through
:func:`_simulate_block`; the model's constants are in :mod:`~sampleclr_scale.simulate.spec`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import sparse

from sampleclr_scale.simulate.site_effects import SiteEffects
from sampleclr_scale.simulate.spec import (
    _AGE_EFFECT,
    _AGE_RANGE,
    _ASSAY_UMIS,
    _CELL_NOISE,
    _CELL_STATES,
    _CELL_TYPES,
    _COHORT_STREAM,
    _DONOR_NOISE,
    _EMBED_NOISE,
    _GENE_LOADING,
    _LATENT_DIM,
    _LIBRARY_SD,
    _NB_SHAPE,
    _PROPORTION_NOISE,
    _SEX_EFFECT,
    _SEX_SIGN,
    _SHIFT_GAIN,
    _SITE_LIBRARY_SD,
    _SITE_STREAM,
    _SPREAD_GAIN,
    _SUBSTATE_SHARE,
    _SUBSTATE_SHIFT,
    _TYPE_SPREAD,
    CohortSpec,
    ShapeKind,
    _composition_of,
    _shape_of,
)


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
