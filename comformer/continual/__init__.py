"""Continual learning methods: a registry, so that a method is a config value (CONT.METHOD)."""
from .base import METHOD_REGISTRY, ContinualMethod, build_method
from .classifier import FreezeOldClassesHook, grow_classifier_state_dict

__all__ = [
    "METHOD_REGISTRY",
    "ContinualMethod",
    "build_method",
    "FreezeOldClassesHook",
    "grow_classifier_state_dict",
]
