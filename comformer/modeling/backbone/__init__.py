"""Backbones beyond detectron2's own, registered in its BACKBONE_REGISTRY on import."""

from .swin import D2SwinTransformer

__all__ = ["D2SwinTransformer"]
