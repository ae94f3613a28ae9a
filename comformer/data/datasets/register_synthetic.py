"""Register the built-in synthetic dataset (generated on first use, see ``synthetic.py``).

Names: ``synthetic_panoptic_{train,val}`` (panoptic + semantic ground truth, PQ and mIoU) and
``synthetic_sem_seg_{train,val}`` (the same images with semantic ground truth only).
"""
import os

from .common import data_root, panoptic_metadata, register_panoptic, register_sem_seg
from .synthetic import SyntheticSpec, ensure_generated, synthetic_categories

__all__ = ["SYNTHETIC_SPEC", "synthetic_folder"]

# The registered dataset is made with the default spec; other specs are for tests and studies.
SYNTHETIC_SPEC = SyntheticSpec()
_PREPARE = "python -m comformer.data.datasets.synthetic"


def synthetic_folder() -> str:
    return os.path.join(data_root(), "synthetic")


def _ensure() -> None:
    ensure_generated(synthetic_folder(), SYNTHETIC_SPEC)


def _register_all() -> None:
    categories = synthetic_categories(SYNTHETIC_SPEC)
    meta = panoptic_metadata(categories)
    for split in ("train", "val"):
        register_panoptic(
            f"synthetic_panoptic_{split}",
            metadata=meta,
            image_root=f"synthetic/images/{split}",
            panoptic_root=f"synthetic/panoptic_{split}",
            panoptic_json=f"synthetic/panoptic_{split}.json",
            sem_seg_root=f"synthetic/semantic_{split}",
            prepare_hint=_PREPARE,
            before_load=_ensure,
        )
        register_sem_seg(
            f"synthetic_sem_seg_{split}",
            metadata={"stuff_classes": meta["stuff_classes"], "stuff_colors": meta["stuff_colors"]},
            image_root=f"synthetic/images/{split}",
            sem_seg_root=f"synthetic/semantic_{split}",
            image_ext=".png",
            prepare_hint=_PREPARE,
            before_load=_ensure,
        )


_register_all()
