"""Evaluators: detectron2's, chosen by a dataset's evaluator_type, and the split evaluator
(old / new / all PQ and mIoU of a continual step, computed in memory)."""
from .build import EVALUATOR_REGISTRY, build_evaluator
from .split_evaluator import SplitEvaluator
from .panoptic_quality import PQStats, match_segments, pq_from_stats, read_panoptic_png

__all__ = [
    "EVALUATOR_REGISTRY",
    "build_evaluator",
    "SplitEvaluator",
    "PQStats",
    "match_segments",
    "pq_from_stats",
    "read_panoptic_png",
]
