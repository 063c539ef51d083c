"""Built-in data for examples and tutorials: a small simulated cohort as an AnnData."""

from __future__ import annotations

from typing import Any

from sampleclr_scale.simulate.cohorts import CohortSpec, simulate_cells, simulate_donors


def simulated_anndata(n_donors: int = 24, min_cells: int = 60, max_cells: int = 200,
                      n_genes: int = 50, embedding_dim: int = 8, seed: int = 0,
                      **spec: Any) -> Any:
    """A simulated cohort with known ground truth, in memory (see
    :class:`~sampleclr_scale.simulate.cohorts.CohortSpec` for what severity changes).

    Parameters
    ----------
    n_donors, min_cells, max_cells, n_genes, embedding_dim, seed, **spec
        :class:`~sampleclr_scale.simulate.cohorts.CohortSpec` fields.

    Returns
    -------
    anndata.AnnData
        Cells x genes: counts in ``X``, a cell embedding in ``obsm["scvi"]``, obs with
        ``dataset_id`` (the site), ``donor_id`` (repeated across sites), ``sample``
        (``site/donor``, one per donor), ``cell_type``, ``disease``, ``severity`` (0-3),
        ``age``, ``sex`` and more.

    Examples
    --------
    >>> import sampleclr_scale as scs
    >>> adata = scs.simulated_anndata(n_donors=24, seed=0)
    >>> adata.obs["sample"].nunique(), adata.obsm["scvi"].shape[1]
    (24, 8)
    """
    import anndata

    cohort = CohortSpec(n_donors=n_donors, min_cells=min_cells, max_cells=max_cells,
                        n_genes=n_genes, embedding_dim=embedding_dim, seed=seed, **spec)
    chunks = list(simulate_cells(cohort, simulate_donors(cohort), chunk_cells=1 << 30))
    adata = anndata.concat(chunks, merge="same") if len(chunks) > 1 else chunks[0]
    adata.obs["sample"] = (adata.obs["dataset_id"].astype(str) + "/"
                           + adata.obs["donor_id"].astype(str)).astype("category")
    return adata
