"""The Ray Train driver of ``sampleclr-scale train``.

Validates the run against its store, starts a ``TorchTrainer`` with one worker per
process (gloo on CPUs, NCCL on GPUs), restarts failed workers from the latest checkpoint
(``FailureConfig``), and exports the best weights as ``RUN/model.pt`` with the metrics of
every epoch (``RUN/metrics.jsonl``). Running the same command with ``--resume`` continues
an interrupted run from its latest checkpoint, with the same settings and on the same
store (``RUN/store.json`` records the store's URI and fingerprint). ``in_process`` runs
the same training loop in the calling process instead (one worker, no Ray, no checkpoints
on storage): for many small runs, such as the quality benchmark's.

The store and the run directory may be local paths or URIs (``s3://``, ``gs://`` ...):
on a multi-node cluster both live on storage every node reaches, and Ray Train writes
its checkpoints under ``RUN/ray`` through the same URI unless ``storage_path`` is set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from sampleclr_scale.cluster import check_resources, ensure_ray, is_local
from sampleclr_scale.config import TrainConfig
from sampleclr_scale.errors import InputError, path_error
from sampleclr_scale.loading.loader import resolve_balance
from sampleclr_scale.storage import Location, claim
from sampleclr_scale.storage.outputs import check_apart
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.manifest import read_manifest
from sampleclr_scale.train import setup
from sampleclr_scale.train.artifact import save_model
from sampleclr_scale.train.checkpoint import TrainState
from sampleclr_scale.train.progress import TrainingConsole, ray_feed
from sampleclr_scale.train.reference import ChannelFit, fit_channel
from sampleclr_scale.train.session import LocalSession
from sampleclr_scale.train.worker import DIVERGED_FILE, Worker, train_worker

if TYPE_CHECKING:
    from ray.train.torch import TorchConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "train_config.json"
STORE_FILE = "store.json"  # the store the run trains on: its URI and fingerprint
METRICS_FILE = "metrics.jsonl"
RAY_DIR = "ray"  # Ray's checkpoints inside the run directory, unless storage_path is set
# settings that may change when a run is resumed: they do not change what is computed
_RESUMABLE = {"max_failures", "log_every", "fail_at_step", "keep_checkpoints", "placement"}


@dataclass
class TrainResult:
    """Where a finished run put its outputs, and its metrics."""

    run_dir: Location
    model_path: Location
    history: list[dict[str, Any]]


def _check_run_dir(run: Location, config: TrainConfig, resume: bool, store: BagStore) -> None:
    """Refuse to mix runs: an existing run continues only with ``resume``, its config and
    its store."""
    saved = run / CONFIG_FILE
    if run.is_file():
        raise InputError(f"--out {run} is a file, not a folder", "choose another --out")
    if not saved.is_file():
        if run.children():
            raise InputError(f"{run} exists and is not a training run",
                             "choose an empty or new --out")
        if resume:
            raise InputError(f"--resume: {run} holds no training run to continue",
                             "train without --resume to start one, or name the --out of "
                             "the run to continue")
        return
    if not resume:
        raise InputError(f"run {run} already exists",
                         "pass --resume to continue it, or choose another --out")
    written = json.loads(saved.read_text())
    # settings added since the run started compare with their defaults; what no longer
    # validates is compared as written (and shows up as changed)
    with contextlib.suppress(ValidationError):
        written = TrainConfig.model_validate(written).model_dump(mode="json")
    before = {k: v for k, v in written.items() if k not in _RESUMABLE}
    now = {k: v for k, v in config.model_dump(mode="json").items() if k not in _RESUMABLE}
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        raise InputError(f"run {run} was started with other settings: {changed}",
                         "resume with the original config, or train into a new --out")
    _check_run_store(run, store)


def _check_run_store(run: Location, store: BagStore) -> None:
    """Refuse to resume a run on another store than the one it started on.

    The stores are compared by fingerprint (:attr:`BagStore.fingerprint`), so a run may
    continue on a copy of its store (moved to a bucket, say) but not on a store ingested
    again, or from another cohort, whatever its path.
    """
    saved = run / STORE_FILE
    if not saved.is_file():
        raise InputError(f"run {run} does not record the store it was started on (it was "
                         "started by an older sampleclr-scale), so it cannot be resumed safely",
                         "train into a new --out")
    started = json.loads(saved.read_text())
    if started["fingerprint"] != store.fingerprint:
        raise InputError(
            f"run {run} was started on the store {started['uri']} (fingerprint "
            f"{started['fingerprint'][:12]}), not on {store.location} (fingerprint "
            f"{store.fingerprint[:12]}): resuming would mix their data",
            f"resume with --store {started['uri']}, or train into a new --out")
    if started["uri"] != store.location.uri:
        log.info("resuming on %s, a copy of the run's store %s", store.location, started["uri"])


def train(store_path: str, run_dir: str, config: TrainConfig, *, resume: bool = False,
          in_process: bool = False) -> TrainResult:
    """Train SampleCLR on a bag store with Ray Train, or in this process; see the module
    docstring.

    Parameters
    ----------
    store_path
        The bag store (a local path or a URI).
    run_dir
        The run directory: ``model.pt``, ``metrics.jsonl``, ``train_config.json``,
        ``store.json`` and Ray's checkpoints (``ray/``).
    config
        The run's settings (``sampleclr-scale train --config``).
    resume
        Continue the interrupted run in ``run_dir`` (same settings, same store).
    in_process
        Train in this process without Ray (``config.workers`` must be 1): no checkpoints
        on storage, the same training loop.

    Returns
    -------
    TrainResult
        The run directory, the model file and every epoch's metrics.

    Examples
    --------
    Continuing the example of :func:`~sampleclr_scale.ingest.stage.ingest` (``tmp`` is a
    scratch folder):

    >>> from sampleclr_scale.stages import train
    >>> config = scs.TrainConfig(epochs=2, supervised_epochs=1, supervised_min_steps=0, workers=1,
    ...                          tasks=[{"column": "severity", "kind": "ordinal"}],
    ...                          loader={"cells_per_view": 64, "batch_size": 8})
    >>> result = train(f"{tmp}/bags.zarr", f"{tmp}/run", config, in_process=True)
    >>> [(m["stage"], m["epoch"]) for m in result.history]
    [(1, 0), (1, 1), (2, 2)]
    """
    store = BagStore(store_path)
    if in_process and config.workers != 1:
        raise InputError(f"an in-process run has one worker, the config asks for "
                         f"{config.workers}", "set workers: 1 (and the batch size of the "
                         "global batch you want), or train with Ray")
    build_loss_prior(store, config)
    tasks = setup.check_run(store, config)
    if in_process:
        setup.local_device(config)  # no GPU for use_gpu: refused before the run is written
    run = Location(run_dir)
    check_apart(run, [store.location])
    with claim(run):  # one run writes RUN at a time: a second is refused
        _check_run_dir(run, config, resume, store)
        if not in_process:  # Ray would wait forever for what it does not have
            check_resources(config.workers, config.use_gpu)
        _start(run, store, config)
        state = (_fit_in_process(store, run, config) if in_process
                 else _fit_ray(store, run, config))
        _check_converged(run, config, kept=not in_process)
        check_store_unchanged(store)
        model_path = _publish(run, store, config, tasks, state)
    return TrainResult(run, model_path, state.history)


def build_loss_prior(store: BagStore, config: TrainConfig) -> None:
    """Build the prior the loss names (``loss.prior``, the GloScope prior by default) into
    a store that has none, with the prior stage's default settings
    (:func:`~sampleclr_scale.prior.build.ensure_prior`); a store that has one keeps it.

    Raises
    ------
    InputError
        When it cannot be built there (a read-only store, too few cells per donor), saying
        how to build it apart or to train without a prior.
    """
    from sampleclr_scale.prior.build import ensure_prior
    from sampleclr_scale.prior.config import PriorConfig

    kind = config.loss.store_prior
    if kind is None:
        return
    fix = (f"build it yourself (`sampleclr-scale prior --store {store.location} --kind "
           f"{kind}` with settings that fit, where the store can be written), or train "
           "without a prior (loss.prior: null)")
    try:
        if ensure_prior(store.location.uri, PriorConfig(kind=kind)):
            log.info("built the %s prior that loss.prior names into %s (the prior stage's "
                     "defaults; `sampleclr-scale prior` builds it with others)", kind,
                     store.location)
    except InputError as err:
        raise InputError(f"loss.prior {kind}: the store has no {kind} prior and building "
                         f"one failed: {err.problem}", f"{err.fix}; or {fix}") from None
    except OSError as err:
        known = path_error(err)
        if known is None:
            raise
        raise InputError(f"loss.prior {kind}: the store has no {kind} prior and it could "
                         f"not be written there: {known.problem}", fix) from None


def check_store_unchanged(store: BagStore) -> None:
    """Refuse to publish a model whose store was replaced while it trained (``ingest
    --overwrite`` of the same path): the store at its location now has another
    fingerprint, so the model would be recorded against data it never saw."""
    now = read_manifest(store.location).fingerprint
    if now != store.fingerprint:
        raise InputError(f"the store {store.location} was replaced while this run trained "
                         f"(fingerprint {store.fingerprint[:12]}, now {now[:12]}): its model "
                         "is not written", "train again on the store as it is now, into a "
                         "new --out; replace a store only when no run reads it")


def _start(run: Location, store: BagStore, config: TrainConfig) -> None:
    """Record the run's store and settings (checked by ``--resume``)."""
    (run / STORE_FILE).write_text(json.dumps({"uri": store.location.uri,
                                              "fingerprint": store.fingerprint}, indent=2))
    (run / CONFIG_FILE).write_text(json.dumps(config.model_dump(mode="json"), indent=2))
    if (run / DIVERGED_FILE).exists():  # left by an earlier try of this run
        (run / DIVERGED_FILE).remove()


def _publish(run: Location, store: BagStore, config: TrainConfig, tasks: list[setup.TaskInfo],
             state: TrainState) -> Location:
    """Write the finished run's model (its best weights) and metrics; the model's path."""
    weights = state.best_model if state.best_model is not None else state.model
    model_config = setup.model_config(store, config, tasks)
    channel = fit_channel(store, config, model_config, weights)
    model_path = save_model(run, model_config=model_config,
                            state_dict=weights, tasks=tasks,
                            train_config=config.model_dump(mode="json"),
                            store=store.location.uri, history=state.history,
                            standardize=setup.standardizes(store, config),
                            balance=resolve_balance(store, config.loader.balance),
                            feature_spec=None if store.feature_spec is None
                            else store.feature_spec.record(),
                            learned_reference=None if channel.reference is None
                            else channel.reference.record(),
                            channel_weight=_channel_weight_record(config, channel))
    (run / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in state.history))
    log.info("model written to %s", model_path)
    return model_path


def _channel_weight_record(config: TrainConfig, channel: ChannelFit) -> dict[str, Any]:
    """The channel-weight record saved with the model: the weight ``embed`` gives the
    composition channel (0: none), with the prior's fit where the run estimated it."""
    if channel.weight is None:
        return {"weight": setup.channel_weight(config)}
    return {**channel.weight.record(), "chosen_by": config.loss.store_prior}


def _check_converged(run: Location, config: TrainConfig, kept: bool) -> None:
    """Refuse to publish a run whose workers stopped on a non-finite loss or weights
    (:class:`~sampleclr_scale.train.worker.DivergedError`); ``kept``: the run keeps its
    checkpoints (on Ray)."""
    marker = run / DIVERGED_FILE
    if not marker.is_file():
        return
    where = json.loads(marker.read_text())
    raise InputError(
        f"training diverged in stage {where['stage']}, epoch {where['epoch']} (step "
        f"{where['global_step']}): {where['reason']}. No model was written"
        + (f"; {run} keeps its last good checkpoint" if kept else ""),
        f"train into a new --out with a lower optim.lr (this run's: {config.optim.lr:g}) "
        "or precision: fp32, and check the store (`sampleclr-scale check STORE`): NaN or "
        "infinite features, or a technical batch whose features do not vary, diverge too")


def _fit_in_process(store: BagStore, run: Location, config: TrainConfig
                    ) -> TrainState | None:
    """The training loop in this process; the finished run's state."""
    console = _console(store, config)
    session = LocalSession(device=setup.local_device(config), on_progress=console)
    log.info("training on %s in this process (batch %d donors, lr %.2e)", store.location,
             config.global_batch, config.learning_rate)
    try:
        Worker(config, store.location.uri, run, session).fit()
    finally:
        console.close()
    return session.latest


def _fit_ray(store: BagStore, run: Location, config: TrainConfig) -> TrainState | None:
    """The training loop on Ray Train workers, their progress on this console; the latest
    checkpoint's state."""
    ensure_ray()
    with ray_feed(_console(store, config)) as events, _torch_config(config) as torch_config:
        return _fit_trainer(store, run, config, events, torch_config)


@contextlib.contextmanager
def _torch_config(config: TrainConfig) -> Iterator[TorchConfig]:
    """How the workers form their process group: on a local Ray through a file in a
    private folder (no listener on the network: :mod:`~sampleclr_scale.train.rendezvous`),
    on a cluster through Ray's ``TCPStore``."""
    from ray.train.torch import TorchConfig

    backend = "nccl" if config.use_gpu else "gloo"
    if not is_local():
        yield TorchConfig(backend=backend)
        return
    from sampleclr_scale.train.rendezvous import LocalTorchConfig

    with tempfile.TemporaryDirectory(prefix="sampleclr-rendezvous-") as folder:
        yield LocalTorchConfig(backend=backend, folder=folder)


def _fit_trainer(store: BagStore, run: Location, config: TrainConfig,
                 events: Any, torch_config: TorchConfig) -> TrainState | None:
    """Run the ``TorchTrainer``; the latest checkpoint's state."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.model_dump(mode="json"),
                           "store": store.location.uri, "run_dir": run.uri, "events": events},
        torch_config=torch_config,
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
                                     placement_strategy=config.placement),
        run_config=RunConfig(
            name=RAY_DIR if config.storage_path is None else run.name,
            storage_path=config.storage_path or run.uri,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints)),
    )
    log.info("training on %s with %d workers (global batch %d donors, lr %.2e)",
             store.location, config.workers, config.global_batch, config.learning_rate)
    result = trainer.fit()
    if result.checkpoint is None:  # the run diverged before its first checkpoint
        return None
    with result.checkpoint.as_directory() as directory:
        return TrainState.load(directory)


def _console(store: BagStore, config: TrainConfig) -> TrainingConsole:
    """The console of a run's progress events."""
    return TrainingConsole(dict(setup.training_stages(
        config, len(store.split_donors("train")), bool(config.tasks))))
