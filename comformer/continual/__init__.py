"""Continual learning methods: a registry, so that a method is a config value (CONT.METHOD)."""
from .base import METHOD_REGISTRY, ContinualMethod, build_method
from .classifier import FreezeOldClassesHook, grow_classifier_state_dict
from .comformer import CoMFormer
from .mib import MiB
from .plop import PLOP

__all__ = [
    "METHOD_REGISTRY",
    "ContinualMethod",
    "build_method",
    "FreezeOldClassesHook",
    "grow_classifier_state_dict",
    "MiB",
    "CoMFormer",
    "PLOP",
]
