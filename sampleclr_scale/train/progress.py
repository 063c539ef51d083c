"""Training progress on the driver's console: a bar per epoch, one summary line per epoch.

Rank 0 of the training loop sends small events through its session
(:meth:`~sampleclr_scale.train.session.Session.progress`): ``{"kind": "steps", "stage",
"epoch", "step", "steps", "loss"}`` every ``log_every`` steps and ``{"kind": "epoch",
**metrics}`` at the end of each epoch. In-process they reach :class:`TrainingConsole`
directly; from Ray Train workers through a Ray queue that a driver thread drains
(:func:`ray_feed`), so the console shows the same whether the loop runs here or on a
cluster, and Ray's per-report lines never reach it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sampleclr_scale.console import progress, say

Event = dict[str, Any]


class TrainingConsole:
    """Draws rank 0's events: a bar over the steps of the epoch, then the epoch's line.

    Parameters
    ----------
    epochs
        Epochs of each stage (``{1: contrastive epochs, 2: supervised epochs}``).
    """

    def __init__(self, epochs: dict[int, int]) -> None:
        self.epochs = epochs
        self._bar: Any = None

    def __call__(self, event: Event) -> None:
        """Draw one event."""
        if event["kind"] == "steps":
            self._steps(event)
        elif event["kind"] == "epoch":
            self.close()
            say(epoch_line(event, self.epochs))

    def _steps(self, event: Event) -> None:
        if self._bar is None:
            self._bar = progress(event["steps"], _epoch_name(event, self.epochs), "steps")
        self._bar.update(event["step"] - self._bar.n)
        self._bar.set_postfix(loss=f"{event['loss']:.4f}", refresh=False)

    def close(self) -> None:
        """Remove the bar of the current epoch, if any."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def epoch_line(metrics: dict[str, Any], epochs: dict[int, int]) -> str:
    """The summary line of one finished epoch.

    Parameters
    ----------
    metrics
        The epoch's metrics (``stage``, ``stage_epoch``, ``train_loss``, optional
        ``val_loss`` and task metrics, ``donors_per_s``, ``wait_fraction``).
    epochs
        Epochs of each stage.
    """
    parts = [_epoch_name(metrics, epochs), f"train_loss {metrics['train_loss']:.4f}"]
    parts += [f"{name} {value:.4g}" for name, value in metrics.items()
              if name.startswith("val_") and isinstance(value, float)]
    parts.append(f"{metrics['donors_per_s']:,.0f} donors/s")
    parts.append(f"waiting {100 * metrics['wait_fraction']:.0f}%")
    return "   " + "  ".join(parts)


def _epoch_name(event: Event, epochs: dict[int, int]) -> str:
    """``stage S epoch E/N`` (within the stage, counted from 1)."""
    stage = event["stage"]
    return f"stage {stage} epoch {event['stage_epoch'] + 1}/{epochs[stage]}"


@contextmanager
def ray_feed(console: TrainingConsole) -> Iterator[Any]:
    """A Ray queue for the workers' events, drained into ``console`` by a driver thread
    while the block runs; yields the queue (pass it to the workers).

    The queue's actor runs on the driver's node, so that losing another node mid-training
    does not take it along (the run survives the loss; a run whose driver is lost ends).
    Should the actor die anyway, the progress lines stop and training goes on.
    """
    import ray
    from ray.exceptions import RayActorError
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    events = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                console(events.get(timeout=0.5))
            except (Empty, queue.Empty):
                continue
            except RayActorError:
                return

    thread = threading.Thread(target=drain, daemon=True, name="training-progress")
    thread.start()
    try:
        yield events
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(RayActorError):  # the lines already shown stay
            while not events.empty():
                console(events.get_nowait())
            events.shutdown()
        console.close()
