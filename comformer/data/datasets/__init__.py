"""Dataset registration. Each module registers its splits in detectron2's catalogs on import."""
from . import (  # noqa: F401
    register_ade20k_panoptic,
    register_ade20k_semantic,
    register_coco_panoptic,
    register_synthetic,
    register_voc,
)
