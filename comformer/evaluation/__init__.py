"""Evaluators: detectron2's, chosen by a dataset's evaluator_type, and the continual evaluator
(old / new / all PQ and mIoU computed in memory)."""
from .build import EVALUATOR_REGISTRY, build_evaluator
from .continual import ContinualEvaluator
from .panoptic_quality import PQStats, match_segments, pq_from_stats, read_panoptic_png

__all__ = [
    "EVALUATOR_REGISTRY",
    "build_evaluator",
    "ContinualEvaluator",
    "PQStats",
    "match_segments",
    "pq_from_stats",
    "read_panoptic_png",
]
