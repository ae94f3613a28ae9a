"""
ADE20K semantic segmentation (SceneParsing, 150 classes) from detectron2's converted labels:

    ADEChallengeData2016/
      images/{training,validation}/ADE_*.jpg
      annotations_detectron2/{training,validation}/ADE_*.png   labels 0..149, 255 void

``datasets/prepare_ade20k_sem_seg.py`` writes ``annotations_detectron2`` from the raw release.
Registered as ``ade20k_semantic_{train,val}`` (detectron2 itself owns ``ade20k_sem_seg_*``); the
class names and colours are those of the panoptic table, so both tasks share one label space.
"""

from .common import register_sem_seg
from .register_ade20k_panoptic import ADE20K_SPLITS, ade20k_150_categories

__all__ = ["ade20k_semantic_metadata", "register_all_ade20k_semantic"]

PREPARE_HINT = (
    "python datasets/prepare_ade20k_sem_seg.py (needs the raw ADEChallengeData2016 release; see "
    "datasets/README.md)"
)


def ade20k_semantic_metadata() -> dict:
    """
    Returns:
        dict: ``stuff_classes`` and ``stuff_colors`` of the 150 classes (index = label value).
    """
    categories = ade20k_150_categories()
    return {
        "stuff_classes": [c["name"] for c in categories],
        "stuff_colors": [list(c["color"]) for c in categories],
    }


def register_all_ade20k_semantic() -> None:
    """Register ``ade20k_semantic_train`` and ``ade20k_semantic_val``."""
    for split, folder in ADE20K_SPLITS.items():
        register_sem_seg(
            f"ade20k_semantic_{split}",
            metadata=ade20k_semantic_metadata(),
            image_root=f"ADEChallengeData2016/images/{folder}",
            sem_seg_root=f"ADEChallengeData2016/annotations_detectron2/{folder}",
            prepare_hint=PREPARE_HINT,
        )


register_all_ade20k_semantic()
