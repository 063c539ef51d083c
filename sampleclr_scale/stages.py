"""The stage functions, as the command line runs them, for scripts and notebooks.

``ingest``, ``train``, ``embed`` and ``evaluate`` cannot be names of the package itself,
where they name the stages' subpackages, so they are here (imported on first use, so
that this module stays light)::

    from sampleclr_scale.stages import embed, evaluate, ingest, train

Each reads and writes storage only (a bag store, a run directory, an embedding folder, a
report), so a stage run here and one run by ``sampleclr-scale`` are interchangeable.

Examples
--------
The last stage, continuing the examples of :func:`~sampleclr_scale.ingest.stage.ingest`,
:func:`~sampleclr_scale.train.driver.train` and :func:`~sampleclr_scale.embed.embedder.embed`:
SPARE scores of the embedding next to the baselines on the held-out donors, and a report.

>>> from sampleclr_scale.stages import evaluate
>>> config = scs.EvaluateConfig(relevant={"severity": "ordinal", "disease": "categorical"},
...                             technical={"dataset_id": "categorical"}, seeds=1,
...                             split="validation")
>>> metrics = evaluate([f"sampleclr={tmp}/embeddings"], f"{tmp}/bags.zarr", f"{tmp}/report",
...                    config)
>>> sorted(metrics["methods"])[:3], 0 <= metrics["methods"]["sampleclr"]["mean"]["total"] <= 1
(['celltype_pseudobulk', 'composition', 'composition_clr'], True)
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "ingest": "sampleclr_scale.ingest.stage",
    "build_prior": "sampleclr_scale.prior.build",
    "train": "sampleclr_scale.train.driver",
    "embed": "sampleclr_scale.embed.embedder",
    "evaluate": "sampleclr_scale.evaluate.run",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
