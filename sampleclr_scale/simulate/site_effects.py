"""Technical site effects that a shift of every cell does not remove, and confounded designs.

Real batch effects differ per cell type and scale features, not only shift them (ComBat,
Johnson et al. 2007; the SPARE benchmark, Shitov et al. 2025). The simulator
(:mod:`sampleclr_scale.simulate.cohorts`) adds, on top of its additive per-site shift:

- a shift per (site, cell type): ``site_type_effect`` times a standard normal vector in
  the embedding, drawn independently for every pair, so that centring or standardising a
  donor's cells per site leaves a cell-type-specific residue;
- a gain per (site, feature): each embedding coordinate of a site's cells is multiplied
  by ``exp(site_gain * N(0, 1))`` (a scale that differs per feature and site);
- a technical composition shift per site (``site_composition``, already in the
  simulator): every cell type's log-proportion moves by ``site_composition * N(0, 1)``.

A *confounded* design puts most donors of the highest severity level in one site
(:func:`confounded_sites`): any per-site correction then also removes biology, and only a
table of covariates against technical batches says so.

Everything here is a pure function of its inputs and a random generator seeded by the
cohort's seed on its own stream, so cohorts without these effects are unchanged bit for
bit (a gain of ``exp(0) = 1`` and a shift of 0 change no float).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SiteEffects", "confounded_sites"]

_EFFECT_STREAM = 6  # the cohort's random stream of these effects (after synthetic's 0-5)
_CONFOUND_STREAM = 7  # the donor table's stream of the confounded site assignment


@dataclass(frozen=True)
class SiteEffects:
    """Per-(site, cell type) shifts and per-(site, feature) gains of the cell embedding.

    Attributes
    ----------
    type_shifts
        Float64 ``[n_sites, n_types, dim]``: added to every cell of that type in that site.
    gains
        Float64 ``[n_sites, dim]``: multiplies every embedding coordinate of the site's
        cells (before any shift is added).
    """

    type_shifts: np.ndarray
    gains: np.ndarray

    @classmethod
    def draw(cls, seed: int, n_sites: int, n_types: int, dim: int,
             type_effect: float, gain: float) -> SiteEffects:
        """Draw the effects of a cohort.

        Parameters
        ----------
        seed
            The cohort's seed.
        n_sites, n_types, dim
            Sites, cell types and embedding width.
        type_effect
            Sd of each (site, cell type) shift per coordinate.
        gain
            Sd of each (site, feature) log gain.

        Returns
        -------
        SiteEffects
            The effects; all-zero shifts and unit gains when both strengths are 0.
        """
        rng = np.random.default_rng([seed, _EFFECT_STREAM])
        shifts = type_effect * rng.normal(size=(n_sites, n_types, dim))
        gains = np.exp(gain * rng.normal(size=(n_sites, dim)))
        return cls(type_shifts=shifts, gains=gains)

    def apply(self, embedding: np.ndarray, types: np.ndarray, site: int) -> np.ndarray:
        """The embedding of a site's cells with the site's gains and per-type shifts.

        Parameters
        ----------
        embedding
            ``[n, dim]`` cell embedding of one site's cells (before these effects).
        types
            Int ``[n]`` cell-type codes.
        site
            The site's code.

        Returns
        -------
        np.ndarray
            ``embedding * gains[site] + type_shifts[site, types]``.
        """
        return embedding * self.gains[site] + self.type_shifts[site][types]


def confounded_sites(sites: np.ndarray, severity: np.ndarray, n_sites: int, levels: int,
                     share: float, seed: int) -> np.ndarray:
    """Move donors of the highest severity level into site 0 (a confounded design).

    Each donor of level ``levels - 1`` moves to site 0 with probability ``share``; to
    keep the site sizes, each move swaps sites with a random site-0 donor of a lower
    level. With ``share`` near 1, site 0 holds mostly the most severe donors.

    Parameters
    ----------
    sites, severity
        Int ``[n]`` site and severity of each donor (the balanced draw).
    n_sites, levels
        Sites and severity levels.
    share
        Probability in ``[0, 1]`` that a top-level donor moves to site 0.
    seed
        The cohort's seed.

    Returns
    -------
    np.ndarray
        The new sites (a copy; ``sites`` itself when ``share`` is 0 or there is one site).
    """
    if share <= 0 or n_sites < 2:
        return sites
    rng = np.random.default_rng([seed, _CONFOUND_STREAM])
    sites = sites.copy()
    top = np.flatnonzero((severity == levels - 1) & (sites != 0))
    movers = top[rng.random(len(top)) < share]
    partners = rng.permutation(np.flatnonzero((sites == 0) & (severity != levels - 1)))
    for mover, partner in zip(movers, partners, strict=False):
        sites[partner], sites[mover] = sites[mover], 0
    return sites
