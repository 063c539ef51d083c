"""Evaluation stage: SPARE metrics of donor embeddings against baselines, with a report."""

from sampleclr_scale.evaluate.config import EvaluateConfig
from sampleclr_scale.evaluate.report import headline
from sampleclr_scale.evaluate.run import evaluate, read_embeddings
from sampleclr_scale.evaluate.spare import cosine_distances, spare_scores

__all__ = ["EvaluateConfig", "cosine_distances", "evaluate", "headline", "read_embeddings",
           "spare_scores"]
