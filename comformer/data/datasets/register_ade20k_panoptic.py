"""
ADE20K panoptic (SceneParsing 150 classes: 100 things, 50 stuff) in Mask2Former's layout, as written
by ``datasets/prepare_ade20k_pan_seg.py``:

    ADEChallengeData2016/
      images/{training,validation}/ADE_*.jpg
      ade20k_panoptic_{train,val}/ADE_*.png        panoptic PNGs (segment id = R + 256 G + 256^2 B)
      ade20k_panoptic_{train,val}.json             COCO panoptic json, category ids 0..149
      annotations_detectron2/{training,validation}/ADE_*.png   semantic maps 0..149, 255 void

The json's category ids equal the contiguous class index (0..149, the order of the SceneParsing
release minus its "other" label 0), so the dataset id -> contiguous id maps are the identity.
"""

import copy
import functools
import json
from pathlib import Path
from typing import List

from .common import panoptic_metadata, register_panoptic

__all__ = ["ADE20K_CATEGORIES_FILE", "ade20k_150_categories", "register_all_ade20k_panoptic"]

# The table ships with the package so metadata exists without the data.
ADE20K_CATEGORIES_FILE = Path(__file__).with_name("ade20k_150_panoptic_categories.json")

# split name -> folder name in the ADE20K release
ADE20K_SPLITS = {"train": "training", "val": "validation"}

PREPARE_HINT = (
    "python datasets/prepare_ade20k_sem_seg.py && python datasets/prepare_ade20k_pan_seg.py "
    "(raw ADEChallengeData2016 with annotations_instance/ needed; see datasets/README.md)"
)


@functools.lru_cache(maxsize=None)
def _read_categories() -> tuple:
    with open(ADE20K_CATEGORIES_FILE) as f:
        categories = json.load(f)
    if [c.get("id") for c in categories] != list(range(150)):
        raise ValueError(
            f"{ADE20K_CATEGORIES_FILE} must list the 150 categories with ids 0..149 in order"
        )
    return tuple(categories)


def ade20k_150_categories() -> List[dict]:
    """
    Returns:
        list[dict]: the 150 ADE20K categories in contiguous order, each with ``id`` (0..149),
        ``name`` (as published, trailing spaces included), ``isthing`` and ``color``. A fresh copy.
    """
    return copy.deepcopy(list(_read_categories()))


def register_all_ade20k_panoptic() -> None:
    """Register ``ade20k_panoptic_train`` and ``ade20k_panoptic_val``."""
    for split, folder in ADE20K_SPLITS.items():
        register_panoptic(
            f"ade20k_panoptic_{split}",
            metadata=panoptic_metadata(ade20k_150_categories()),
            image_root=f"ADEChallengeData2016/images/{folder}",
            panoptic_root=f"ADEChallengeData2016/ade20k_panoptic_{split}",
            panoptic_json=f"ADEChallengeData2016/ade20k_panoptic_{split}.json",
            sem_seg_root=f"ADEChallengeData2016/annotations_detectron2/{folder}",
            prepare_hint=PREPARE_HINT,
        )


register_all_ade20k_panoptic()
