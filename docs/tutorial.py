# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # From an AnnData to donor maps with SampleCLR
#
# SampleCLR learns one vector per sample (donor, patient) from that sample's cells: two
# random subsets of one sample's cells are a positive pair, subsets of other samples are
# negatives. This tutorial fits it on an AnnData in a notebook, as you would fit scVI or
# MrVI, and gets back a donor-level AnnData: donor maps, predictions of a clinical
# covariate, which cells weigh in each donor's vector, and the vectors of a new cohort.
#
# This file is a [jupytext](https://jupytext.readthedocs.io) script: open it as a notebook
# with `jupytext --to notebook docs/tutorial.py`, or run it as it is with
# `python docs/tutorial.py`. The test suite runs it on a tiny cohort
# (`SAMPLECLR_TUTORIAL_QUICK=1`), so it cannot rot.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import sampleclr_scale as scs

QUICK = os.environ.get("SAMPLECLR_TUTORIAL_QUICK") == "1"
N_DONORS, EPOCHS, HEAD_STEPS = (16, 2, 0) if QUICK else (120, 20, 200)

# %% [markdown]
# ## The data
#
# The built-in simulated cohort stands in for your own `adata`: cells of donors at four
# sites, with counts in `X`, a cell embedding in `obsm["scvi"]` (as scVI would give) and
# the donors' covariates repeated on each cell. Severity (0: healthy to 3) changes the
# cell-type composition and, invisibly to averages, the spread of cell states within some
# cell types; each site shifts all of its cells. Donor ids repeat across sites, so the
# `sample` column (`site/donor`) names a donor.

# %%
adata = scs.simulated_anndata(n_donors=N_DONORS, min_cells=100, max_cells=600, seed=0)
print(adata)

# %% [markdown]
# A cohort larger than memory works the same way: read it backed,
# `adata = anndata.read_h5ad("cohort.h5ad", backed="r")`. The model then reads `X` from
# the file in row blocks, never all at once.
#
# ## Set up and train
#
# `setup_anndata` names the sample column (and optionally the technical batch and the
# cell types) and the cell features: an `obsm` embedding, or `"pca:N"` for a PCA of the
# counts in `X` or a `layer`. It checks everything up front: a missing column, a sample
# with fewer than `min_cells` cells, NaN features are errors that say how to fix them.
# It also finds the sample-level columns (one value per sample): the donor metadata.

# %%
scs.SampleCLR.setup_anndata(adata, sample_key="sample", batch_key="dataset_id",
                            cell_type_key="cell_type", features="scvi", min_cells=50)

# %% [markdown]
# Every training setting of the command line's `train.yaml` is a keyword (validated the
# same way: a misspelt key is an error listing the valid ones). With a task, a second
# training stage learns a head that predicts it. Training runs in this process
# (`workers=1`, no Ray); `model.train(workers=4)` trains data-parallel on Ray Train, on
# this machine or on the cluster `RAY_ADDRESS` names, and `use_gpu=True` on GPUs.

# %%
model = scs.SampleCLR(adata, epochs=EPOCHS, supervised_epochs=max(EPOCHS // 2, 1),
                      supervised_min_steps=HEAD_STEPS, freeze_epochs=2, patience=None,
                      tasks={"severity": "ordinal"},
                      loader={"cells_per_view": 64 if QUICK else 300})
model.train()

# %% [markdown]
# ## The donor AnnData
#
# One row per sample: `X` is the representation, `obs` the sample metadata, the number of
# cells, the training/validation split and the predictions of each task
# (`severity_pred` and a probability per level); `uns["sampleclr_provenance"]` says
# which model and cells made it.

# %%
donors = model.get_sample_representation()
print(donors)

# %% [markdown]
# A donor map: the first two principal components of the representations, coloured by
# severity. With scanpy (not a dependency of sampleclr-scale), the donor AnnData goes
# straight in: `sc.pp.neighbors(donors, use_rep="X", metric="cosine")`,
# `sc.tl.umap(donors)`, `sc.pl.umap(donors, color=["severity", "dataset_id"])`.

# %%
centred = donors.X - donors.X.mean(axis=0)
pcs = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T
fig, axes = plt.subplots(1, 2, figsize=(9, 4))
for ax, column in zip(axes, ["severity", "dataset_id"], strict=True):
    codes = pd.Categorical(donors.obs[column])
    points = ax.scatter(pcs[:, 0], pcs[:, 1], c=codes.codes, cmap="viridis", s=18)
    ax.set(title=f"donors by {column}", xlabel="PC 1", ylabel="PC 2")
    ax.legend(points.legend_elements()[0], list(codes.categories), fontsize=7)
fig.savefig("donor_map.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# Severity should run along the map, and the sites should mix: the model centres each
# bag of cells, so a shift shared by all of a site's cells does not separate donors.
#
# To score the map with [patpy](https://github.com/lueckenlab/patpy) (scverse's sample
# representation toolbox), hand it what its evaluation takes: a sample-by-sample distance
# matrix and the samples' metadata, e.g.
# `scipy.spatial.distance.squareform(pdist(donors.X, "cosine"))` and `donors.obs` (see
# patpy's documentation of `patpy.tl.evaluate_representation` for the arguments of your
# version). `sampleclr-scale evaluate` computes the SPARE metrics against baselines.
#
# ## Predictions
#
# The severity head's predictions, on the validation donors the model never trained on.
# The head is trained in a second, short stage, and the weights kept are those of its
# best validation loss: on a cohort this small, after a few epochs, it may still predict
# mostly one level. (The demo's 200 larger donors, trained 20 + 10 epochs, reach a
# held-out accuracy of 0.65; see the README.)

# %%
held_out = donors.obs["split"].to_numpy() == "validation"
obs = donors.obs[held_out]
print(pd.crosstab(obs["severity"], obs["severity_pred"]))
print(f"head: held-out accuracy {np.mean(obs['severity'] == obs['severity_pred']):.2f}")

# %% [markdown]
# What the representation itself knows: each held-out donor's severity as the most
# common one among its 5 nearest training donors (cosine similarity of their vectors).

# %%
unit = donors.X / np.linalg.norm(donors.X, axis=1, keepdims=True)
similarity = unit[held_out] @ unit[~held_out].T
nearest = np.argsort(-similarity, axis=1)[:, :5]
train_severity = donors.obs["severity"].to_numpy()[~held_out]
knn = [np.bincount(train_severity[row]).argmax() for row in nearest]
print(f"5 nearest donors: held-out accuracy {np.mean(knn == obs['severity'].to_numpy()):.2f}")

# %% [markdown]
# ## Cell weights
#
# Each head of the model pools a sample's cells with learned weights. `get_cell_weights`
# gives every cell's weight in its sample's bag, aligned to `adata.obs_names`
# (`mode="all"` weighs every cell; by default only the cells drawn for the embedding have
# one). Which cell types does the model look at?

# %%
weights = model.get_cell_weights(mode="all")
cells_per_sample = adata.obs.groupby("sample", observed=True)["sample"].transform("size")
relative = weights["head_0"] * cells_per_sample.to_numpy()  # 1 = an average cell
print(relative.groupby(adata.obs["cell_type"].to_numpy()).mean().sort_values())

# %% [markdown]
# ## A new cohort
#
# A new AnnData is put in the model's feature space first: the same `obsm` embedding, or
# the model's PCA applied to the same genes (matched by id; missing genes are taken at
# the training mean, up to 10 %). A cohort that cannot be put there (another embedding
# width, most genes missing) is refused with an error that says so.

# %%
new = scs.simulated_anndata(n_donors=max(N_DONORS // 4, 4), min_cells=100, max_cells=600,
                            seed=1)
new_donors = model.get_sample_representation(new)
print(new_donors.obs[["severity", "severity_pred"]].head())

# %% [markdown]
# ## Save, load, and the command line
#
# `save` writes the command line's run directory (`model.pt`, `metrics.jsonl`, ...) plus
# the AnnData setup and the feature space. It loads back here, and the command line
# takes it as it is:
#
# ```bash
# sampleclr-scale ingest new.h5ad --out new.zarr --features-like saved_model \
#     --donor-key sample --cell-columns cell_type
# sampleclr-scale embed --store new.zarr --checkpoint saved_model --out new_embeddings
# ```
#
# (`--cell-columns cell_type`: a model trained on views balanced over the cell types draws
# its cells for embedding the same way, so the new store needs them.) A run trained by
# `sampleclr-scale train` loads here too: `SampleCLR.load(RUN)` embeds its
# training store, `SampleCLR.load(RUN, adata)` your AnnData.

# %%
model.save("saved_model", overwrite=True)
loaded = scs.SampleCLR.load("saved_model", adata)
assert np.array_equal(loaded.get_sample_representation().X, donors.X)
