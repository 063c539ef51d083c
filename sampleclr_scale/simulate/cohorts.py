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
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import NamedTuple

import anndata
import numpy as np
import pandas as pd
from anndata.experimental import concat_on_disk
from scipy import sparse

from sampleclr_scale.errors import InputError
from sampleclr_scale.simulate._soma_writer import write_census_collection, write_experiment
from sampleclr_scale.simulate.model import _Block, _Model, _simulate_block, _Unit
from sampleclr_scale.simulate.site_effects import confounded_sites
from sampleclr_scale.simulate.spec import (
    _AGE_RANGE,
    _ASSAYS,
    _CELL_STATES,
    _CELL_STREAM,
    _CELL_TYPES,
    _DISEASES,
    _DONOR_COLUMNS,
    _DONOR_STREAM,
    _GENE_STREAM,
    _SEXES,
    _SPECIAL_DONORS,
    _SPECIAL_STREAM,
    _UNKNOWN,
    CELL_TYPE_SITE_EFFECTS,
    CensusDataset,
    CohortSpec,
    _is_int,
    ground_truth,
)
from sampleclr_scale.storage import Location, staged_output
from sampleclr_scale.storage.outputs import OutputKind

__all__ = [
    "CELL_TYPE_SITE_EFFECTS",
    "CensusDataset",
    "CohortSpec",
    "ground_truth",
    "simulate_cells",
    "simulate_donors",
    "write_h5ad",
    "write_soma",
]


_SIMULATED = OutputKind("a simulated cohort", commit=None, recognise=lambda _: False)
"""A simulated source (.h5ad, SOMA): only ever written new, so nothing is replaceable."""


# independent random streams: cohort parameters, gene table, donor table, cells


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


def _new_output(path: str | Path) -> AbstractContextManager[Path]:
    """Stage a new output and publish it atomically at the end (local path or URI)."""
    if Location(path).exists():
        raise InputError(f"output path {path} already exists", "delete it or pick another path")
    return staged_output(path, overwrite=False, kind=_SIMULATED)


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
