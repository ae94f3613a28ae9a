"""comformer: continual semantic and panoptic segmentation on Mask2Former, as a detectron2 extension.

Importing the package registers its datasets, model parts and methods in detectron2's registries.
"""
from . import data  # noqa: F401  (registers datasets)
from . import modeling  # noqa: F401  (registers meta-architecture, backbones, heads)
from . import continual  # noqa: F401  (registers the continual methods)
from .config import add_comformer_config

__all__ = ["add_comformer_config"]
