"""The per-worker training loop that Ray Train runs on every worker (or one process runs).

Each worker streams its own shard of two-view donor bags from the bag store (or draws the
same bags from the store's features held in its device's memory: ``loader.resident``,
:mod:`sampleclr_scale.loading.resident`), encodes them with its DDP replica of SampleCLR (under
bf16 autocast on CUDA: ``precision``; compiled with ``compile``) and computes the
contrastive loss of its rows against the global batch of all workers (the loss gathers
with gradients, DDP averages the gradients). Stage 1 trains the aggregator and encoder on
the contrastive loss; stage 2 adds the supervised heads, training only them for the first
``freeze_epochs``. Every epoch ends with a validation pass on held-out donors,
early-stopping bookkeeping and a checkpoint; a restarted worker continues from the latest
checkpoint at the exact step. Where the loop runs (rank, device, checkpoints) comes from a
:class:`~sampleclr_scale.train.session.Session`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from sampleclr_scale.config import TrainConfig
from sampleclr_scale.loading.loader import DonorBagDataset, DonorBatch, make_loader
from sampleclr_scale.loading.resident import (
    ResidentBags,
    load_features,
    resident_dtype,
    use_resident,
)
from sampleclr_scale.losses import batch_adversary_loss, ordinal_predict
from sampleclr_scale.model import (
    SampleCLR,
    SampleCLROutput,
    both_views,
    flatten_views,
    split_views,
)
from sampleclr_scale.storage import Location
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.train import setup
from sampleclr_scale.train.checkpoint import Position, TrainState, cpu_copy
from sampleclr_scale.train.schedule import unfrozen_ramp, warmup_cosine
from sampleclr_scale.train.session import RaySession, Session

log = logging.getLogger(__name__)

LOG_DIR = "logs"
"""Where each Ray Train worker of a local run writes its log: ``RUN/logs/rank-R.log``."""

FAULT_MARKER = "fault_injected"
DIVERGED_FILE = "diverged.json"
"""Written into the run directory by rank 0 when training stopped on a non-finite loss
or weights (:class:`DivergedError`); the driver turns it into the run's error."""
DONE_STAGE = 3


class DivergedError(Exception):
    """The loss or the weights are no longer finite: the run stops, with its last good
    checkpoint (nothing non-finite is ever reported)."""


def train_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of a Ray Train worker: ``{"config", "store", "run_dir", "events"}``."""
    session = RaySession(loop_config.get("events"))
    run_dir = Location(loop_config["run_dir"])
    if run_dir.is_local:
        _log_to(run_dir.local / LOG_DIR / f"rank-{session.rank}.log")
    Worker(TrainConfig.model_validate(loop_config["config"]), loop_config["store"],
           run_dir, session).fit()


def _log_to(path: Path) -> None:
    """Send every log line of this worker process to ``path``: the loop's own (step and
    epoch lines, at DEBUG) and Ray Train's (its per-report lines, at INFO)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(handler)
    log.setLevel(logging.DEBUG)


class Worker:
    """One worker's model, data, optimiser and position, in a session."""

    def __init__(self, config: TrainConfig, store_path: str, run_dir: Location,
                 session: Session) -> None:
        self.config, self.run_dir, self.session = config, run_dir, session
        self.rank, self.world_size = session.rank, session.world_size
        self.device = session.device
        store = BagStore(store_path)
        self.tasks = setup.task_infos(store, config)
        torch.manual_seed(config.seed)
        self.model = SampleCLR(setup.model_config(store, config, self.tasks)).to(self.device)
        inputs = setup.head_inputs(store, self.model.config)
        self.composition = None if inputs is None else inputs.to(self.device)
        prior = setup.load_prior_tensor(store, config)
        self.contrastive = setup.contrastive_loss(config, prior).to(self.device)
        self.task_loss = setup.task_loss(self.tasks)
        self.autocast = setup.autocast_dtype(config, self.device)
        self.train_data, self.val_data = self._data(store_path, store)
        self.stages = setup.training_stages(config, len(store.split_donors("train")),
                                            bool(self.tasks))

        restored = session.restore()
        if restored is None:
            self.state = TrainState(model={}, optimizer={}, scheduler={}, position=Position())
            self._start_stage()
        else:
            self.state = restored
            self.model.load_state_dict(self.state.model)
            self._start_stage(restore=True)

    def _data(self, store_path: str, store: BagStore
              ) -> tuple[DonorBagDataset, DonorBagDataset | None]:
        """The training and validation bags: streamed from the store, or drawn from its
        features held on this worker's device (``loader.resident``)."""
        config = self.config
        data = {"tasks": {t.column: t.kind for t in self.tasks}, "rank": self.rank,
                "world_size": self.world_size, "standardize": setup.standardizes(store, config)}
        source = DonorBagDataset
        if use_resident(store, config.loader, self.device):
            features = load_features(store, self.device, resident_dtype(store, config.loader))
            source = partial(ResidentBags, features=features)
        val_config = setup.validation_loader_config(store, config)
        return (source(store_path, config.loader, split="train", **data),
                None if val_config is None
                else source(store_path, val_config, split="validation", **data))

    # --- stages ---------------------------------------------------------------------

    def _stage_epochs(self) -> int:
        return dict(self.stages)[self.state.position.stage]

    def _start_stage(self, restore: bool = False) -> None:
        """Optimiser and schedule of the current stage (restored from the state if asked)."""
        position = self.state.position
        if position.stage == DONE_STAGE:
            return
        self._set_trainable()
        self.optimizer = setup.optimizer(self.model, self.config)
        steps = len(self.train_data)
        warmup = self.config.optim.warmup_epochs * steps
        total = self._stage_epochs() * steps
        unfreeze = self.config.freeze_epochs * steps if position.stage == 2 else 0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, [  # backbone, heads
            lambda step: warmup_cosine(step, warmup, total) * unfrozen_ramp(step, unfreeze, warmup),
            lambda step: warmup_cosine(step, warmup, total)])
        if restore:
            self.optimizer.load_state_dict(self.state.optimizer)
            self.scheduler.load_state_dict(self.state.scheduler)

    def _set_trainable(self) -> None:
        """Which parameters learn now, and a DDP wrapper that knows exactly those."""
        position = self.state.position
        frozen_backbone = position.stage == 2 and position.stage_epoch < self.config.freeze_epochs
        for p in self.model.backbone_parameters():
            p.requires_grad_(not frozen_backbone)
        for p in self.model.head_parameters():
            p.requires_grad_(position.stage == 2)
        # the batch adversary, if any, is never frozen: it learns in every stage
        self.net = self.model
        if self.world_size > 1:
            ids = [self.device] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        if self.config.compile:
            self.net = torch.compile(self.net)

    def _next_stage(self) -> None:
        """Move on to the next stage from the best weights of this one, or finish."""
        position = self.state.position
        if self.state.best_model is not None:
            self.model.load_state_dict(self.state.best_model)
        later = [s for s, _ in self.stages if s > position.stage]
        position.stage = later[0] if later else DONE_STAGE
        position.stage_epoch = position.step = 0
        if later:
            self.state.best_loss, self.state.best_model, self.state.bad_epochs = math.inf, None, 0
        self._start_stage()

    # --- the loop -------------------------------------------------------------------

    def fit(self) -> None:
        """Run the remaining stages and epochs; stop early where training diverges
        (rank 0 records why in ``RUN/diverged.json``)."""
        try:
            while self.state.position.stage != DONE_STAGE:
                train = self._train_epoch()
                val = self._validate()
                self._check_finite({**train, **val})
                self._end_epoch({**train, **val})
        except DivergedError as err:
            if self.rank == 0:
                position = self.state.position
                (self.run_dir / DIVERGED_FILE).write_text(json.dumps(
                    {"reason": str(err), "stage": position.stage, "epoch": position.epoch,
                     "global_step": position.global_step}))
            log.error("training stopped: %s", err)

    def _check_finite(self, metrics: dict[str, float]) -> None:
        """Raise :class:`DivergedError` for a non-finite epoch loss or weight.

        The losses are sums over every rank and the weights are the same on every rank,
        so all ranks stop together.
        """
        bad = [key for key in ("train_loss", "val_loss", "val_contrastive")
               if key in metrics and not math.isfinite(metrics[key])]
        if bad:
            raise DivergedError(f"{', '.join(f'{k} = {metrics[k]}' for k in bad)}")
        self._check_weights()

    def _check_weights(self) -> None:
        """Raise :class:`DivergedError` if a weight of the model is NaN or infinite."""
        for name, value in self.model.state_dict().items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise DivergedError(f"weight {name} is not finite")

    def _loss(self, batch: DonorBatch, with_heads: bool
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss, contrastive loss and the first view's task outputs of a batch.

        The model runs under autocast (``precision``), the losses in float32. In training,
        the total includes the batch adversary's loss (``batch_adversary`` times it); the
        validation loss, which early stopping reads, does not.
        """
        cells, mask = flatten_views(batch.cells, batch.mask)
        composition = (None if self.composition is None or not with_heads
                       else both_views(self.composition[batch.donor]))
        with self._autocast():
            out = self.net(cells, mask, with_heads=with_heads, composition=composition)
        out_a, out_b = split_views(_float32(out))
        # the donors' technical batch codes, where the loader provides them
        batch_index = batch.batch
        contrastive = self.contrastive(out_a.z, out_b.z, batch.donor, batch_index)
        total = contrastive
        if out_a.batch_logits is not None and self.model.training:
            total = total + self.config.batch_adversary * batch_adversary_loss(
                out_a.batch_logits, out_b.batch_logits, batch_index)
        if not with_heads:
            return total, contrastive, {}
        supervised = 0.5 * (self.task_loss(out_a.task_outputs, batch.labels)[0]
                            + self.task_loss(out_b.task_outputs, batch.labels)[0])
        return total + supervised, contrastive, out_a.task_outputs

    def _train_epoch(self) -> dict[str, float]:
        """One epoch (from the current step on) and its training metrics.

        The metrics cover the steps this process ran: after a restart mid-epoch, the
        steps since the restart.
        """
        position = self.state.position
        self.model.train()
        self.train_data.set_epoch(position.epoch)
        self.train_data.set_start_step(position.step)
        steps = len(self.train_data)
        # loss and cells stay on the device (no host sync per step), the rest host-side
        device_sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        sums = torch.zeros(5, dtype=torch.float64)  # loss, steps, donors, cells, wait
        start = tick = time.perf_counter()
        for batch in self._batches(self.train_data):
            arrived = time.perf_counter()
            self._maybe_fail()
            sums[[1, 2, 4]] += torch.tensor([1, len(batch.donor), arrived - tick],
                                            dtype=torch.float64)
            batch = batch.to(self.device)
            loss = self._step(batch, with_heads=position.stage == 2)
            position.step += 1
            position.global_step += 1
            device_sums[0] += loss.detach()
            device_sums[1] += batch.mask.sum()
            tick = time.perf_counter()
            if self.rank == 0 and (position.step % self.config.log_every == 0
                                   or position.step == steps):
                sums[[0, 3]] = device_sums.cpu()
                self._progress(sums, tick - start, steps)
            if (self.config.checkpoint_every and position.step < steps
                    and position.global_step % self.config.checkpoint_every == 0):
                self._report({"global_step": position.global_step})
        seconds = time.perf_counter() - start
        sums[[0, 3]] = device_sums.cpu()
        totals = self._all_reduce(torch.cat([sums, torch.tensor([seconds], dtype=torch.float64)]))
        n = max(totals[1].item(), 1)
        return {"train_loss": totals[0].item() / n,
                "donors_per_s": totals[2].item() / (totals[5].item() / self.world_size),
                "cells_per_s": totals[3].item() / (totals[5].item() / self.world_size),
                "wait_fraction": totals[4].item() / max(totals[5].item(), 1e-9),
                "lr": self.scheduler.get_last_lr()[0], **self._peak_memory()}

    def _step(self, batch: DonorBatch, with_heads: bool) -> torch.Tensor:
        """One optimisation step on ``batch``; its loss."""
        loss, _, _ = self._loss(batch, with_heads=with_heads)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss

    @torch.no_grad()
    def _validate(self) -> dict[str, float]:
        if self.val_data is None:
            return {}
        position = self.state.position
        supervised = position.stage == 2
        self.model.eval()
        self.val_data.set_epoch(0)  # the same validation bags every epoch
        # per task: correct, count, absolute error; plus loss sums
        sums = torch.zeros(3 + 3 * len(self.tasks), dtype=torch.float64)
        for batch in self._batches(self.val_data):
            batch = batch.to(self.device)
            loss, contrastive, outputs = self._loss(batch, with_heads=supervised)
            sums[:3] += torch.tensor([loss.item(), contrastive.item(), 1])
            if supervised:
                sums[3:] += self._task_metrics(outputs, batch.labels)
        totals = self._all_reduce(sums)
        n = max(totals[2].item(), 1)
        metrics = {"val_contrastive": totals[1].item() / n, "val_loss": totals[0].item() / n}
        for i, task in enumerate(self.tasks if supervised else []):
            correct, count, abs_err = totals[3 + 3 * i: 6 + 3 * i].tolist()
            if task.kind != "regression":
                metrics[f"val_{task.column}_accuracy"] = correct / max(count, 1)
            if task.kind != "classification":
                metrics[f"val_{task.column}_mae"] = abs_err / max(count, 1)
        return metrics

    def _task_metrics(self, outputs: dict[str, torch.Tensor],
                      labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """Correct predictions, labelled donors and absolute error, per task."""
        values = []
        for task in self.tasks:
            y, out = labels[task.column], outputs[task.column]
            if task.kind == "regression":
                known = ~torch.isnan(y)
                pred = out.reshape(-1) * task.std + task.mean
                values += [0.0, known.sum().item(), (pred - y)[known].abs().sum().item()]
                continue
            known = y >= 0
            pred = out.argmax(-1) if task.kind == "classification" else ordinal_predict(out)
            values += [(pred == y)[known].sum().item(), known.sum().item(),
                       (pred - y)[known].abs().sum().item()]
        return torch.tensor(values, dtype=torch.float64)

    def _end_epoch(self, metrics: dict[str, float]) -> None:
        """Early stopping, history, the next position, and a checkpoint."""
        state, position = self.state, self.state.position
        score = metrics.get("val_loss", metrics["train_loss"])
        if score < state.best_loss:
            state.best_loss, state.bad_epochs = score, 0
            state.best_model = cpu_copy(self.model.state_dict())
        else:
            state.bad_epochs += 1
        metrics = {"stage": position.stage, "epoch": position.epoch,
                   "stage_epoch": position.stage_epoch, "global_step": position.global_step,
                   **metrics}
        state.history.append(metrics)
        if self.rank == 0:
            log.debug("epoch %s", " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
            self.session.progress({"kind": "epoch", **metrics})
        position.epoch += 1
        position.stage_epoch += 1
        position.step = 0
        patience = self.config.patience
        if position.stage_epoch >= self._stage_epochs() or (
                patience is not None and state.bad_epochs >= patience):
            self._next_stage()
        elif position.stage == 2 and position.stage_epoch == self.config.freeze_epochs:
            self._set_trainable()  # unfreeze the backbone
        self._report(metrics)

    # --- plumbing -------------------------------------------------------------------

    def _batches(self, data: DonorBagDataset) -> Iterable[DonorBatch]:
        """An epoch of ``data``: resident bags as they come, streamed ones through a
        DataLoader (in page-locked memory for a GPU, so that copies overlap its work)."""
        if isinstance(data, ResidentBags):
            return data
        return make_loader(data, pin_memory=self.device.type == "cuda")

    def _autocast(self) -> AbstractContextManager:
        """Autocast to the run's precision, or nothing for float32."""
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _peak_memory(self) -> dict[str, float]:
        """``{"gpu_peak_mb": ...}``: the most GPU memory this worker's tensors took so far
        (on CUDA; nothing on CPU)."""
        if self.device.type != "cuda":
            return {}
        return {"gpu_peak_mb": torch.cuda.max_memory_allocated(self.device) / 2**20}

    def _maybe_fail(self) -> None:
        """Fault injection: the last worker raises once at ``fail_at_step``."""
        marker = self.run_dir / FAULT_MARKER
        if (self.config.fail_at_step == self.state.position.global_step
                and self.rank == self.world_size - 1 and not marker.exists()):
            marker.write_text("")
            raise RuntimeError(f"injected failure at step {self.config.fail_at_step}")

    def _all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return values
        moved = values.to(self.device)
        torch.distributed.all_reduce(moved)
        return moved.cpu()

    def _progress(self, sums: torch.Tensor, seconds: float, steps: int) -> None:
        position = self.state.position
        loss, n, donors, cells, wait = sums.tolist()
        log.debug("stage %d epoch %d step %d/%d loss %.4f %.0f donors/s %.0f cells/s "
                  "waiting %.0f%%", position.stage, position.epoch, position.step, steps,
                  loss / n, donors * self.world_size / seconds,
                  cells * self.world_size / seconds, 100 * wait / seconds)
        self.session.progress({"kind": "steps", "stage": position.stage,
                               "stage_epoch": position.stage_epoch, "step": position.step,
                               "steps": steps, "loss": loss / n})

    def _report(self, metrics: dict[str, Any]) -> None:
        """Report the metrics and the training state to the session (a checkpoint); never
        a state with non-finite weights."""
        self._check_weights()
        self.state.model = self.model.state_dict()
        self.state.optimizer = self.optimizer.state_dict()
        self.state.scheduler = self.scheduler.state_dict()
        self.session.report(metrics, self.state)


def _float32(out: SampleCLROutput) -> SampleCLROutput:
    """The model's representations and task outputs in float32 (as they are without
    autocast), for the losses and metrics."""
    return out._replace(z=out.z.float(),
                        task_outputs={k: v.float() for k, v in out.task_outputs.items()},
                        batch_logits=None if out.batch_logits is None
                        else out.batch_logits.float())


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
