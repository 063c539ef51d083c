"""Properties of the SampleCLR model: invariances, weights, determinism, sizes, heads, config."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sampleclr_scale.errors import InputError
from sampleclr_scale.losses import ordinal_loss, ordinal_predict
from sampleclr_scale.model import (
    CellImportanceAggregator,
    ModelConfig,
    OrdinalHead,
    ResidualMLP,
    SampleCLR,
    SupervisedHeads,
    TaskSpec,
    flatten_views,
    recommended_preset,
    split_views,
)

WEIGHTINGS = ["softmax", "sigmoid"]
NORMS = ["layernorm", "batchnorm", "none"]
POOLINGS = ["cells", "learned", "both"]
PAPER = {"pooling": "cells", "center": False}  # the paper's aggregator
TASKS = (
    TaskSpec(name="disease", kind="classification", n_classes=3),
    TaskSpec(name="severity", kind="ordinal", n_classes=5),
    TaskSpec(name="age", kind="regression", weight=0.5),
)


def _model(d=5, heads=2, weighting="softmax", norm="layernorm", dropout=0.0, tasks=(),
           seed=0, pooling="learned", center=True, head_composition=()):
    torch.manual_seed(seed)
    config = ModelConfig(input_dim=d, n_heads=heads, aggregator_hidden=8, encoder_hidden=8,
                         encoder_layers=3, output_dim=6, norm=norm, weighting=weighting,
                         dropout=dropout, tasks=tasks, pooling=pooling, center=center,
                         cell_dim=4, cell_hidden=8, head_composition=head_composition)
    return SampleCLR(config).double()


def _bags(rng, b, m, d):
    """Random double cells and a mask with at least one real cell per bag."""
    cells = torch.from_numpy(rng.normal(size=(b, m, d)))
    mask = torch.from_numpy(rng.random((b, m)) < 0.7)
    mask[torch.arange(b), torch.from_numpy(rng.integers(0, m, size=b))] = True
    return cells, mask


def _fit_batchnorm_stats(model, d):
    """Give BatchNorm layers non-trivial running statistics, then switch to eval."""
    model.train()
    with torch.no_grad():
        model(*_bags(np.random.default_rng(99), 8, 6, d))
    model.eval()


shapes = st.tuples(
    st.integers(1, 4),  # bags
    st.integers(1, 9),  # cells per bag
    st.integers(1, 6),  # features
    st.integers(1, 3),  # heads
    st.sampled_from(WEIGHTINGS),
    st.sampled_from(NORMS),
    st.sampled_from(POOLINGS),
    st.booleans(),  # center
    st.integers(0, 2**32 - 1),  # seed
)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_permuting_cells_leaves_z_unchanged(shape):
    b, m, d, heads, weighting, norm, pooling, center, seed = shape
    model = _model(d, heads, weighting, norm, seed=seed % 1000, pooling=pooling, center=center)
    _fit_batchnorm_stats(model, d)
    rng = np.random.default_rng(seed)
    cells, mask = _bags(rng, b, m, d)
    perm = torch.from_numpy(np.stack([rng.permutation(m) for _ in range(b)]))
    rows = torch.arange(b)[:, None]
    with torch.no_grad():
        out = model(cells, mask)
        permuted = model(cells[rows, perm], mask[rows, perm])
    torch.testing.assert_close(permuted.z, out.z, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(permuted.weights, out.weights[rows, perm], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("fill", [0.0, 1e30, float("inf"), float("nan")])
@pytest.mark.parametrize("aggregator", [PAPER, {"pooling": "both", "center": True}])
def test_padding_leaves_z_and_real_weights_unchanged(weighting, norm, fill, aggregator):
    d, pad = 4, 5
    model = _model(d, 3, weighting, norm, tasks=TASKS, **aggregator)
    cells, mask = _bags(np.random.default_rng(1), 4, 6, d)
    padded_cells = torch.cat([cells, torch.full((4, pad, d), fill, dtype=cells.dtype)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(4, pad, dtype=torch.bool)], dim=1)
    for train in (True, False):  # BatchNorm statistics too ignore padding in train mode
        model.train(train)
        out = model(cells, mask)
        out_padded = model(padded_cells, padded_mask)
        torch.testing.assert_close(out_padded.z, out.z, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out_padded.weights[:, :6], out.weights, rtol=1e-12, atol=0)
        assert torch.equal(out_padded.weights[~padded_mask], torch.zeros_like(
            out_padded.weights[~padded_mask]))
        for name, value in out.task_outputs.items():
            torch.testing.assert_close(out_padded.task_outputs[name], value)
        out_padded.z.sum().backward()  # non-finite padding must not poison gradients
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.zero_grad()


def _aggregator(weighting, d=4, heads=3, pooling="cells", center=False):
    torch.manual_seed(2)
    return CellImportanceAggregator(d, heads, hidden=8, n_layers=2, weighting=weighting,
                                    pooling=pooling, cell_dim=3, cell_hidden=8,
                                    center=center).double()


def test_softmax_weights_sum_to_one_over_real_cells():
    cells, mask = _bags(np.random.default_rng(3), 6, 10, 4)
    _, weights = _aggregator("softmax")(cells, mask)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(6, 3, dtype=weights.dtype))
    assert (weights[~mask] == 0).all()
    assert (weights[mask] > 0).all()


def test_sigmoid_weights_lie_in_zero_to_one_over_n_real():
    cells, mask = _bags(np.random.default_rng(4), 6, 10, 4)
    _, weights = _aggregator("sigmoid")(cells, mask)
    n_real = mask.sum(dim=1).to(weights.dtype)[:, None, None]
    assert (weights >= 0).all()
    assert (weights <= 1 / n_real).all()
    assert (weights[~mask] == 0).all()
    # The total weight is the mean importance: in (0, 1], not normalised to 1.
    assert ((weights.sum(dim=1) > 0) & (weights.sum(dim=1) <= 1)).all()


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("center", [False, True])
def test_duplicating_every_cell_leaves_aggregate_unchanged(weighting, pooling, center):
    # Softmax: each copy gets half its weight. Sigmoid / n: n doubles, so the same. Both hold.
    aggregator = _aggregator(weighting, pooling=pooling, center=center).eval()
    cells, mask = _bags(np.random.default_rng(5), 5, 7, 4)
    aggregated, weights = aggregator(cells, mask)
    twice, twice_weights = aggregator(cells.repeat(1, 2, 1), mask.repeat(1, 2))
    torch.testing.assert_close(twice, aggregated, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(twice_weights[:, :7] * 2, weights, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("center", [False, True])
def test_learned_pooling_matches_weighted_sums_of_phi(weighting, pooling, center):
    b, m, d, heads = 4, 8, 5, 3
    aggregator = _aggregator(weighting, d, heads, pooling=pooling, center=center)
    cells, mask = _bags(np.random.default_rng(16), b, m, d)
    cells[~mask] = 1e6  # padding content must not matter
    aggregated, weights = aggregator(cells, mask)
    w, real = weights.detach().numpy(), mask.numpy()
    width = aggregator.pooled_dim
    expected = np.zeros((b, heads * width))
    for i in range(b):
        x = cells[i][mask[i]]
        if center:  # the bag's own mean, computed here in numpy
            x = x - torch.from_numpy(x.numpy().mean(axis=0))
        features = [x] if pooling != "learned" else []
        if pooling != "cells":
            features.append(aggregator.cell_encoder(x))
        f = torch.cat(features, dim=1).detach().numpy()
        for h in range(heads):
            for row, j in enumerate(np.flatnonzero(real[i])):
                expected[i, h * width:(h + 1) * width] += w[i, j, h] * f[row]
    np.testing.assert_allclose(aggregated.detach().numpy(), expected, rtol=1e-10, atol=1e-10)
    assert aggregator.output_dim == heads * width == aggregated.shape[1]
    assert width == {"cells": d, "learned": 3, "both": d + 3}[pooling]


@pytest.mark.parametrize("pooling", POOLINGS)
def test_centering_makes_z_blind_to_a_shift_of_every_cell(pooling):
    # A site's additive batch effect or a donor's own offset moves every cell of a bag.
    cells, mask = _bags(np.random.default_rng(17), 5, 9, 4)
    shift = torch.from_numpy(np.random.default_rng(18).normal(0, 3, (5, 1, 4)))
    centred = _model(4, 2, pooling=pooling, center=True).eval()
    torch.testing.assert_close(centred(cells + shift, mask).z, centred(cells, mask).z,
                               rtol=1e-10, atol=1e-10)
    plain = _model(4, 2, pooling=pooling, center=False).eval()
    assert not torch.allclose(plain(cells + shift, mask).z, plain(cells, mask).z)


def test_mean_preserving_split_reaches_learned_pooling_only():
    # Two bags with the same cells' mean, one tight and one split along a direction:
    # with uniform weights, weighted sums of raw cells cannot tell them apart.
    rng = np.random.default_rng(19)
    base = torch.from_numpy(rng.normal(0, 0.1, (1, 40, 3)))
    split = base.clone()
    split[0, :20, 0] += 2.0
    split[0, 20:, 0] -= 2.0
    cells, mask = torch.cat([base, split]), torch.ones(2, 40, dtype=torch.bool)
    for pooling, differs in (("cells", False), ("learned", True)):
        aggregator = _aggregator("softmax", 3, 1, pooling=pooling)
        torch.nn.init.zeros_(aggregator.scorer.output.weight)  # uniform weights
        aggregated, _ = aggregator(cells - cells.mean(dim=1, keepdim=True), mask)
        gap = (aggregated[0] - aggregated[1]).abs().max().item()
        assert (gap > 1e-3) == differs, (pooling, gap)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_aggregate_matches_numpy_weighted_sums(weighting):
    b, m, d, heads = 4, 8, 5, 3
    aggregator = _aggregator(weighting, d, heads)
    cells, mask = _bags(np.random.default_rng(6), b, m, d)
    cells[~mask] = 1e6  # padding content must not matter
    aggregated, weights = aggregator(cells, mask)
    x, w, real = cells.numpy(), weights.detach().numpy(), mask.numpy()
    expected = np.zeros((b, heads * d))
    for i in range(b):
        for h in range(heads):
            for j in np.flatnonzero(real[i]):
                expected[i, h * d:(h + 1) * d] += w[i, j, h] * x[i, j]
    np.testing.assert_allclose(aggregated.detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    assert aggregator.output_dim == heads * d == aggregated.shape[1]


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("norm", NORMS)
def test_eval_mode_is_deterministic_and_train_without_dropout_too(weighting, norm):
    cells, mask = _bags(np.random.default_rng(7), 4, 9, 5)
    model = _model(5, 2, weighting, norm, dropout=0.3, tasks=TASKS).eval()
    first, second = model(cells, mask), model(cells, mask)
    assert torch.equal(first.z, second.z) and torch.equal(first.weights, second.weights)
    model = _model(5, 2, weighting, norm, dropout=0.0, tasks=TASKS).train()
    first, second = model(cells, mask), model(cells, mask)
    assert torch.equal(first.z, second.z) and torch.equal(first.weights, second.weights)


def test_dropout_acts_in_train_mode_only():
    cells, mask = _bags(np.random.default_rng(8), 4, 9, 5)
    model = _model(5, 2, dropout=0.5).train()
    assert not torch.equal(model(cells, mask).z, model(cells, mask).z)


def test_encode_views_equals_forward_on_each_view():
    model = _model(5, 2, tasks=TASKS).eval()
    rng = np.random.default_rng(9)
    cells = torch.from_numpy(rng.normal(size=(3, 2, 6, 5)))
    mask = torch.from_numpy(rng.random((3, 2, 6)) < 0.6)
    mask[..., 0] = True
    out_a, out_b = model.encode_views(cells, mask)
    for view, out in ((0, out_a), (1, out_b)):
        alone = model(cells[:, view], mask[:, view])
        torch.testing.assert_close(out.z, alone.z)
        torch.testing.assert_close(out.weights, alone.weights)
        assert out.task_outputs.keys() == alone.task_outputs.keys()
        for name in alone.task_outputs:
            torch.testing.assert_close(out.task_outputs[name], alone.task_outputs[name])
    # The DDP path: the model's forward on flattened views, split afterwards.
    split_a, _ = split_views(model(*flatten_views(cells, mask)))
    assert torch.equal(split_a.z, out_a.z)
    assert model.encode_views(cells, mask, with_heads=False)[0].task_outputs == {}
    with pytest.raises(InputError, match="two-view bags"):
        model.encode_views(cells[:, 0], mask[:, 0])


def _count(name, d, tasks=(), **overrides):
    config = ModelConfig.preset(name, input_dim=d, tasks=tasks, **(PAPER | overrides))
    return SampleCLR(config).n_parameters()


def test_preset_parameter_counts_match_the_paper():
    ordinal = (TaskSpec(name="severity", kind="ordinal", n_classes=5),)
    regression = (TaskSpec(name="age", kind="regression"),)
    counts = {
        (name, d, label): _count(name, d, tasks)
        for name in ("small", "large") for d in (30, 50)
        for label, tasks in (("backbone", ()), ("ordinal", ordinal), ("regression", regression))
    }
    for key, value in counts.items():
        print(key, value)
    # Paper (section 5.1): about 10 thousand (small) and 370 thousand (large) parameters.
    for d in (30, 50):
        assert 7_000 <= counts["small", d, "backbone"] <= 12_000
        assert 7_000 <= counts["small", d, "ordinal"] <= 12_000
        assert 300_000 <= counts["large", d, "backbone"] <= 400_000
        assert 340_000 <= counts["large", d, "regression"] <= 420_000
    assert abs(counts["large", 30, "regression"] - 370_000) < 5_000
    # The default aggregator pools learned cell features: one per-cell MLP more.
    assert _count("small", 30, pooling="learned") - counts["small", 30, "backbone"] < 10_000


def test_recommended_preset_follows_the_200_donor_rule():
    assert recommended_preset(0) == recommended_preset(199) == "small"
    assert recommended_preset(200) == recommended_preset(np.int64(50_000)) == "large"
    with pytest.raises(InputError):
        recommended_preset(-1)


def test_head_shapes_and_ordinal_outputs():
    model = _model(5, 2, tasks=TASKS)
    out = model(*_bags(np.random.default_rng(10), 7, 6, 5))
    assert out.z.shape == (7, 6) and out.weights.shape == (7, 6, 2)
    shapes = {name: tuple(value.shape) for name, value in out.task_outputs.items()}
    assert shapes == {"disease": (7, 3), "severity": (7, 4), "age": (7, 1)}
    # Cumulative logits logit P(y > k) strictly decrease in k: rank-consistent predictions.
    severity = out.task_outputs["severity"]
    assert (severity[:, 1:] < severity[:, :-1]).all()
    labels = torch.tensor([0, 1, 2, 3, 4, -1, 2])
    loss = ordinal_loss(severity, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert ordinal_predict(severity).shape == (7,)
    thresholds_grad = model.heads["severity"].threshold_params.grad
    assert thresholds_grad is not None and torch.isfinite(thresholds_grad).all()


def test_ordinal_thresholds_stay_ordered_for_any_parameters():
    head = OrdinalHead(4, n_classes=6)
    with torch.no_grad():
        head.threshold_params.copy_(torch.tensor([3.0, -5.0, 5.0, -1.0, 0.0]))
    assert (head.thresholds.diff() > 0).all()
    with torch.no_grad():  # a gap of softplus(-30) rounds to zero next to 3: a tie, no swap
        head.threshold_params.copy_(torch.tensor([3.0, -30.0, 5.0, -1.0, 0.0]))
    assert (head.thresholds.diff() >= 0).all()
    assert OrdinalHead(4, n_classes=2)(torch.randn(3, 4)).shape == (3, 1)


def test_backbone_and_head_parameters_partition_all_parameters():
    model = _model(5, 2, tasks=TASKS)
    backbone = {id(p) for p in model.backbone_parameters()}
    heads = {id(p) for p in model.head_parameters()}
    assert backbone and heads and not backbone & heads
    assert backbone | heads == {id(p) for p in model.parameters()}
    assert len(backbone) + len(heads) == len(list(model.parameters()))
    for p in model.backbone_parameters():
        p.requires_grad_(False)
    assert model.n_parameters(trainable_only=True) == sum(
        p.numel() for p in model.head_parameters())
    assert _model(5, 2).head_parameters() == []
    assert _model(5, 2)(*_bags(np.random.default_rng(0), 2, 3, 5)).task_outputs == {}


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValidationError, match="encoder_hiden"):
        ModelConfig(input_dim=30, encoder_hiden=64)
    with pytest.raises(ValidationError, match="n_classes >= 2"):
        TaskSpec(name="disease", kind="classification", n_classes=1)
    with pytest.raises(ValidationError, match="n_classes >= 2"):
        TaskSpec(name="severity", kind="ordinal")
    with pytest.raises(ValidationError, match="no n_classes"):
        TaskSpec(name="age", kind="regression", n_classes=3)
    with pytest.raises(ValidationError, match="norm"):
        ModelConfig(input_dim=30, norm="groupnorm")
    with pytest.raises(ValidationError, match="weighting"):
        ModelConfig(input_dim=30, weighting="gumbel")
    with pytest.raises(ValidationError, match="unique"):
        ModelConfig(input_dim=30, tasks=[TASKS[0], TASKS[0]])
    with pytest.raises(ValidationError, match="input_dim"):
        ModelConfig.preset("small", input_dim=0)
    with pytest.raises(InputError, match="unknown model preset 'medium'"):
        ModelConfig.preset("medium", input_dim=30)
    with pytest.raises(InputError, match="unknown norm"):
        ResidualMLP(3, 4, 2, 2, norm="groupnorm")
    with pytest.raises(InputError, match="n_layers"):
        ResidualMLP(3, 4, 2, 0)
    with pytest.raises(InputError, match="unknown weighting"):
        CellImportanceAggregator(3, weighting="gumbel")
    with pytest.raises(InputError, match="used twice"):
        SupervisedHeads([TASKS[0], TASKS[0]], in_dim=4)
    with pytest.raises(InputError, match="cannot name a head"):
        SupervisedHeads([TaskSpec(name="training", kind="regression")], in_dim=4)


def test_config_is_frozen_documented_and_loads_from_mappings():
    config = ModelConfig.preset("large", input_dim=50, tasks=[TASKS[1].model_dump()])
    assert config.tasks == (TASKS[1],) and config.n_heads == 8 and config.output_dim == 192
    with pytest.raises(ValidationError):
        config.output_dim = 3
    for model in (ModelConfig, TaskSpec):
        assert all(field.description for field in model.model_fields.values())
    assert ModelConfig.model_validate(config.model_dump()) == config


def test_bad_bags_raise_input_error():
    model = _model(5, 2)
    cells, mask = _bags(np.random.default_rng(11), 3, 4, 5)
    with pytest.raises(InputError, match="no real cell"):
        model(cells, torch.zeros_like(mask))
    with pytest.raises(InputError, match=r"cells must be \[B, m, 5\]"):
        model(cells[..., :4], mask)
    with pytest.raises(InputError, match="mask must be bool"):
        model(cells, mask.long())


@pytest.mark.parametrize("pooling", POOLINGS)
def test_every_pooling_trains_under_bf16_autocast(pooling):
    # as the training loop runs it on a GPU: bf16 autocast, float32 weights and gradients
    model = SampleCLR(ModelConfig.preset("small", input_dim=6, pooling=pooling, tasks=TASKS))
    cells, mask = torch.randn(3, 7, 6), torch.rand(3, 7) < 0.7
    mask[:, 0] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(cells, mask)
    assert out.z.dtype == torch.bfloat16 and torch.isfinite(out.z).all()
    (out.z.float().sum() + sum(t.float().sum() for t in out.task_outputs.values())).backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    assert (out.weights[~mask] == 0).all()


def test_heads_read_the_donor_composition_beside_z():
    model = _model(5, 2, tasks=TASKS, head_composition=("B", "T", "NK")).eval()
    cells, mask = _bags(np.random.default_rng(11), 4, 6, 5)
    composition = torch.from_numpy(np.random.default_rng(12).normal(size=(4, 3)))
    out = model(cells, mask, composition=composition)
    assert model.heads["age"][0].in_features == 6 + 3
    # each head is its MLP on [z, composition], row by row
    expected = model.heads["age"](torch.cat([out.z, composition], dim=1))
    torch.testing.assert_close(out.task_outputs["age"], expected)
    other = model(cells, mask, composition=composition.flip(0))
    assert torch.equal(other.z, out.z)  # the representation does not read it
    assert not torch.equal(other.task_outputs["age"], out.task_outputs["age"])
    # two views of each bag read their donor's composition
    views = torch.stack([cells, cells], dim=1), torch.stack([mask, mask], dim=1)
    a, b = model.encode_views(*views, composition=composition)
    torch.testing.assert_close(a.task_outputs["age"], out.task_outputs["age"])
    torch.testing.assert_close(b.task_outputs["age"], out.task_outputs["age"])
    assert model(cells, mask, with_heads=False).task_outputs == {}
    with pytest.raises(ValueError, match="pass composition"):
        model(cells, mask)
