"""SampleCLR model: cell-importance aggregator, residual encoder, supervised heads.

Pure torch, no I/O. :class:`ModelConfig` (pydantic) is the user-facing description;
:class:`SampleCLR` builds the torch modules from it.

The names below are imported on first use, so that reading a config does not import
torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sampleclr_scale._lazy import lazy_exports

if TYPE_CHECKING:
    from sampleclr_scale.model.aggregator import CellImportanceAggregator
    from sampleclr_scale.model.blocks import ResidualMLP
    from sampleclr_scale.model.config import ModelConfig, TaskSpec, recommended_preset
    from sampleclr_scale.model.heads import (
        ClassificationHead,
        HeadBlock,
        MLPHead,
        OrdinalHead,
        RegressionHead,
        SupervisedHeads,
    )
    from sampleclr_scale.model.sampleclr import (
        SampleCLR,
        SampleCLROutput,
        both_views,
        flatten_views,
        split_views,
    )

__all__ = [
    "CellImportanceAggregator",
    "ClassificationHead",
    "HeadBlock",
    "MLPHead",
    "ModelConfig",
    "OrdinalHead",
    "RegressionHead",
    "ResidualMLP",
    "SampleCLR",
    "SampleCLROutput",
    "SupervisedHeads",
    "TaskSpec",
    "both_views",
    "flatten_views",
    "recommended_preset",
    "split_views",
]

__getattr__, __dir__ = lazy_exports(
    __name__, ("config", "blocks", "aggregator", "heads", "sampleclr"), __all__)
