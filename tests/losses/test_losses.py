"""Loss terms against independent numpy references, on one process (no process group)."""

from __future__ import annotations

import inspect
import itertools
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from sampleclr_scale._distributed import rank_and_world_size
from sampleclr_scale.config import TrainConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.losses import (
    BarlowConfig,
    BarlowTwinsLoss,
    ObjectiveConfig,
    TaskLoss,
    VICRegConfig,
    VICRegLoss,
    XCLRConfig,
    XCLRLoss,
    barlow_cross_correlation,
    barlow_invariance,
    barlow_redundancy,
    batch_adversary_loss,
    build_objective,
    classification_loss,
    gather_no_grad,
    gather_with_grad,
    ordinal_loss,
    ordinal_predict,
    regression_loss,
    same_batch_mask,
    soft_cross_entropy,
    vicreg_covariance,
    vicreg_invariance,
    vicreg_variance,
    xclr_loss,
    xclr_targets,
)
from sampleclr_scale.losses import xclr as xclr_module
from sampleclr_scale.losses.configs import LOSS_CONFIGS
from sampleclr_scale.losses.registry import OBJECTIVES

PROPERTY = settings(max_examples=30, deadline=None)
seeds = st.integers(0, 2**32 - 1)
batch_sizes = st.integers(1, 8)
dims = st.integers(1, 6)
taus = st.floats(0.05, 2.0)


# --- numpy references, written with loops --------------------------------------------------


def _np_unit_rows(z: np.ndarray) -> np.ndarray:
    return np.array([row / math.sqrt(sum(v * v for v in row)) for row in z])


def _np_xclr(
    a: np.ndarray, b: np.ndarray, tau: float, targets: np.ndarray, allowed: list | None = None
) -> float:
    """Mean over rows of 1/2 [CE(a_i . b_j / tau, t_i) + CE(b_i . a_j / tau, t_i)]."""
    return _loop_xclr(a, b, tau, targets, allowed)[0]


def _loop_xclr(
    a: np.ndarray, b: np.ndarray, tau: float, targets: np.ndarray, allowed: list | None = None
) -> tuple[float, np.ndarray, np.ndarray]:
    """X-CLR loss and its gradients w.r.t. the raw views ``a, b``, by loops.

    Row ``i``'s softmax runs over its allowed columns ``j`` only (all without ``allowed``).
    With ``u, v`` the unit rows, ``d loss_i / d logit_ij = p_ij - t_ij``, and the gradient
    goes back through the normalisation as ``d u / d a = (I - u u^T) / |a|``.
    """
    n, d = a.shape
    allowed = allowed or [[True] * n for _ in range(n)]
    u, v = _np_unit_rows(a), _np_unit_rows(b)
    grad_u, grad_v = np.zeros((n, d)), np.zeros((n, d))
    total = 0.0
    for q, k, grad_q, grad_k in ((u, v, grad_u, grad_v), (v, u, grad_v, grad_u)):
        for i in range(n):
            cols = [j for j in range(n) if allowed[i][j]]
            logits = {j: sum(q[i][c] * k[j][c] for c in range(d)) / tau for j in cols}
            top = max(logits.values())
            log_norm = top + math.log(sum(math.exp(x - top) for x in logits.values()))
            total += 0.5 * -sum(targets[i][j] * (logits[j] - log_norm) for j in cols) / n
            for j in cols:
                coef = 0.5 * (math.exp(logits[j] - log_norm) - targets[i][j]) / (n * tau)
                for c in range(d):
                    grad_q[i][c] += coef * k[j][c]
                    grad_k[j][c] += coef * q[i][c]
    return total, _np_through_unit_rows(a, u, grad_u), _np_through_unit_rows(b, v, grad_v)


def _np_through_unit_rows(x: np.ndarray, unit: np.ndarray, grad_unit: np.ndarray) -> np.ndarray:
    """Gradient w.r.t. ``x`` of a function of its unit rows, by loops."""
    grad = np.zeros_like(grad_unit)
    for i in range(len(x)):
        norm = math.sqrt(sum(value * value for value in x[i]))
        along = sum(unit[i][c] * grad_unit[i][c] for c in range(len(x[i])))
        for c in range(len(x[i])):
            grad[i][c] = (grad_unit[i][c] - unit[i][c] * along) / norm
    return grad


def _np_infonce(a: np.ndarray, b: np.ndarray, tau: float) -> float:
    return _np_xclr(a, b, tau, _np_one_hot(len(a)))


def _np_one_hot(n: int) -> np.ndarray:
    return np.array([[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)])


def _np_same_batch(batches: list[int]) -> list[list[bool]]:
    return [[c == r for c in batches] for r in batches]


def _np_prior_targets(
    donors: list[int], prior: np.ndarray, tau_graph: float, batches: list[int] | None = None
) -> np.ndarray:
    """Softmax rows of prior / tau_graph over the (same-batch) columns, 0 elsewhere."""
    batches = batches or [0] * len(donors)
    rows = []
    for d, batch in zip(donors, batches, strict=True):
        weights = [math.exp(prior[d][e] / tau_graph) if c == batch else 0.0
                   for e, c in zip(donors, batches, strict=True)]
        rows.append([w / sum(weights) for w in weights])
    return np.array(rows)


def _views(seed: int, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d))
    return a, a + 0.5 * rng.normal(size=(n, d))


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


# --- X-CLR -------------------------------------------------------------------------------


@PROPERTY
@given(seed=seeds, n=batch_sizes, d=dims, tau=taus)
def test_identity_prior_equals_numpy_infonce(seed: int, n: int, d: int, tau: float) -> None:
    a, b = _views(seed, n, d)
    loss = xclr_loss(_t(a), _t(b), tau=tau)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(_np_infonce(a, b, tau), rel=1e-10, abs=1e-12)


@PROPERTY
@given(seed=seeds, n=batch_sizes, n_donors=st.integers(1, 6), d=dims, tau=taus, tau_graph=taus)
def test_prior_equals_numpy_reference(
    seed: int, n: int, n_donors: int, d: int, tau: float, tau_graph: float
) -> None:
    rng = np.random.default_rng(seed)
    a, b = _views(seed, n, d)
    half = rng.uniform(-1, 1, size=(n_donors, n_donors))
    prior = (half + half.T) / 2
    donors = rng.integers(0, n_donors, size=n).tolist()  # repeats allowed
    donor_index = torch.tensor(donors)
    loss = xclr_loss(
        _t(a), _t(b), donor_index=donor_index, prior=_t(prior), tau=tau, tau_graph=tau_graph
    )
    expected = _np_xclr(a, b, tau, _np_prior_targets(donors, prior, tau_graph))
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


@PROPERTY
@given(seed=seeds, n=batch_sizes, m=batch_sizes, tau_graph=taus)
def test_targets_are_distributions(seed: int, n: int, m: int, tau_graph: float) -> None:
    rows = _t(np.random.default_rng(seed).normal(size=(n, m)))
    targets = xclr_targets(rows, tau_graph)
    assert (targets >= 0).all()
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(n, dtype=torch.float64))


@PROPERTY
@given(n=batch_sizes)
def test_targets_of_scaled_identity_are_one_hot(n: int) -> None:
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.equal(xclr_targets(1e3 * eye, tau_graph=0.1), eye)


def test_scaled_identity_prior_approaches_infonce() -> None:
    a, b = _views(0, 6, 4)
    donors = torch.tensor([3, 0, 5, 1, 4, 2])
    infonce = xclr_loss(_t(a), _t(b))
    gaps = [
        abs(xclr_loss(_t(a), _t(b), donor_index=donors, prior=scale * torch.eye(7)) - infonce)
        for scale in (0.5, 1.0, 2.0, 5.0)
    ]
    assert all(later < earlier for earlier, later in itertools.pairwise(gaps))
    assert gaps[-1] < 1e-12


def test_soft_cross_entropy_of_one_hot_is_cross_entropy() -> None:
    logits = torch.randn(5, 4, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 1, 2])
    one_hot = torch.nn.functional.one_hot(labels, 4).double()
    torch.testing.assert_close(
        soft_cross_entropy(logits, one_hot), torch.nn.functional.cross_entropy(logits, labels)
    )


def test_donor_index_without_prior_is_not_used() -> None:
    a, b = _views(1, 4, 3)
    torch.testing.assert_close(
        xclr_loss(_t(a), _t(b), donor_index=torch.tensor([2, 2, 0, 1])), xclr_loss(_t(a), _t(b))
    )


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_loss_dtype(dtype: torch.dtype, expected: torch.dtype) -> None:
    a, b = _views(2, 5, 3)
    z_a, z_b = _t(a).to(dtype), _t(b).to(dtype)
    assert xclr_loss(z_a, z_b).dtype == expected
    donors = torch.arange(5)
    assert VICRegLoss()(z_a, z_b, donors).dtype == expected
    assert BarlowTwinsLoss()(z_a, z_b, donors).dtype == expected


def test_xclr_module_keeps_prior_as_buffer_and_matches_function() -> None:
    a, b = _views(3, 4, 3)
    prior = torch.rand(5, 5, dtype=torch.float64)
    prior = prior + prior.T
    donors = torch.tensor([4, 0, 2, 0])
    module = XCLRLoss(tau=0.3, tau_graph=0.2, prior=prior)
    assert torch.equal(module.state_dict()["prior"], prior)
    expected = xclr_loss(_t(a), _t(b), donor_index=donors, prior=prior, tau=0.3, tau_graph=0.2)
    torch.testing.assert_close(module(_t(a), _t(b), donors), expected)
    torch.testing.assert_close(
        XCLRLoss(tau=0.3)(_t(a), _t(b), donors), xclr_loss(_t(a), _t(b), tau=0.3)
    )


_Z = torch.randn(4, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"z_b": torch.randn(3, 3)}, "same shape"),
        ({"z_a": torch.randn(0, 3), "z_b": torch.randn(0, 3)}, "non-empty"),
        ({"z_a": torch.ones(4, 3, dtype=torch.int64)}, "floating point"),
        ({"tau": 0.0}, "tau must be"),
        ({"tau_graph": float("nan")}, "tau_graph must be"),
        ({"prior": torch.eye(5)}, "needs donor_index"),
        ({"prior": torch.eye(5), "donor_index": torch.tensor([0, 1, 5, 2])}, r"\[0, 5\)"),
        ({"prior": torch.eye(5), "donor_index": torch.tensor([0, -1, 2, 3])}, r"\[0, 5\)"),
        ({"prior": torch.ones(5, 4), "donor_index": torch.arange(4)}, "square"),
        ({"donor_index": torch.arange(4.0)}, "integer tensor"),
        ({"donor_index": torch.arange(3)}, r"shape \(4,\)"),
        ({"negatives": "same_batch"}, "needs batch_index"),
        ({"negatives": "site"}, "negatives must be one of"),
        ({"batch_index": torch.zeros(3, dtype=torch.int64)}, r"batch_index must .* \(4,\)"),
        ({"batch_index": torch.zeros(4), "negatives": "same_batch"}, "integer tensor"),
    ],
)
def test_xclr_rejects_bad_input(kwargs: dict, message: str) -> None:
    args = {"z_a": _Z, "z_b": _Z} | kwargs
    with pytest.raises(InputError, match=message):
        xclr_loss(args.pop("z_a"), args.pop("z_b"), **args)


def test_xclr_module_rejects_bad_settings() -> None:
    with pytest.raises(InputError, match="tau must be"):
        XCLRLoss(tau=-1.0)
    with pytest.raises(InputError, match="square"):
        XCLRLoss(prior=torch.ones(3))


def test_gathers_are_identity_without_process_group() -> None:
    assert rank_and_world_size() == (0, 1)
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    ids = torch.arange(3)
    assert gather_no_grad(ids) is ids


# --- X-CLR with negatives from the anchor's batch -------------------------------------------


def _same_batch_case(
    seed: int, n: int, d: int, n_batches: int, with_prior: bool, tau_graph: float
) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray, list]:
    """Views, xclr_loss keywords, loop targets and allowed columns of a random batch."""
    rng = np.random.default_rng(seed)
    a, b = _views(seed, n, d)
    donors = rng.integers(0, 4, size=n).tolist()  # repeats likely
    batches = rng.integers(0, n_batches, size=n).tolist()  # singleton batches likely
    kwargs = {"donor_index": torch.tensor(donors), "batch_index": torch.tensor(batches),
              "tau_graph": tau_graph}
    targets = _np_one_hot(n)
    if with_prior:
        half = rng.uniform(-1, 1, size=(4, 4))
        prior = (half + half.T) / 2
        kwargs["prior"] = _t(prior)
        targets = _np_prior_targets(donors, prior, tau_graph, batches)
    return a, b, kwargs, targets, _np_same_batch(batches)


def _loss_and_view_grads(a: np.ndarray, b: np.ndarray, **kwargs: object) -> tuple:
    z_a, z_b = _t(a).requires_grad_(True), _t(b).requires_grad_(True)
    loss = xclr_loss(z_a, z_b, **kwargs)
    loss.backward()
    return loss.item(), z_a.grad, z_b.grad


@PROPERTY
@given(seed=seeds, n=batch_sizes, d=st.integers(2, 5), n_batches=st.integers(1, 4), tau=taus,
       tau_graph=taus, with_prior=st.booleans(), negatives=st.sampled_from(["all", "same_batch"]))
def test_loss_and_gradients_equal_loop_reference(
    seed: int, n: int, d: int, n_batches: int, tau: float, tau_graph: float, with_prior: bool,
    negatives: str,
) -> None:
    a, b, kwargs, targets, allowed = _same_batch_case(seed, n, d, n_batches, with_prior,
                                                      tau_graph)
    if negatives == "all":
        donors = kwargs["donor_index"].tolist()
        targets = _np_prior_targets(donors, kwargs["prior"].numpy(), tau_graph) if with_prior \
            else _np_one_hot(n)
        allowed = None
    loss, grad_a, grad_b = _loss_and_view_grads(a, b, tau=tau, negatives=negatives, **kwargs)
    expected, expected_a, expected_b = _loop_xclr(a, b, tau, targets, allowed)
    assert loss == pytest.approx(expected, rel=1e-10, abs=1e-12)
    torch.testing.assert_close(grad_a, _t(expected_a), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_b, _t(expected_b), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("with_prior", [False, True], ids=["identity", "prior"])
def test_same_batch_donor_alone_in_its_batch_keeps_its_positive(with_prior: bool) -> None:
    a, b = _views(5, 5, 3)
    donors, batches = [3, 1, 0, 1, 2], [0, 0, 1, 0, 0]  # donor 0 alone in batch 1; donor 1 twice
    prior = np.exp(-np.abs(np.subtract.outer(np.arange(4.0), np.arange(4.0))))
    kwargs = {"donor_index": torch.tensor(donors), "batch_index": torch.tensor(batches),
              "tau": 0.2, "tau_graph": 0.5, "negatives": "same_batch"}
    targets = _np_one_hot(5)
    if with_prior:
        kwargs["prior"] = _t(prior)
        targets = _np_prior_targets(donors, prior, 0.5, batches)
    loss, grad_a, grad_b = _loss_and_view_grads(a, b, **kwargs)
    expected, expected_a, expected_b = _loop_xclr(a, b, 0.2, targets, _np_same_batch(batches))
    assert math.isfinite(loss)
    assert loss == pytest.approx(expected, rel=1e-10)
    torch.testing.assert_close(grad_a, _t(expected_a), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_b, _t(expected_b), rtol=1e-9, atol=1e-12)
    assert torch.equal(grad_a[2], torch.zeros(3, dtype=torch.float64))  # nothing to contrast


def test_same_batch_with_every_donor_alone_is_zero_and_one_batch_is_all() -> None:
    a, b = _views(6, 4, 3)
    alone = xclr_loss(_t(a), _t(b), batch_index=torch.arange(4), negatives="same_batch")
    assert alone.item() == 0.0
    one = xclr_loss(_t(a), _t(b), batch_index=torch.full((4,), 7), negatives="same_batch")
    torch.testing.assert_close(one, xclr_loss(_t(a), _t(b)))


def test_same_batch_terms() -> None:
    mask = same_batch_mask(torch.tensor([0, 1]), torch.tensor([1, 0, 0]))
    assert mask.tolist() == [[False, True, True], [True, False, False]]
    targets = xclr_targets(torch.zeros(2, 3, dtype=torch.float64), 0.1, mask)
    assert targets.tolist() == [[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 9.0, -9.0]], dtype=torch.float64)
    expected = math.log(2) / 2  # row 0: uniform over 2 equal logits; row 1: one column
    assert soft_cross_entropy(logits, targets, mask).item() == pytest.approx(expected)


def test_xclr_module_same_batch_matches_function_without_per_step_range_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = _views(7, 4, 3)
    prior = torch.rand(5, 5, dtype=torch.float64)
    donors, batches = torch.tensor([4, 0, 2, 0]), torch.tensor([1, 1, 0, 1])
    expected = xclr_loss(_t(a), _t(b), donor_index=donors, prior=prior, batch_index=batches,
                         negatives="same_batch")
    module = XCLRLoss(prior=prior, negatives="same_batch")

    def sync(*args: object) -> None:
        raise AssertionError("the module checked the donor range (a host sync) in forward")

    monkeypatch.setattr(xclr_module, "_check_donors_in_prior", sync)
    torch.testing.assert_close(module(_t(a), _t(b), donors, batches), expected)
    with pytest.raises(InputError, match="needs batch_index"):
        module(_t(a), _t(b), donors)
    with pytest.raises(AssertionError, match="host sync"):
        xclr_loss(_t(a), _t(b), donor_index=donors, prior=prior)  # the function checks


# --- VICReg and Barlow Twins -----------------------------------------------------------------


def _np_vicreg_terms(a: np.ndarray, b: np.ndarray, eps: float) -> tuple[float, float, float]:
    n, d = a.shape
    invariance = sum((a[i][k] - b[i][k]) ** 2 for i in range(n) for k in range(d)) / (n * d)

    def variance(z: np.ndarray) -> float:
        return sum(max(0.0, 1 - math.sqrt(np.var(z[:, k], ddof=1) + eps)) for k in range(d)) / d

    def covariance(z: np.ndarray) -> float:
        cov = np.cov(z, rowvar=False).reshape(d, d)
        return sum(cov[k][m] ** 2 for k in range(d) for m in range(d) if k != m) / d

    return invariance, (variance(a) + variance(b)) / 2, covariance(a) + covariance(b)


@PROPERTY
@given(seed=seeds, n=st.integers(2, 8), d=dims)
def test_vicreg_equals_numpy_reference(seed: int, n: int, d: int) -> None:
    a, b = _views(seed, n, d)
    a, b = 0.4 * a, 0.4 * b  # small spread: some variance hinges are active
    invariance, variance, covariance = _np_vicreg_terms(a, b, eps=1e-4)
    assert vicreg_invariance(_t(a), _t(b)).item() == pytest.approx(invariance, rel=1e-10)
    var = (vicreg_variance(_t(a)) + vicreg_variance(_t(b))).item() / 2
    assert var == pytest.approx(variance, rel=1e-10, abs=1e-14)
    cov = (vicreg_covariance(_t(a)) + vicreg_covariance(_t(b))).item()
    assert cov == pytest.approx(covariance, rel=1e-10, abs=1e-14)
    expected = 25 * invariance + 25 * variance + covariance
    donors = torch.arange(n)
    assert VICRegLoss()(_t(a), _t(b), donors).item() == pytest.approx(expected, rel=1e-10)
    weighted = VICRegLoss(lambda_=1.0, mu=2.0, nu=3.0)(_t(a), _t(b), donors).item()
    assert weighted == pytest.approx(invariance + 2 * variance + 3 * covariance, rel=1e-10)


def _np_barlow_correlation(a: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    n, d = a.shape
    sa = [(a[:, k] - a[:, k].mean()) / math.sqrt(np.var(a[:, k]) + eps) for k in range(d)]
    sb = [(b[:, k] - b[:, k].mean()) / math.sqrt(np.var(b[:, k]) + eps) for k in range(d)]
    return np.array(
        [[sum(sa[k][i] * sb[m][i] for i in range(n)) / n for m in range(d)] for k in range(d)]
    )


@PROPERTY
@given(seed=seeds, n=st.integers(2, 8), d=dims)
def test_barlow_equals_numpy_reference(seed: int, n: int, d: int) -> None:
    a, b = _views(seed, n, d)
    c = _np_barlow_correlation(a, b, eps=1e-5)
    invariance = sum((1 - c[k][k]) ** 2 for k in range(d))
    redundancy = sum(c[k][m] ** 2 for k in range(d) for m in range(d) if k != m)
    c_torch = barlow_cross_correlation(_t(a), _t(b))
    torch.testing.assert_close(c_torch, _t(c), rtol=1e-10, atol=1e-12)
    assert barlow_invariance(c_torch).item() == pytest.approx(invariance, rel=1e-9, abs=1e-12)
    assert barlow_redundancy(c_torch).item() == pytest.approx(redundancy, rel=1e-9, abs=1e-12)
    expected = invariance + 5e-3 * redundancy
    loss = BarlowTwinsLoss()(_t(a), _t(b), torch.arange(n)).item()
    assert loss == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("loss", [VICRegLoss(), BarlowTwinsLoss()], ids=["vicreg", "barlow"])
def test_pairwise_losses_reject_bad_input(loss: torch.nn.Module) -> None:
    with pytest.raises(InputError, match="at least 2 rows"):
        loss(torch.randn(1, 3), torch.randn(1, 3), torch.arange(1))
    with pytest.raises(InputError, match="same shape"):
        loss(torch.randn(4, 3), torch.randn(4, 2), torch.arange(4))


def test_pairwise_losses_reject_bad_weights() -> None:
    with pytest.raises(InputError, match="mu"):
        VICRegLoss(mu=-1.0)
    with pytest.raises(InputError, match="lambda_"):
        BarlowTwinsLoss(lambda_=float("inf"))


# --- the objectives' registry and configs ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", XCLRConfig(tau=0.5, tau_graph=0.1, prior="gloscope", negatives="all")),
        ("loss: {kind: xclr, tau: 0.1, prior: gloscope}", XCLRConfig(tau=0.1, prior="gloscope")),
        ("loss: {prior: pseudobulk, tau_graph: 0.2}",
         XCLRConfig(prior="pseudobulk", tau_graph=0.2)),
        ("loss: {kind: xclr, negatives: same_batch}", XCLRConfig(negatives="same_batch")),
        ("loss: {kind: vicreg}", VICRegConfig()),
        ("loss: {kind: vicreg, lambda_: 10, nu: 2}", VICRegConfig(lambda_=10.0, nu=2.0)),
        ("loss: {kind: barlow, lambda_: 0.01}", BarlowConfig(lambda_=0.01)),
    ],
)
def test_loss_config_from_yaml(text: str, expected: ObjectiveConfig, tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(text)
    config = TrainConfig.from_yaml(path)
    assert config.loss == expected
    assert type(config.loss) is type(expected)
    assert TrainConfig.model_validate(config.model_dump(mode="json")) == config


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        ({"kind": "vicreg", "prior": "gloscope"},
         r"loss\.prior: not a setting of loss kind 'vicreg' \(a setting of xclr only\)"),
        ({"kind": "barlow", "mu": 1.0}, r"loss\.mu: .*a setting of vicreg only"),
        ({"kind": "xclr", "tua": 1.0}, r"loss\.tua: .*nor of any loss kind.*'tau_graph'"),
        ({"kind": "simclr"}, "does not match any of the expected tags: 'xclr', 'vicreg'"),
        ({"tau": 0.0}, r"loss\.tau: Input should be greater than 0"),
        ({"tau_graph": float("inf")}, r"loss\.tau_graph: Input should be a finite number"),
        ({"tau": float("nan")}, r"loss\.tau: Input should be a finite number"),
        ({"negatives": "site"}, r"loss\.negatives: Input should be 'all' or 'same_batch'"),
        ({"kind": "vicreg", "mu": -1.0}, r"loss\.mu: Input should be greater than or equal"),
        ({"kind": "barlow", "eps": float("inf")}, r"loss\.eps: Input should be a finite"),
    ],
)
def test_loss_config_refuses_bad_settings(loss: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        TrainConfig.from_mapping({"loss": loss})


@pytest.mark.parametrize(
    ("config", "module"),
    [(XCLRConfig(), XCLRLoss), (VICRegConfig(), VICRegLoss), (BarlowConfig(), BarlowTwinsLoss)],
)
def test_config_defaults_are_the_modules_defaults(
    config: ObjectiveConfig, module: type[torch.nn.Module]
) -> None:
    defaults = {name: p.default for name, p in inspect.signature(module).parameters.items()}
    settings = config.model_dump(exclude={"kind", "prior"})
    assert settings == {name: defaults[name] for name in settings}


def test_build_objective_passes_the_settings() -> None:
    prior = torch.eye(3, dtype=torch.float64)
    xclr = build_objective(XCLRConfig(tau=0.3, tau_graph=0.4, prior="gloscope",
                                      negatives="same_batch"), prior)
    assert isinstance(xclr, XCLRLoss)
    assert (xclr.tau, xclr.tau_graph, xclr.negatives) == (0.3, 0.4, "same_batch")
    assert torch.equal(xclr.prior, prior)
    vicreg = build_objective(VICRegConfig(lambda_=1.0, mu=2.0, nu=3.0, eps=0.5))
    assert (vicreg.lambda_, vicreg.mu, vicreg.nu, vicreg.eps) == (1.0, 2.0, 3.0, 0.5)
    barlow = build_objective(BarlowConfig(lambda_=0.1, eps=0.2))
    assert (barlow.lambda_, barlow.eps) == (0.1, 0.2)
    with pytest.raises(InputError, match="names prior 'gloscope' but was given no prior"):
        build_objective(XCLRConfig(prior="gloscope"))
    with pytest.raises(InputError, match="names prior None but was given a prior"):
        build_objective(VICRegConfig(), prior)


def test_every_objective_config_has_its_loss_module() -> None:
    # the union a TrainConfig reads and the builders are one set: none silently absent
    assert set(OBJECTIVES) == set(LOSS_CONFIGS)


@pytest.mark.parametrize("config_class", LOSS_CONFIGS)
def test_every_objective_takes_the_same_call(config_class: type) -> None:
    config = config_class()
    prior = None if config.store_prior is None else torch.eye(4) * 0.5 + 0.5  # X-CLR's default
    loss = build_objective(config, prior)
    a, b = _views(8, 4, 3)
    donors, batches = torch.tensor([0, 3, 1, 3]), torch.tensor([0, 0, 1, 1])
    with_batches = loss(_t(a), _t(b), donors, batches)
    assert with_batches.ndim == 0 and torch.isfinite(with_batches)
    torch.testing.assert_close(loss(_t(a), _t(b), donors), with_batches)


def test_reading_a_config_does_not_import_torch() -> None:
    code = ("import sys; from sampleclr_scale.config import TrainConfig; "
            "TrainConfig.from_mapping({'loss': {'kind': 'vicreg'}}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- task losses ------------------------------------------------------------------------------


def test_classification_loss_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]], requires_grad=True)
    labels = torch.tensor([0, -1, 2])
    expected = (math.log(1 + 2 * math.exp(-2)) + math.log(3)) / 2
    loss = classification_loss(logits, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.equal(logits.grad[1], torch.zeros(3))  # the unlabelled row gets no gradient


def _loop_batch_adversary(logits_a: np.ndarray, logits_b: np.ndarray, codes: list[int]
                          ) -> tuple[float, np.ndarray, np.ndarray]:
    """The batch adversary's loss and its gradients w.r.t. both views' logits, by loops:
    ``-log softmax(row)[code]`` averaged over the rows and the two views, whose gradient
    is ``(softmax(row) - one_hot(code)) / (2 n)``."""
    n = len(codes)
    total, grads = 0.0, []
    for logits in (logits_a, logits_b):
        grad = np.zeros_like(logits)
        for i, code in enumerate(codes):
            top = max(logits[i])
            norm = sum(math.exp(x - top) for x in logits[i])
            total += -(logits[i][code] - top - math.log(norm)) / (2 * n)
            for j, x in enumerate(logits[i]):
                grad[i][j] = (math.exp(x - top) / norm - (j == code)) / (2 * n)
        grads.append(grad)
    return total, grads[0], grads[1]


def test_batch_adversary_loss_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(3)
    logits_a = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    logits_b = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    codes = [0, 3, 1, 1, 2, 0]
    loss = batch_adversary_loss(logits_a, logits_b, torch.tensor(codes))
    loss.backward()
    expected, grad_a, grad_b = _loop_batch_adversary(
        logits_a.detach().numpy(), logits_b.detach().numpy(), codes)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(logits_a.grad.numpy(), grad_a, rtol=0, atol=1e-12)
    np.testing.assert_allclose(logits_b.grad.numpy(), grad_b, rtol=0, atol=1e-12)


def test_ordinal_loss_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, -1.0], [3.0, 3.0]], dtype=torch.float64)
    labels = torch.tensor([1, 2, -1])
    row_0 = 2 * math.log(2)  # targets (1, 0) at logits (0, 0)
    row_1 = math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))  # targets (1, 1)
    assert ordinal_loss(logits, labels).item() == pytest.approx((row_0 + row_1) / 2, rel=1e-12)


def test_ordinal_predict_counts_positive_logits() -> None:
    logits = torch.tensor([[1.0, 1.0, -1.0], [-1.0, -2.0, -3.0], [3.0, 2.0, 1.0]])
    assert ordinal_predict(logits).tolist() == [2, 0, 3]


def test_regression_loss_standardises_and_skips_nan() -> None:
    predictions = torch.tensor([[0.5], [1.0], [0.0]], dtype=torch.float64)
    targets = torch.tensor([4.0, math.nan, 2.0], dtype=torch.float64)
    # standardised targets (1, -, 0): squared errors 0.25 and 0
    assert regression_loss(predictions, targets, mean=2.0, std=2.0).item() == pytest.approx(0.125)


@pytest.mark.parametrize(
    ("loss_fn", "predictions", "labels", "missing"),
    [
        (classification_loss, torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0]), -1),
        (ordinal_loss, torch.randn(5, 3), torch.tensor([0, 3, 1, 2, 2]), -1),
        (regression_loss, torch.randn(5), torch.randn(5), math.nan),
    ],
    ids=["classification", "ordinal", "regression"],
)
def test_missing_labels_are_skipped(
    loss_fn: Callable[[Tensor, Tensor], Tensor], predictions: Tensor, labels: Tensor, missing: float
) -> None:
    keep = torch.tensor([True, False, True, False, True])
    masked = labels.clone()
    masked[~keep] = missing
    torch.testing.assert_close(
        loss_fn(predictions, masked), loss_fn(predictions[keep], labels[keep])
    )

    predictions = predictions.clone().requires_grad_(True)
    nothing = torch.full_like(labels, missing)
    loss = loss_fn(predictions, nothing)
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.equal(predictions.grad, torch.zeros_like(predictions))


def test_task_loss_weighted_sum() -> None:
    predictions = {
        "disease": torch.randn(4, 3, dtype=torch.float64),
        "severity": torch.randn(4, 2, dtype=torch.float64),
        "age": torch.randn(4, 1, dtype=torch.float64),
        "unused_head": torch.randn(4, 7),
    }
    labels = {
        "disease": torch.tensor([0, 2, -1, 1]),
        "severity": torch.tensor([-1, -1, -1, -1]),
        "age": torch.tensor([30.0, 50.0, math.nan, 70.0], dtype=torch.float64),
    }
    tasks = {
        "disease": ("classification", 1.0),
        "severity": ("ordinal", 0.5),
        "age": ("regression", 2.0),
    }
    total, per_task = TaskLoss(tasks, target_stats={"age": (50.0, 20.0)})(predictions, labels)
    expected = {
        "disease": classification_loss(predictions["disease"], labels["disease"]),
        "severity": ordinal_loss(predictions["severity"], labels["severity"]),
        "age": regression_loss(predictions["age"], labels["age"], mean=50.0, std=20.0),
    }
    assert per_task.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(per_task[name], expected[name])
    torch.testing.assert_close(total, expected["disease"] + 2 * expected["age"])


@pytest.mark.parametrize(
    ("tasks", "stats", "message"),
    [
        ({}, None, "at least one task"),
        ({"a": ("survival", 1.0)}, None, "unknown kind"),
        ({"a": ("classification", -1.0)}, None, "weight"),
        ({"a": ("classification", 1.0)}, {"a": (0.0, 1.0)}, "not regression"),
    ],
)
def test_task_loss_rejects_bad_specs(tasks: dict, stats: dict | None, message: str) -> None:
    with pytest.raises(InputError, match=message):
        TaskLoss(tasks, target_stats=stats)


def test_task_loss_rejects_missing_task() -> None:
    loss = TaskLoss({"a": ("classification", 1.0), "b": ("regression", 1.0)})
    with pytest.raises(InputError, match=r"\['b'\]"):
        loss({"a": torch.randn(2, 3), "b": torch.randn(2)}, {"a": torch.tensor([0, 1])})


@pytest.mark.parametrize(
    ("loss_fn", "predictions", "labels", "message"),
    [
        (classification_loss, torch.randn(3, 4), torch.tensor([0, 4, 1]), r"0\.\.3"),
        (classification_loss, torch.randn(3, 4), torch.tensor([0, -2, 1]), r"0\.\.3"),
        (ordinal_loss, torch.randn(3, 2), torch.tensor([0, 3, 1]), r"0\.\.2"),
        (classification_loss, torch.randn(3, 4), torch.tensor([0.0, 1.0, 2.0]), "integer"),
        (ordinal_loss, torch.randn(3, 2), torch.tensor([0, 1]), r"\[b\]"),
        (regression_loss, torch.randn(3, 2), torch.randn(3), r"\[b, 1\]"),
        (regression_loss, torch.randn(3), torch.tensor([1, 2, 3]), "floating point"),
    ],
)
def test_task_losses_reject_bad_labels(
    loss_fn: Callable[[Tensor, Tensor], Tensor], predictions: Tensor, labels: Tensor, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        loss_fn(predictions, labels)


def test_regression_rejects_bad_std() -> None:
    with pytest.raises(InputError, match="std"):
        regression_loss(torch.randn(3), torch.randn(3), std=0.0)
