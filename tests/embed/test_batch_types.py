"""Embedding applies the per-(batch, cell type) correction and the composition channel."""

from __future__ import annotations

import numpy as np
import torch

from sampleclr_scale.embed.config import EmbedConfig
from sampleclr_scale.embed.embedder import _with_composition
from sampleclr_scale.embed.selection import select_balanced, select_cells
from sampleclr_scale.embed.worker import embed_donors
from sampleclr_scale.model import ModelConfig, SampleCLR
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.composition import composition_channel, donor_type_counts
from sampleclr_scale.store.type_batches import apply_affine


def test_embed_donors_maps_cells_with_their_pairs_before_the_model(batch_store) -> None:
    store = BagStore(batch_store)
    torch.manual_seed(0)
    model = SampleCLR(ModelConfig.preset("small", input_dim=store.dim, n_heads=2)).eval()
    config = EmbedConfig(cells=50, mode="random", seed=1)
    donors = [0, 1, 2]
    out = embed_donors(store, model, donors, config, standardize="batch_cell_type")
    plain = embed_donors(store, model, donors, config)
    assert np.array_equal(out.store_rows, plain.store_rows)  # the same cells
    scale, offset, column = store.batch_type_maps
    codes = np.asarray(store.codes(column)[:])
    start = 0
    for i, donor in enumerate(donors):
        rows = out.store_rows[start:start + out.counts[i]]
        start += out.counts[i]
        x = apply_affine(np.asarray(store.features[:])[rows], scale, offset,
                         int(store.donor_batch[donor]), codes[rows])
        with torch.no_grad():
            z = model(torch.from_numpy(x)[None], torch.ones(1, len(x), dtype=torch.bool)).z
        np.testing.assert_allclose(out.z[i], z[0].numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(out.z, plain.z)


def test_the_composition_channel_follows_the_model_config(batch_store) -> None:
    store = BagStore(batch_store)
    z = np.random.default_rng(0).normal(size=(store.n_donors, 4)).astype(np.float32)
    assert _with_composition(store, z, {"train_config": {}}) is z
    counts = donor_type_counts(store, "cell_type")
    # a model saved before its weight was: its run's composition_channel
    got = _with_composition(store, z, {"train_config": {"composition_channel": 0.7}})
    np.testing.assert_array_equal(got, composition_channel(z, counts, store.donor_batch, 0.7))
    # the weight saved with the model (the prior's choice for composition_channel auto)
    chosen = {"train_config": {"composition_channel": "auto"},
              "channel_weight": {"weight": 2.5, "chosen_by": "gloscope"}}
    np.testing.assert_array_equal(_with_composition(store, z, chosen),
                                  composition_channel(z, counts, store.donor_batch, 2.5))
    assert _with_composition(store, z, {"train_config": {"composition_channel": 1.0},
                                        "channel_weight": {"weight": 0.0}}) is z


def test_halves_draw_each_donor_from_its_even_or_its_odd_rows(batch_store) -> None:
    # the split-half reliability's two passes: disjoint cells, each pass drawn (balanced or
    # not) as a whole pass would draw from that half alone, and embedded from those cells
    store = BagStore(batch_store)
    torch.manual_seed(0)
    model = SampleCLR(ModelConfig.preset("small", input_dim=store.dim, n_heads=2)).eval()
    donors = [0, 1, 2]
    counts = store.category_counts("cell_type").astype(np.float64)
    codes = np.asarray(store.codes("cell_type")[:])
    for balance in (None, "cell_type"):
        config = EmbedConfig(cells=20, mode="random", seed=2)
        halves = [embed_donors(store, model, donors, config, standardize="batch_cell_type",
                               balance=balance, half=h) for h in (0, 1)]
        for i, donor in enumerate(donors):
            first, stop = int(store.donor_ptr[donor]), int(store.donor_ptr[donor + 1])
            picked = []
            for h, out in enumerate(halves):
                begin = int(np.sum(out.counts[:i]))
                rows = out.store_rows[begin:begin + out.counts[i]]
                offsets = np.arange(first + h, stop, 2)
                own = offsets - first
                if balance is None:
                    expected = offsets[select_cells(np.zeros((len(own), 1)), 20, "random",
                                                    k=15, seed=2, donor=donor)]
                else:
                    expected = offsets[select_balanced(codes[first:stop][own], 20,
                                                       counts / counts.sum(), 2, donor)]
                assert np.array_equal(rows, expected)
                picked.append(set(rows.tolist()))
                scale, offset, column = store.batch_type_maps
                x = apply_affine(np.asarray(store.features[:])[rows], scale, offset,
                                 int(store.donor_batch[donor]),
                                 np.asarray(store.codes(column)[:])[rows])
                with torch.no_grad():
                    z = model(torch.from_numpy(x)[None],
                              torch.ones(1, len(x), dtype=torch.bool)).z[0].numpy()
                np.testing.assert_allclose(out.z[i], z, rtol=1e-5, atol=1e-6)
            assert not picked[0] & picked[1]
