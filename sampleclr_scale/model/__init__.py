"""SampleCLR model: cell-importance aggregator, residual encoder, supervised heads.

Pure torch, no I/O. :class:`ModelConfig` (pydantic) is the user-facing description;
:class:`SampleCLR` builds the torch modules from it.
"""

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
from sampleclr_scale.model.sampleclr import SampleCLR, SampleCLROutput, flatten_views, split_views

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
    "flatten_views",
    "recommended_preset",
    "split_views",
]
