"""What a model saves for its composition channel: where its training donors' vectors
lie (the learned reference) and the channel weight its prior chooses.

When a run's learned block is standardised next to the composition channel
(``TrainConfig.learned_block``), ``embed`` maps every donor's unit vector ``u`` to ``(u -
m) / s``, with ``m`` the mean of the training donors' unit vectors and ``s`` their root
mean square distance from it (:class:`~sampleclr_scale.store.composition.LearnedReference`).
Those two numbers belong to the model, not to the store being embedded: computed from the
embedded store's own donors, a store of one donor (a query for ``search``) would lose its
learned block, and a small cohort would be scaled by its own spread, not the atlas's.
So the run computes them once, after training, by embedding its training donors the way
``embed`` does by default (:func:`~sampleclr_scale.embed.worker.embed_donors` with
:class:`~sampleclr_scale.embed.config.EmbedConfig`'s defaults), and saves them in
``model.pt``.

With ``composition_channel: auto`` the same pass estimates the channel's weight: the one
by which the embedding of those donors best follows the loss's prior
(:mod:`~sampleclr_scale.store.channel_weight`), saved with the model too; two more passes,
each from one of two disjoint halves of every donor's cells, measure how much of the
learned block is the donor rather than the cells drawn (its split-half reliability), which
the fit weighs the learned block by.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from sampleclr_scale._linalg import unit_rows
from sampleclr_scale.config import TrainConfig
from sampleclr_scale.embed.config import EmbedConfig
from sampleclr_scale.embed.worker import embed_donors
from sampleclr_scale.loading.loader import resolve_balance
from sampleclr_scale.model import ModelConfig, SampleCLR
from sampleclr_scale.prior.build import neighbour_pairs
from sampleclr_scale.prior.storage import load_prior
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.channel_weight import (
    NEIGHBOURS,
    WEIGHT_BOUNDS,
    ChannelWeight,
    fit_channel_weight,
    split_half_reliability,
)
from sampleclr_scale.store.composition import (
    COMPOSITION_COLUMN,
    LearnedReference,
    channel_features,
    donor_type_counts,
    learned_block,
    learned_reference,
)
from sampleclr_scale.train import setup

log = logging.getLogger(__name__)

MAX_REFERENCE_DONORS = 4096
"""Most training donors embedded for the reference (evenly spaced over the training
split): the mean and spread of 4,096 unit vectors are known to about 1.5 % of the spread.
Measured on one CPU thread: the ``mixed`` cohort's 160 training donors (1,000 cells each,
small preset) in 1.0 s, so about 26 s at 4,096, per pass: three passes where the weight
is fitted (the reference's and the two halves' of the split-half reliability)."""


class ChannelFit(NamedTuple):
    """What a run saves for ``embed``'s composition channel, fitted to its training donors."""

    reference: LearnedReference | None
    """The learned reference (None: ``embed`` keeps unit vectors)."""
    weight: ChannelWeight | None
    """The weight chosen by the prior (None: the run's fixed weight,
    :func:`~sampleclr_scale.train.setup.channel_weight`)."""


def fit_channel(store: BagStore, config: TrainConfig, model_config: ModelConfig,
                weights: dict[str, torch.Tensor]) -> ChannelFit:
    """The learned reference of a trained model on its training donors (where the run's
    learned block is standardised, :func:`~sampleclr_scale.train.setup
    .standardises_learned`), and the channel weight its loss's prior chooses (where the
    run has ``composition_channel: auto`` and a prior,
    :func:`~sampleclr_scale.train.setup.chooses_channel_weight`); both from one pass of
    ``embed``'s defaults over the training donors, the weight's split-half reliability
    from two more, each over one half of every donor's cells. Nothing is embedded when
    neither applies."""
    standardise = setup.standardises_learned(store, config)
    choose = setup.chooses_channel_weight(store, config)
    if not (standardise or choose):
        return ChannelFit(None, None)
    donors = store.split_donors("train")
    if len(donors) > MAX_REFERENCE_DONORS:
        donors = donors[np.linspace(0, len(donors) - 1, MAX_REFERENCE_DONORS).astype(int)]
    embed = _embedder(store, config, model_config, weights)
    z = embed(donors, None)
    reference = None
    if standardise:
        try:
            reference = learned_reference(z)
        except ValueError as err:  # a collapsed model: embed keeps the unit vectors
            log.warning("no learned reference saved with the model: %s", err)
        else:
            log.info("learned reference of %d training donors: spread %.3f about their "
                     "mean (norm %.3f)", len(z), reference.rms,
                     float(np.linalg.norm(reference.mean)))
    if not choose:
        return ChannelFit(reference, None)
    reliability = _reliability(store, embed, donors)
    return ChannelFit(reference, _choose_weight(store, config, donors, z, reference,
                                                reliability))


Embedder = Callable[[np.ndarray, int | None], np.ndarray]
"""``embed(donors, half)``: the ``[len(donors), D]`` learned vectors of ``donors`` as
``embed`` draws them, from one half of each one's cells where ``half`` is 0 or 1."""


def _embedder(store: BagStore, config: TrainConfig, model_config: ModelConfig,
              weights: dict[str, torch.Tensor]) -> Embedder:
    """The trained model's :data:`Embedder` over ``store``: the model built, and the
    heads' composition read, once for every pass."""
    model = SampleCLR(model_config)
    model.load_state_dict(weights)
    model.eval()
    composition = setup.head_inputs(store, model_config)
    balance = resolve_balance(store, config.loader.balance)
    standardize = setup.standardizes(store, config)
    # embed's defaults: its cells and its donors per pass. The donors of a pass ascend but
    # need not be consecutive, so embed_donors reads the source ids between them too.
    selection = EmbedConfig()
    group = selection.batch_donors

    def embed(donors: np.ndarray, half: int | None) -> np.ndarray:
        return np.concatenate([
            embed_donors(store, model, [int(d) for d in donors[i:i + group]], selection,
                         standardize=standardize, balance=balance, composition=composition,
                         half=half).z
            for i in range(0, len(donors), group)])

    return embed


def _reliability(store: BagStore, embed: Embedder, donors: np.ndarray) -> float:
    """The split-half reliability of the learned vectors of ``donors`` (those with two
    cells or more), each embedded from the even and from the odd rows of its cells
    (:func:`~sampleclr_scale.store.channel_weight.split_half_reliability`); 1, with a
    warning, where it cannot be measured."""
    split = donors[store.cells_per_donor[donors] >= 2]
    if len(split) < 2:
        return _unmeasured(f"{len(split)} training donors have two cells or more")
    try:
        reliability = split_half_reliability(*(unit_rows(embed(split, half))
                                               for half in (0, 1)))
    except ValueError as err:
        return _unmeasured(str(err))
    log.info("learned vector's split-half reliability %.3f over %d training donors (two "
             "disjoint halves of each one's cells)", reliability, len(split))
    return reliability


def _unmeasured(reason: str) -> float:
    """The reliability taken where it cannot be measured (1: the fit as it was), with a
    warning that says why."""
    log.warning("the learned block's split-half reliability is taken as 1: %s", reason)
    return 1.0


def _choose_weight(store: BagStore, config: TrainConfig, donors: np.ndarray, z: np.ndarray,
                   reference: LearnedReference | None, reliability: float
                   ) -> ChannelWeight | None:
    """The channel weight fitted to the loss's prior over each of ``donors`` (learned
    vectors ``z``, of split-half ``reliability``) paired with its nearest among them
    (:func:`~sampleclr_scale.store.channel_weight.fit_channel_weight`); None, with a
    warning, where the prior stores too few of those pairs to fit."""
    prior = load_prior(store.location.uri, config.loss.store_prior)
    a, b = neighbour_pairs(store, prior, donors, NEIGHBOURS)
    values = prior.values_at(donors[a], donors[b])
    stored = ~np.isnan(values)
    channel = channel_features(donor_type_counts(store, COMPOSITION_COLUMN),
                               store.donor_batch)[donors]
    try:
        choice = fit_channel_weight(learned_block(z, reference), channel, a[stored],
                                    b[stored], values[stored], reliability)
    except ValueError as err:
        log.warning("the channel keeps the fixed weight %g: %s", setup.channel_weight(config),
                    err)
        return None
    intercept, learned, by_channel = choice.coefficients
    log.info("composition channel weight %.3g: the %s prior's similarities over %d pairs "
             "of near training donors fit as %.3g + %.3g x learned + %.3g x channel, the "
             "learned coefficient weighed by the reliability %.3g (estimate %s, bounds "
             "%g-%g)", choice.weight, config.loss.store_prior, choice.pairs, intercept,
             learned, by_channel, reliability,
             "none" if choice.estimate is None else f"{choice.estimate:.3g}", *WEIGHT_BOUNDS)
    return choice
