"""The trained model as a file: ``RUN/model.pt``, everything needed to embed donors.

Holds the architecture, the best weights, the tasks with their classes and target
statistics, the training config and the store it was trained on with its feature spec,
so the embedding stage needs nothing else.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from sampleclr_scale.errors import InputError
from sampleclr_scale.model import ModelConfig, SampleCLR
from sampleclr_scale.storage import Location
from sampleclr_scale.train.setup import TaskInfo

MODEL_FILE = "model.pt"


def save_model(run_dir: str | Path | Location, *, model_config: ModelConfig,
               state_dict: dict[str, Any], tasks: list[TaskInfo], train_config: dict[str, Any],
               store: str, history: list[dict[str, Any]], standardize: bool | str | None = False,
               balance: str | None = None,
               feature_spec: dict[str, Any] | None = None) -> Location:
    """Write ``run_dir/model.pt`` atomically (a local path or a URI).

    ``standardize`` records how the model saw cell features standardised (``"batch"``,
    ``"batch_cell_type"``; None or False: not), ``balance`` the cell-level column its
    views were balanced over, so that embedding does the same; ``feature_spec`` the
    store's feature-spec record (:meth:`~sampleclr_scale.data.feature_spec.PCASpec.record`),
    so that embedding refuses a store of another feature space.
    """
    path = Location(run_dir) / MODEL_FILE
    path.write_torch({"model_config": model_config.model_dump(mode="json"),
                      "state_dict": state_dict, "tasks": [asdict(t) for t in tasks],
                      "train_config": train_config, "store": store, "history": history,
                      "standardize": standardize, "balance": balance,
                      "feature_spec": feature_spec})
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
    model = SampleCLR(ModelConfig.model_validate(artifact["model_config"]))
    model.load_state_dict(artifact["state_dict"])
    artifact["tasks"] = [TaskInfo(**t) for t in artifact["tasks"]]
    return model.eval(), artifact
