"""The trained model as a file: ``RUN/model.pt``, everything needed to embed donors.

Holds the architecture, the best weights, the tasks with their classes and target
statistics, the training config and the store it was trained on with its feature spec,
so the embedding stage needs nothing else.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sampleclr_scale.errors import InputError
from sampleclr_scale.model import ModelConfig, SampleCLR
from sampleclr_scale.storage import Location
from sampleclr_scale.train.setup import TaskInfo

MODEL_FILE = "model.pt"


def save_model(run_dir: str | Path | Location, *, model_config: ModelConfig,
               state_dict: dict[str, Any], tasks: list[TaskInfo], train_config: dict[str, Any],
               store: str, history: list[dict[str, Any]], standardize: bool | str | None = False,
               balance: str | None = None,
               feature_spec: dict[str, Any] | None = None,
               learned_reference: dict[str, Any] | None = None,
               channel_weight: dict[str, Any] | None = None) -> Location:
    """Write ``run_dir/model.pt`` atomically (a local path or a URI).

    ``standardize`` records how the model saw cell features standardised (``"batch"``,
    ``"batch_cell_type"``; None or False: not), ``balance`` the cell-level column its
    views were balanced over, so that embedding does the same; ``feature_spec`` the
    store's feature-spec record (:meth:`~sampleclr_scale.store.feature_spec.PCASpec.record`),
    so that embedding refuses a store of another feature space; ``learned_reference`` the
    training donors' :class:`~sampleclr_scale.store.composition.LearnedReference` record
    (:mod:`~sampleclr_scale.train.reference`), by which embedding standardises the learned
    block next to the composition channel (None: unit vectors); ``channel_weight`` the
    weight ``embed`` gives the channel (``{"weight": W}``, with the prior's fit where
    the run estimated it,
    :class:`~sampleclr_scale.store.channel_weight.ChannelWeight`).
    """
    path = Location(run_dir) / MODEL_FILE
    path.write_torch({"model_config": model_config.model_dump(mode="json"),
                      "state_dict": state_dict, "tasks": [asdict(t) for t in tasks],
                      "train_config": train_config, "store": store, "history": history,
                      "standardize": standardize, "balance": balance,
                      "feature_spec": feature_spec,
                      "learned_reference": learned_reference,
                      "channel_weight": channel_weight})
    return path


def load_model(run_dir: str | Path | Location) -> tuple[SampleCLR, dict[str, Any]]:
    """The trained model in eval mode, and the rest of the artifact."""
    path = Location(run_dir) / MODEL_FILE
    if not path.is_file():
        raise InputError(f"{run_dir} has no trained model ({MODEL_FILE})",
                         "train one with `sampleclr-scale train --store STORE --out RUN`")
    artifact = path.read_torch(
        "trained model", "train it again with `sampleclr-scale train --store STORE --out RUN` "
        "and embed with the new RUN")
    model = _model(artifact, path)
    bad = [name for name, value in model.state_dict().items()
           if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise InputError(f"the trained model {path} has NaN or infinite weights ({bad[0]}"
                         f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): its "
                         "training diverged", "train it again with a lower optim.lr "
                         "(sampleclr-scale train refuses to write such a model)")
    try:
        artifact["tasks"] = [TaskInfo(**t) for t in artifact["tasks"]]
    except (KeyError, TypeError) as err:
        raise _damaged(path, f"its tasks do not load ({err})") from None
    return model.eval(), artifact


def _damaged(path: Location, why: str) -> InputError:
    return InputError(f"{path} is not a trained model that this sampleclr-scale reads: "
                      f"{why}", "train it again with `sampleclr-scale train --store STORE "
                      "--out RUN` and embed with the new RUN")


def _model(artifact: Any, path: Location) -> SampleCLR:
    """The model of a loaded artifact; an :class:`InputError` for one that is damaged
    (not a mapping, keys missing, weights of other names or shapes)."""
    from pydantic import ValidationError

    needed = ("model_config", "state_dict", "tasks")
    if not isinstance(artifact, dict) or any(k not in artifact for k in needed):
        got = sorted(artifact) if isinstance(artifact, dict) else type(artifact).__name__
        raise _damaged(path, f"it needs the entries {list(needed)}, it holds {got}")
    try:
        model = SampleCLR(ModelConfig.model_validate(artifact["model_config"]))
    except (ValidationError, TypeError) as err:
        raise _damaged(path, f"its architecture does not validate ({err})") from None
    if not isinstance(artifact["state_dict"], dict):
        raise _damaged(path, "its weights are not a state dict")
    try:
        model.load_state_dict(artifact["state_dict"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[1:2] or [str(err)]
        raise _damaged(path, f"its weights do not fit its architecture ({first[0].strip()})"
                       ) from None
    return model
