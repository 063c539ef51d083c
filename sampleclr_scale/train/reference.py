"""The learned reference saved with a model: where its training donors' vectors lie.

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
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from sampleclr_scale.config import TrainConfig
from sampleclr_scale.embed.config import EmbedConfig
from sampleclr_scale.embed.worker import embed_donors
from sampleclr_scale.loading.loader import resolve_balance
from sampleclr_scale.model import ModelConfig, SampleCLR
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.composition import LearnedReference, learned_reference
from sampleclr_scale.train import setup

log = logging.getLogger(__name__)

MAX_REFERENCE_DONORS = 4096
"""Most training donors embedded for the reference (evenly spaced over the training
split): the mean and spread of 4,096 unit vectors are known to about 1.5 % of the spread.
Measured on one CPU thread: the ``mixed`` cohort's 160 training donors (1,000 cells each,
small preset) in 1.0 s, so about 26 s at 4,096."""


def model_reference(store: BagStore, config: TrainConfig, model_config: ModelConfig,
                    weights: dict[str, torch.Tensor]) -> LearnedReference | None:
    """The learned reference of a trained model on its training donors, or None when the
    run's learned block is not standardised (:func:`~sampleclr_scale.train.setup
    .standardises_learned`)."""
    if not setup.standardises_learned(store, config):
        return None
    donors = store.split_donors("train")
    if len(donors) > MAX_REFERENCE_DONORS:
        donors = donors[np.linspace(0, len(donors) - 1, MAX_REFERENCE_DONORS).astype(int)]
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
    z = np.concatenate([
        embed_donors(store, model, [int(d) for d in donors[i:i + group]], selection,
                     standardize=standardize, balance=balance, composition=composition).z
        for i in range(0, len(donors), group)])
    try:
        reference = learned_reference(z)
    except ValueError as err:  # a collapsed model: embed keeps the unit vectors
        log.warning("no learned reference saved with the model: %s", err)
        return None
    log.info("learned reference of %d training donors: spread %.3f about their mean "
             "(norm %.3f)", len(z), reference.rms, float(np.linalg.norm(reference.mean)))
    return reference
