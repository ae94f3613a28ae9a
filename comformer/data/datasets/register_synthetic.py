"""Register the built-in synthetic datasets (each generated on first use, see ``synthetic.py`` and
``synthetic_shapes.py``).

Names:

- ``synthetic_shapes_panoptic_{train,val}`` (panoptic + semantic ground truth, PQ and mIoU) and
  ``synthetic_shapes_sem_seg_{train,val}`` (semantic only): the benchmark, 20 classes that are each
  a new kind of object (``ShapesSpec``), 2000 / 200 images of 96 px.
- ``synthetic_voc_sem_seg_{train,val}``: semantic with a background class (class 0, metadata
  ``background_class`` as Pascal VOC's registration), 12 object classes (``VocSpec``), 300 / 60
  images of 64 px.
- ``synthetic_panoptic_{train,val}`` and ``synthetic_sem_seg_{train,val}``: the first synthetic set
  (``SyntheticSpec``), whose classes share colours, shapes and textures: a hard case.
"""

import os
from typing import Optional

from .common import data_root, panoptic_metadata, register_panoptic, register_sem_seg
from .synthetic import GeneratorSpec, SyntheticSpec, ensure_generated
from .synthetic_shapes import ShapesSpec, VocSpec

__all__ = ["SYNTHETIC_SPEC", "SHAPES_SPEC", "VOC_SPEC", "synthetic_folder"]

# The registered datasets are made with the default specs; other specs are for tests and studies.
SYNTHETIC_SPEC = SyntheticSpec()
SHAPES_SPEC = ShapesSpec()
VOC_SPEC = VocSpec()


def synthetic_folder(spec: GeneratorSpec = SYNTHETIC_SPEC) -> str:
    """The folder of a registered synthetic dataset under the current data root."""
    return os.path.join(data_root(), spec.default_folder)


def _register(prefix: str, spec: GeneratorSpec, panoptic: bool, background: Optional[int]) -> None:
    """
    Register ``<prefix>_sem_seg_{train,val}`` and, if ``panoptic``, ``<prefix>_panoptic_{train,val}``
    over the files of ``spec``, generated into its folder on first load.
    """
    folder = spec.default_folder
    hint = f"python -m comformer.data.datasets.synthetic --kind {spec.kind}"

    def ensure() -> None:
        ensure_generated(synthetic_folder(spec), spec)

    meta = panoptic_metadata(spec.categories())
    sem_meta = {"stuff_classes": meta["stuff_classes"], "stuff_colors": meta["stuff_colors"]}
    if background is not None:
        # As Pascal VOC's: continual scenarios keep it in every step, count the other classes in
        # task names, and map removed classes to it (see data/scenario.py).
        sem_meta["background_class"] = background
    for split in ("train", "val"):
        if panoptic:
            register_panoptic(
                f"{prefix}_panoptic_{split}",
                metadata=meta,
                image_root=f"{folder}/images/{split}",
                panoptic_root=f"{folder}/panoptic_{split}",
                panoptic_json=f"{folder}/panoptic_{split}.json",
                sem_seg_root=f"{folder}/semantic_{split}",
                prepare_hint=hint,
                before_load=ensure,
            )
        register_sem_seg(
            f"{prefix}_sem_seg_{split}",
            metadata=sem_meta,
            image_root=f"{folder}/images/{split}",
            sem_seg_root=f"{folder}/semantic_{split}",
            image_ext=".png",
            prepare_hint=hint,
            before_load=ensure,
        )


def _register_all() -> None:
    _register("synthetic", SYNTHETIC_SPEC, panoptic=True, background=None)
    _register("synthetic_shapes", SHAPES_SPEC, panoptic=True, background=None)
    _register("synthetic_voc", VOC_SPEC, panoptic=False, background=0)


_register_all()
