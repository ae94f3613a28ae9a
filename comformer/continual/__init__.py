"""The continual layer: methods (a registry: CONT.METHOD), the teacher, the growing classifier and
the continual model that composes a Mask2Former student with them. Importing it registers the
methods."""
from . import baselines, comformer, eclipse, mib, plop  # noqa: F401  (register the methods)
from .classifier import class_embed, grow_classifier_state_dict
from .method import (
    METHOD_REGISTRY,
    ContinualMethod,
    Prediction,
    StepBatch,
    StepData,
    build_method,
)
from .model import ContinualModel, build_continual_model, to_dataset_classes
from .teacher import Teacher, config_with_classes

__all__ = [
    "METHOD_REGISTRY",
    "ContinualMethod",
    "Prediction",
    "StepBatch",
    "StepData",
    "build_method",
    "ContinualModel",
    "build_continual_model",
    "to_dataset_classes",
    "Teacher",
    "config_with_classes",
    "class_embed",
    "grow_classifier_state_dict",
]
