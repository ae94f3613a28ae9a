"""Training-time dataset mappers: one panoptic and one semantic, sharing their helpers."""

from .build import MAPPER_REGISTRY, BadSampleError, build_train_mapper
from .panoptic import PanopticDatasetMapper
from .semantic import SemanticDatasetMapper

__all__ = [
    "MAPPER_REGISTRY",
    "BadSampleError",
    "build_train_mapper",
    "PanopticDatasetMapper",
    "SemanticDatasetMapper",
]
