"""
COCO 2017 panoptic (133 classes: 80 things, 53 stuff) in Mask2Former's layout:

    coco/
      {train,val}2017/*.jpg
      panoptic_{train,val}2017/*.png                 panoptic PNGs from the COCO panoptic release
      annotations/panoptic_{train,val}2017.json      COCO panoptic json (category ids 1..200)
      panoptic_semseg_{train,val}2017/*.png          semantic maps, label = index in the 133-class
                                                     list, 255 void

Registered as ``comformer_coco_panoptic_{train,val}`` (detectron2 owns ``coco_2017_*_panoptic*``).
Categories come from detectron2's ``COCO_CATEGORIES``, so no download is needed for the metadata.
"""

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from .common import panoptic_metadata, register_panoptic

__all__ = ["coco_panoptic_metadata", "register_all_coco_panoptic"]

PREPARE_HINT = (
    "download COCO 2017 images and panoptic annotations into coco/ and write the semantic maps "
    "panoptic_semseg_{train,val}2017 (see datasets/README.md, COCO panoptic)"
)


def coco_panoptic_metadata() -> dict:
    """Metadata of the 133 COCO panoptic classes, see :func:`~.common.panoptic_metadata`."""
    return panoptic_metadata([dict(c) for c in COCO_CATEGORIES])


def register_all_coco_panoptic() -> None:
    """Register ``comformer_coco_panoptic_train`` and ``comformer_coco_panoptic_val``."""
    for split in ("train", "val"):
        register_panoptic(
            f"comformer_coco_panoptic_{split}",
            metadata=coco_panoptic_metadata(),
            image_root=f"coco/{split}2017",
            panoptic_root=f"coco/panoptic_{split}2017",
            panoptic_json=f"coco/annotations/panoptic_{split}2017.json",
            sem_seg_root=f"coco/panoptic_semseg_{split}2017",
            prepare_hint=PREPARE_HINT,
        )


register_all_coco_panoptic()
