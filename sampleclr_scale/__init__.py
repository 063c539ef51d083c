"""sampleclr-scale: atlas-scale, out-of-core SampleCLR donor representations.

Stages (each reads and writes plain files, so they can run on different machines):
ingest -> prior -> train -> embed -> write back -> evaluate.

In a notebook, :class:`SampleCLR` fits on an AnnData and returns a donor AnnData
(scvi-tools style); :mod:`sampleclr_scale.stages` holds the stage functions the command
line runs (``ingest``, ``build_prior``, ``train``, ``embed``, ``evaluate``); each stage's
settings are a typed config (:class:`IngestConfig`, :class:`TrainConfig`,
:class:`EmbedConfig`, :class:`EvaluateConfig`). Names are imported on first use, so
``import sampleclr_scale`` stays light (no torch, no Ray).
"""

from sampleclr_scale import stages
from sampleclr_scale._lazy import lazy_exports
from sampleclr_scale.errors import InputError

__all__ = ["EmbedConfig", "EvaluateConfig", "IngestConfig", "InputError", "SampleCLR",
           "TrainConfig", "simulated_anndata", "stages"]
__version__ = "0.1.0"

__getattr__, __dir__ = lazy_exports(
    __name__, ["config", "embed.config", "evaluate.config", "api"],
    [n for n in __all__ if n not in ("InputError", "stages")])
