"""The composition channel against plain formulas, and the store's per-donor type counts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sampleclr_scale.errors import InputError
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.composition import (
    PSEUDOCOUNT,
    LearnedReference,
    center_per_batch,
    channel_features,
    clr,
    clr_counting_variance,
    composition_channel,
    composition_features,
    donor_composition,
    donor_type_counts,
    learned_reference,
    shrink_to_batch_means,
)


def test_clr_and_centring_match_plain_formulas() -> None:
    counts = np.array([[10, 0, 5], [1, 1, 1], [0, 0, 7]])
    for row, got in zip(counts, clr(counts), strict=True):
        logs = [math.log(c + PSEUDOCOUNT) for c in row]
        np.testing.assert_allclose(got, [v - sum(logs) / 3 for v in logs])
    X = np.arange(12, dtype=float).reshape(4, 3)
    batch = np.array([5, 2, 5, 2])
    expected = X.copy()
    for b in (2, 5):
        expected[batch == b] -= X[batch == b].mean(0)
    np.testing.assert_allclose(center_per_batch(X, batch), expected)


def plain_channel(counts: np.ndarray, batch: np.ndarray | None) -> np.ndarray:
    """The channel's composition by plain loops: each donor's CLR; its counting-noise
    variance ``v_k (1 - 2/K) + sum_j v_j / K^2`` with ``v = 1 / (count + a)``; each type's
    spread beyond the noise over the donors' deviations from their batch's mean (N - S
    degrees of freedom), floored at 0; each deviation times ``spread / (spread + v)``
    (plus the batch's mean without batches); centred per batch; scaled to rms norm 1."""
    n, k = counts.shape
    rows, noise = [], []
    for row in counts.tolist():
        logs = [math.log(c + PSEUDOCOUNT) for c in row]
        rows.append([v - sum(logs) / k for v in logs])
        v = [1 / (c + PSEUDOCOUNT) for c in row]
        noise.append([x * (1 - 2 / k) + sum(v) / k**2 for x in v])
    groups = [0] * n if batch is None else [int(b) for b in batch]
    members = {g: [i for i in range(n) if groups[i] == g] for g in set(groups)}
    means = {g: [sum(rows[i][j] for i in m) / len(m) for j in range(k)]
             for g, m in members.items()}
    dev = [[rows[i][j] - means[groups[i]][j] for j in range(k)] for i in range(n)]
    spread = [max(sum(dev[i][j] ** 2 for i in range(n)) / (n - len(members))
                  - sum(noise[i][j] for i in range(n)) / n, 0.0) for j in range(k)]
    shrunk = [[dev[i][j] * spread[j] / (spread[j] + noise[i][j])
               + (means[groups[i]][j] if batch is None else 0.0) for j in range(k)]
              for i in range(n)]
    if batch is not None:
        shrunk = [[shrunk[i][j] - sum(shrunk[m][j] for m in members[groups[i]])
                   / len(members[groups[i]]) for j in range(k)] for i in range(n)]
    rms = math.sqrt(sum(x * x for row in shrunk for x in row) / n)
    return np.array(shrunk) / rms


def test_composition_channel_is_unit_z_next_to_the_scaled_shrunk_clr() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 4))
    counts = rng.integers(0, 50, (6, 3))
    batch = np.array([0, 1, 0, 1, 1, 0])
    out = composition_channel(z, counts, batch, 0.5)
    assert out.shape == (6, 7) and out.dtype == np.float32
    for i in range(6):
        np.testing.assert_allclose(out[i, :4], z[i] / np.linalg.norm(z[i]), rtol=1e-6)
    np.testing.assert_allclose(out[:, 4:], 0.5 * plain_channel(counts, batch), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(np.mean(np.sum(out[:, 4:] ** 2, axis=1)), 0.25, rtol=1e-5)
    for b in (0, 1):  # centred per batch
        np.testing.assert_allclose(out[batch == b, 4:].mean(0), 0.0, atol=1e-6)
    # without batches the CLR is shrunk toward the donors' mean, not centred
    plain = composition_channel(z, counts, None, 1.0)
    np.testing.assert_allclose(plain[:, 4:], plain_channel(counts, None), rtol=1e-5,
                               atol=1e-6)
    assert np.abs(plain[:, 4:].mean(0)).max() > 0.1


def test_counting_variance_and_shrinkage_match_plain_loops() -> None:
    counts = np.array([[10, 0, 5, 2], [1, 1, 1, 40], [0, 0, 7, 3], [30, 2, 2, 2],
                       [4, 9, 0, 11]])
    variance = clr_counting_variance(counts)
    for row, got in zip(counts.tolist(), variance, strict=True):
        v = [1 / (c + PSEUDOCOUNT) for c in row]
        np.testing.assert_allclose(got, [x / 2 + sum(v) / 16 for x in v])  # K = 4
    batch = np.array([3, 1, 3, 1, 3])
    for groups in (batch, None):
        expected = plain_channel(counts, groups)
        got = channel_features(counts, groups)
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    # no batch with two donors: nothing to estimate a spread from, the rows come back
    X = np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(shrink_to_batch_means(X, np.ones((3, 2)),
                                                        np.array([0, 1, 2])), X)


def test_shrinkage_brings_each_donor_nearer_its_true_composition() -> None:
    # type 0's share varies between donors, the others' only through the log-ratio's
    # centring; donors of 40 to 4,000 cells. A type whose spread is mostly the counting
    # shrinks most of the way to the mean, type 0 hardly; a large donor keeps more of its
    # deviations than a small one; and the shrunk log-ratios are nearer the true ones
    rng = np.random.default_rng(4)
    n_donors = 400
    logits = np.tile(np.log([0.3, 0.3, 0.2, 0.1, 0.06, 0.04]), (n_donors, 1))
    logits[:, 0] += rng.normal(0.0, 0.6, n_donors)
    truth = logits - logits.mean(axis=1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    cells = np.exp(rng.uniform(np.log(40), np.log(4000), n_donors)).astype(int)
    counts = np.stack([rng.multinomial(c, q) for c, q in zip(cells, p, strict=True)])
    raw = clr(counts)
    shrunk = shrink_to_batch_means(raw, clr_counting_variance(counts), None)
    kept = (shrunk - raw.mean(0)) / (raw - raw.mean(0))  # the share of each deviation kept
    assert np.all(kept > 0) and np.all(kept <= 1)
    assert np.median(kept[:, 0]) > 0.9 and np.all(np.median(kept[:, 3:5], axis=0) < 0.1)
    small, large = cells < 200, cells > 2000
    assert np.all(np.median(kept[large], axis=0) > np.median(kept[small], axis=0))
    # the pseudocount biases a rare type's log-ratio: compare deviations from the mean
    err = {name: np.mean(((x - x.mean(0)) - (truth - truth.mean(0))) ** 2, axis=0)
           for name, x in (("raw", raw), ("shrunk", shrunk))}
    assert err["shrunk"].sum() < 0.5 * err["raw"].sum()
    assert err["shrunk"][0] <= err["raw"][0]


def _plain_reference(z: np.ndarray) -> tuple[list[float], float]:
    """The mean of the unit rows and their root-mean-square distance from it: a loop."""
    rows = [[x / math.sqrt(sum(v * v for v in r)) for x in r] for r in z.tolist()]
    mean = [sum(r[j] for r in rows) / len(rows) for j in range(len(rows[0]))]
    sq = [sum((x - m) ** 2 for x, m in zip(r, mean, strict=True)) for r in rows]
    return mean, math.sqrt(sum(sq) / len(rows))


def test_learned_reference_matches_a_plain_loop_and_round_trips() -> None:
    z = np.random.default_rng(2).normal(size=(9, 5))
    reference = learned_reference(z)
    mean, rms = _plain_reference(z)
    np.testing.assert_allclose(reference.mean, mean, rtol=1e-12)
    assert reference.rms == pytest.approx(rms, rel=1e-12)
    again = LearnedReference.from_record(reference.record())
    np.testing.assert_array_equal(again.mean, reference.mean)
    assert again.rms == reference.rms
    with pytest.raises(ValueError, match="do not spread"):
        learned_reference(np.tile(z[:1], (4, 1)) * [[1.0], [2.0], [3.0], [4.0]])


def test_the_channel_standardises_the_learned_block_by_the_reference() -> None:
    rng = np.random.default_rng(3)
    z, counts = rng.normal(size=(7, 4)), rng.integers(0, 40, (7, 3))
    batch = np.array([0, 0, 1, 1, 1, 0, 1])
    reference = learned_reference(rng.normal(size=(20, 4)))  # other donors': the model's
    out = composition_channel(z, counts, batch, 1.75, reference)
    for i in range(7):
        unit = z[i] / np.linalg.norm(z[i])
        np.testing.assert_allclose(out[i, :4], (unit - reference.mean) / reference.rms,
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[:, 4:], composition_channel(z, counts, batch, 1.75)[:, 4:])
    # a single donor keeps its learned block (it is not centred on itself)
    one = composition_channel(z[:1], counts[:1], None, 1.75, reference)
    np.testing.assert_allclose(one[0, :4], out[0, :4], rtol=1e-6)
    assert np.linalg.norm(one[0, :4]) > 0.1


def test_a_narrow_cone_of_donors_weighs_as_much_as_a_spread_one() -> None:
    # donors packed around one direction (as X-CLR's prior leaves them), standardised by
    # their own reference, get a learned block of rms norm 1 like donors spread over the
    # sphere; as unit vectors they barely move next to the channel
    rng = np.random.default_rng(1)
    pattern = rng.normal(size=(10, 6))
    counts = rng.integers(0, 30, size=(10, 3))
    for z in (pattern, 0.05 * pattern + np.eye(6)[0] * 10):
        block = composition_channel(z, counts, None, 1.0, learned_reference(z))[:, :6]
        assert np.sqrt(np.mean(np.sum(block ** 2, axis=1))) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(block.mean(axis=0), 0.0, atol=1e-6)
    unit = composition_channel(0.05 * pattern + np.eye(6)[0] * 10, counts, None, 1.0)[:, :6]
    assert np.mean(np.linalg.norm(unit - unit.mean(0), axis=1)) < 0.05


def test_donor_type_counts_match_the_codes(store_path) -> None:
    store = BagStore(store_path)
    codes = np.asarray(store.codes("cell_type")[:])
    counts = donor_type_counts(store, "cell_type", block_rows=97)
    K = len(store.category_counts("cell_type"))
    for d in range(store.n_donors):
        own = codes[store.donor_ptr[d]:store.donor_ptr[d + 1]]
        assert counts[d].tolist() == [int((own == k).sum()) for k in range(K)]


def test_donor_composition_matches_the_model_categories_by_name(batch_store) -> None:
    """Another cohort's store, its cell types in another order, one of the model's
    missing and one of its own unknown to the model."""
    store = BagStore(batch_store)
    own = store.categories("cell_type")
    counts = donor_type_counts(store, "cell_type")
    model = [own[2], "mast cell", own[0], own[1]]  # own[3:] not read by the model
    got = donor_composition(store, model)
    aligned = np.stack([counts[:, 2], np.zeros(store.n_donors, int), counts[:, 0],
                        counts[:, 1]], axis=1)
    assert got.dtype == np.float32 and got.shape == (store.n_donors, 4)
    np.testing.assert_allclose(got, composition_features(aligned, store.donor_batch),
                               rtol=1e-6, atol=1e-6)
    # centred per batch: each batch's donors average zero
    for b in np.unique(store.donor_batch):
        np.testing.assert_allclose(got[store.donor_batch == b].mean(0), 0, atol=1e-5)
    with pytest.raises(InputError, match="none of the model's 2 cell types"):
        donor_composition(store, ["mast cell", "erythrocyte"])
