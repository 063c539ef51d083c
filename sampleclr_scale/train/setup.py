"""What a run is built from: the store's tasks, the model config, the objective.

Shared by the driver (which validates a run before starting workers and exports the
model) and the workers (which build the same objects), so both see one definition.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sampleclr_scale.config import LoaderConfig, TrainConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.loading.loader import check_views_fit, resolve_balance
from sampleclr_scale.loading.schedule import steps_per_epoch
from sampleclr_scale.losses import TaskLoss, build_objective
from sampleclr_scale.model import ModelConfig, SampleCLR, TaskSpec, recommended_preset
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.channel_weight import FIXED_WEIGHT
from sampleclr_scale.store.composition import COMPOSITION_COLUMN, donor_composition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskInfo:
    """A supervised task with what the store says about its labels."""

    column: str
    kind: str
    weight: float
    classes: tuple = ()
    """Class values in code order (classification, ordinal)."""
    mean: float = 0.0
    """Mean of the training donors' targets (regression)."""
    std: float = 1.0
    """Standard deviation of the training donors' targets (regression)."""


def task_infos(store: BagStore, config: TrainConfig) -> list[TaskInfo]:
    """The run's tasks with their classes or target statistics from the training donors."""
    train = store.split_donors("train")
    infos = []
    for task in config.tasks:
        codes, classes = store.labels(task.column, task.kind)
        if task.kind == "regression":
            values = codes[train][~np.isnan(codes[train])]
            if len(values) < 2:
                raise InputError(f"regression task {task.column!r} has fewer than 2 "
                                 "training donors with a value", "choose another column")
            std = float(values.std()) or 1.0
            infos.append(TaskInfo(task.column, task.kind, task.weight, (), float(values.mean()),
                                  std))
        else:
            if len(classes) < 2:
                raise InputError(f"{task.kind} task {task.column!r} has {len(classes)} "
                                 "distinct value(s)", "choose a column with at least 2 values")
            infos.append(TaskInfo(task.column, task.kind, task.weight, tuple(classes)))
    return infos


def training_stages(config: TrainConfig, n_train: int, with_tasks: bool
                    ) -> list[tuple[int, int]]:
    """The run's stages as ``(stage, epochs)``: stage 1 (contrastive) for ``epochs``;
    with tasks, stage 2 for ``supervised_epochs``, or more on a cohort whose epochs are
    too short to reach ``supervised_min_steps`` steps (``n_train`` training donors)."""
    stages = [(1, config.epochs)]
    if with_tasks and config.supervised_epochs:
        steps = steps_per_epoch(n_train, config.worker_batch, config.workers,
                                config.loader.drop_last)
        stages.append((2, max(config.supervised_epochs,
                              -(-config.supervised_min_steps // steps))))
    return stages


def model_config(store: BagStore, config: TrainConfig, tasks: list[TaskInfo]) -> ModelConfig:
    """The SampleCLR architecture for this store and run."""
    preset = config.preset
    if preset == "auto":
        preset = recommended_preset(store.n_donors)
    specs = tuple(
        TaskSpec(name=t.column, kind=t.kind, weight=t.weight,
                 n_classes=len(t.classes) if t.kind != "regression" else None)
        for t in tasks
    )
    return ModelConfig.preset(preset, input_dim=store.dim, tasks=specs,
                              **{"head_composition": head_composition(store, config, tasks),
                                 "batch_adversary": (len(store.batch_labels)
                                                     if config.batch_adversary > 0 else 0),
                                 **config.model})


def head_composition(store: BagStore, config: TrainConfig, tasks: list[TaskInfo]
                     ) -> tuple[str, ...]:
    """The cell types whose composition the heads read beside z: the store's
    :data:`~sampleclr_scale.store.composition.COMPOSITION_COLUMN` categories when the run
    has tasks and a composition channel (the embedding carries composition, so its heads
    see it too), else none."""
    if not tasks or not config.channel_on:
        return ()
    if COMPOSITION_COLUMN not in store.code_columns:
        return ()
    return tuple(store.categories(COMPOSITION_COLUMN))


def head_inputs(store: BagStore, model: ModelConfig) -> torch.Tensor | None:
    """Float32 ``[n_donors, K]`` composition of every donor of ``store`` as ``model``'s
    heads read it (:func:`~sampleclr_scale.store.composition.donor_composition`), or None
    when they read z alone."""
    if not model.head_composition:
        return None
    return torch.from_numpy(donor_composition(store, model.head_composition))


def optimizer(model: SampleCLR, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the model: the backbone at the run's learning rate, the classifiers on z
    (the supervised heads and the batch adversary) at ``optim.head_lr_scale`` times it."""
    lr = config.learning_rate
    return torch.optim.AdamW(
        [{"params": model.backbone_parameters()},
         {"params": model.head_parameters() + model.adversary_parameters(),
          "lr": lr * config.optim.head_lr_scale}],
        lr=lr, weight_decay=config.optim.weight_decay)


def task_loss(tasks: list[TaskInfo]) -> TaskLoss | None:
    """The weighted supervised loss, or None without tasks."""
    if not tasks:
        return None
    return TaskLoss({t.column: (t.kind, t.weight) for t in tasks},
                    {t.column: (t.mean, t.std) for t in tasks if t.kind == "regression"})


def contrastive_loss(config: TrainConfig, prior: torch.Tensor | None) -> nn.Module:
    """The self-supervised objective of the run, from the objectives' registry.

    Called as ``loss(z_a, z_b, donor_index, batch_index)`` whatever its kind.
    """
    return build_objective(config.loss, prior)


def load_prior_tensor(store: BagStore, config: TrainConfig) -> torch.Tensor | None:
    """The dense donor-similarity prior the loss asks for, or None.

    :func:`~sampleclr_scale.prior.storage.load_prior` checks that the prior has the store's
    donors, so the store's donor ids index it: the loss does not check them every step.
    """
    if config.loss.store_prior is None:
        return None
    from sampleclr_scale.prior.storage import load_prior

    return load_prior(store.location.uri, config.loss.store_prior).to_torch_dense()


def standardizes(store: BagStore, config: TrainConfig) -> str | None:
    """How the run standardises cell features (see ``TrainConfig.standardize``):
    ``"batch"``, ``"batch_cell_type"`` or None (not at all)."""
    if config.standardize == "auto":
        return "batch_cell_type" if store.batch_type_maps is not None else None
    return None if config.standardize == "none" else config.standardize


def has_channel(store: BagStore, config: TrainConfig) -> bool:
    """Whether ``embed`` appends the run's composition channel: one is asked for
    (``TrainConfig.channel_on``) and the store has ``cell_type`` codes."""
    return config.channel_on and COMPOSITION_COLUMN in store.code_columns


def standardises_learned(store: BagStore, config: TrainConfig) -> bool:
    """Whether ``embed`` standardises the run's learned block next to the composition
    channel (``TrainConfig.learned_block``, ``auto`` resolved): only where there is a
    channel (:func:`has_channel`)."""
    if not has_channel(store, config):
        return False
    if config.learned_block == "auto":
        return config.loss.store_prior is not None
    return config.learned_block == "standardised"


def chooses_channel_weight(store: BagStore, config: TrainConfig) -> bool:
    """Whether the run estimates its channel's weight when training ends from its loss's
    prior (``composition_channel: auto`` with a prior and a channel)."""
    return (config.composition_channel == "auto" and config.loss.store_prior is not None
            and has_channel(store, config))


def channel_weight(config: TrainConfig) -> float:
    """The run's fixed channel weight: ``composition_channel``, or for ``"auto"`` the
    weight used where no prior gives one
    (:data:`~sampleclr_scale.store.channel_weight.FIXED_WEIGHT`)."""
    weight = config.composition_channel
    return FIXED_WEIGHT if weight == "auto" else float(weight)


def describe_run(store: BagStore, config: TrainConfig) -> str:
    """What the run balances its views over, how it corrects batches and whether embed
    appends the composition channel, each with why: the settings that depend on what
    ingest recorded (``cell_type`` codes, ``--batch-key``), said plainly."""
    mode = standardizes(store, config)
    parts = [
        _describe_views(resolve_balance(store, config.loader.balance), config.loader),
        {"batch_cell_type": "cells corrected per (batch, cell type)",
         "batch": "cells standardised per batch"}.get(
            mode or "", "no batch correction" + (
                " (the store has no --batch-key with cell_type codes)"
                if config.standardize == "auto" else "")),
        (f"composition channel of weight {_describe_weight(store, config)}"
         + (" (CLR centred per batch)" if store.donor_batch is not None else "")
         + (" beside the learned vector standardised by the training donors"
            if standardises_learned(store, config) else ""))
        if has_channel(store, config)
        else "no composition channel" + (" (the store has no cell_type codes)"
                                         if config.channel_on else ""),
    ]
    if config.batch_adversary > 0:
        parts.append(f"a batch adversary of weight {config.batch_adversary:g} over "
                     f"{len(store.batch_labels)} batches")
    return "; ".join(parts)


def _describe_weight(store: BagStore, config: TrainConfig) -> str:
    """The channel's weight as the run sets it."""
    if chooses_channel_weight(store, config):
        return f"fitted to the {config.loss.store_prior} prior when training ends"
    return f"{channel_weight(config):g}"


def _describe_views(balance: str | None, loader: LoaderConfig) -> str:
    """How the run draws its views (``balance``: the column resolved from ``loader``)."""
    if balance is None:
        return ("uniform views (the store has no cell_type codes)" if loader.balance == "auto"
                else "uniform views (loader.balance: null)")
    strength = loader.balance_strength
    if strength == 1.0:
        return f"views balanced over {balance!r} (composition cannot tell donors apart)"
    return (f"views balanced over {balance!r} with strength {strength:g} (each donor's "
            f"composition log-ratios kept at {1 - strength:g})")


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The type the model computes in under autocast (``TrainConfig.precision``), or None
    for plain float32."""
    if config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def local_device(config: TrainConfig) -> torch.device:
    """The device of a run in the calling process: its current GPU with ``use_gpu``, else
    the CPU.

    Raises
    ------
    InputError
        For ``use_gpu`` in a process that sees no CUDA GPU.
    """
    if not config.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError("use_gpu is set, but this process sees no CUDA GPU (or torch is a "
                         "CPU build)", "train without --use-gpu, or install a CUDA build of "
                         "torch on a machine with a GPU")
    return torch.device("cuda", torch.cuda.current_device())


def validation_loader_config(store: BagStore, config: TrainConfig) -> LoaderConfig | None:
    """Loader settings for the validation donors (smaller batches if they are few)."""
    n_val = len(store.split_donors("validation"))
    if n_val == 0:
        return None
    batch = max(1, min(config.worker_batch, n_val // config.workers))
    return config.loader.model_copy(update={"batch_size": batch, "drop_last": False,
                                            "num_workers": 0})


def check_run(store: BagStore, config: TrainConfig) -> list[TaskInfo]:
    """Validate a run against its store before any worker starts; return its tasks."""
    tasks = task_infos(store, config)
    n_train = len(store.split_donors("train"))
    if n_train < config.global_batch:
        raise InputError(
            f"{config.workers} workers x {config.worker_batch} donors per batch need "
            f"{config.global_batch} training donors per step; the store has {n_train}",
            "use fewer --workers or a smaller loader.batch_size",
        )
    check_views_fit(store, config.loader)
    balance = resolve_balance(store, config.loader.balance)
    if balance is not None:
        store.categories(balance)  # a column without codes fails here, not in a worker
    _check_batches(store, config)
    log.info("training: %s", describe_run(store, config))
    load_prior_tensor(store, config)  # a missing prior fails here, not in every worker
    _check_model_size(model_config(store, config, tasks))
    return tasks


MAX_PARAMETERS = 2**31
"""The most parameters a run may ask for (8 GiB of float32 weights, 32 GiB with their
gradients and AdamW's two moments): more is a mistyped setting, not a model."""


def _check_model_size(config: ModelConfig) -> None:
    """Refuse an architecture with more than :data:`MAX_PARAMETERS` parameters, counted
    on torch's meta device (no memory taken) before any worker allocates it."""
    from sampleclr_scale.model import SampleCLR

    with torch.device("meta"):
        n = sum(p.numel() for p in SampleCLR(config).parameters())
    if n > MAX_PARAMETERS:
        raise InputError(f"the model would have {n:,} parameters ({n * 4 / 2**30:,.0f} GiB "
                         "of float32 weights)",
                         "choose smaller model settings (model: encoder_hidden, "
                         "aggregator_hidden ...), or a preset without overrides")


def _check_batches(store: BagStore, config: TrainConfig) -> None:
    """Batch-aware settings need a store ingested with ``--batch-key``."""
    wanted = [name for name, on in (
        ("standardize: batch", config.standardize == "batch"),
        ("standardize: batch_cell_type", config.standardize == "batch_cell_type"),
        ("loss.negatives: same_batch", config.loss.needs_batches),
        ("batch_adversary", config.batch_adversary > 0),
    ) if on]
    if wanted and store.donor_batch is None:
        raise InputError(f"{' and '.join(wanted)} need the donors' technical batches; the "
                         f"store {store.location} has none",
                         "re-ingest with --batch-key COL ... (e.g. --batch-key dataset_id)")
    if config.batch_adversary > 0 and len(np.unique(
            store.donor_batch[store.split_donors("train")])) < 2:
        raise InputError(
            f"batch_adversary learns to tell technical batches apart, and the training "
            f"donors of {store.location} are all in one batch (--batch-key "
            f"{' '.join(store.batch_key)})", "set batch_adversary: 0 (nothing to mix)")
    if config.loss.needs_batches and store.donor_batch is not None:
        _check_same_batch_negatives(store)


def _check_same_batch_negatives(store: BagStore) -> None:
    """Refuse negatives drawn within technical batches where no batch has two training
    donors: no step would have a negative, and the loss would be 0 from the start."""
    per_batch = np.bincount(store.donor_batch[store.split_donors("train")])
    if per_batch.max(initial=0) < 2:
        raise InputError(
            "loss.negatives: same_batch contrasts each donor only with training donors of "
            f"its own technical batch, and no batch of {store.location} (--batch-key "
            f"{' '.join(store.batch_key)}) has two: no step would have a negative, and the "
            "loss would be 0 without learning anything",
            "use loss.negatives: all, or re-ingest with a --batch-key that groups several "
            "donors (e.g. dataset_id)")
