"""Model parts. Importing this package registers them in detectron2's registries."""
from . import backbone  # noqa: F401  (Swin in BACKBONE_REGISTRY)
from . import pixel_decoder  # noqa: F401  (PIXEL_DECODER_REGISTRY)
from . import transformer_decoder  # noqa: F401  (TRANSFORMER_DECODER_REGISTRY)
from .head import MaskFormerHead
from .meta_arch import MaskFormer, build_criterion, classifier_extra_rows
from .per_pixel import PerPixelCriterion, PerPixelHead

__all__ = [
    "MaskFormer",
    "MaskFormerHead",
    "PerPixelHead",
    "PerPixelCriterion",
    "build_criterion",
    "classifier_extra_rows",
]
