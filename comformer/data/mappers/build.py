"""Mapper registry and the helpers both mappers share (augmentation, padding, instance targets)."""
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.projects.point_rend import ColorAugSSDTransform
from detectron2.structures import BitMasks, Instances
from detectron2.utils.registry import Registry

__all__ = [
    "MAPPER_REGISTRY",
    "build_train_mapper",
    "build_augmentation",
    "pad_to_divisibility",
    "make_instances",
    "SegmentationMapperBase",
]

MAPPER_REGISTRY = Registry("MAPPER")
MAPPER_REGISTRY.__doc__ = """
Training dataset mappers. A member is a class built as ``Mapper(cfg, is_train=True)`` whose instances
turn one dataset dict into the model's input dict (``image``, ``sem_seg``, ``instances``).
"""

# Which mapper a dataset gets when INPUT.DATASET_MAPPER_NAME is empty, by its evaluator_type.
_MAPPER_BY_EVALUATOR_TYPE = {
    "coco_panoptic_seg": "PanopticDatasetMapper",
    "sem_seg": "SemanticDatasetMapper",
}


def build_train_mapper(cfg, dataset_name: Optional[str] = None, **kwargs):
    """
    Args:
        cfg: the config; INPUT.DATASET_MAPPER_NAME names the mapper, or "" to choose it from the
            first training dataset's ``evaluator_type``.
        dataset_name: dataset whose metadata decides the mapper (default: cfg.DATASETS.TRAIN[0]).
        kwargs: constructor arguments that override the config's (e.g. ``label_map``).
    Returns:
        a callable mapper.
    """
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if not name:
        dataset_name = dataset_name or cfg.DATASETS.TRAIN[0]
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type not in _MAPPER_BY_EVALUATOR_TYPE:
            raise ValueError(
                f"dataset {dataset_name!r} has evaluator_type={evaluator_type!r}; cannot choose a "
                f"mapper for it (known: {sorted(_MAPPER_BY_EVALUATOR_TYPE)}); set "
                f"INPUT.DATASET_MAPPER_NAME to one of {sorted(MAPPER_REGISTRY._obj_map)}"
            )
        name = _MAPPER_BY_EVALUATOR_TYPE[evaluator_type]
    if name not in MAPPER_REGISTRY:
        raise KeyError(
            f"INPUT.DATASET_MAPPER_NAME={name!r} is not registered; valid: "
            f"{sorted(MAPPER_REGISTRY._obj_map)}"
        )
    return MAPPER_REGISTRY.get(name)(cfg, is_train=True, **kwargs)


def build_augmentation(cfg, is_train: bool = True) -> List[T.Augmentation]:
    """Mask2Former's training augmentation: random resize, crop with a category-area constraint,
    optional SSD colour jitter, horizontal flip."""
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
    augs: List[T.Augmentation] = [
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    ]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(
            T.RandomCrop_CategoryAreaConstraint(
                cfg.INPUT.CROP.TYPE,
                cfg.INPUT.CROP.SIZE,
                cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("ignore_label", 255)
                if cfg.DATASETS.TRAIN
                else 255,
            )
        )
    if cfg.INPUT.COLOR_AUG_SSD:
        augs.append(ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT))
    augs.append(T.RandomFlip())
    return augs


def pad_to_divisibility(
    image: torch.Tensor,
    segmentations: Sequence[Optional[torch.Tensor]],
    size_divisibility: int,
    ignore_label: int,
):
    """Pad an image (C, H, W) with 128 and label maps (H, W) with ``ignore_label`` at the bottom and
    right to a multiple of ``size_divisibility`` (no-op if <= 0). ``None`` maps stay ``None``."""
    if size_divisibility <= 0:
        return image, list(segmentations)
    h, w = image.shape[-2:]
    pad = [0, (-w) % size_divisibility, 0, (-h) % size_divisibility]
    image = F.pad(image, pad, value=128).contiguous()
    padded = [None if s is None else F.pad(s, pad, value=ignore_label).contiguous() for s in segmentations]
    return image, padded


def make_instances(image_shape, classes: Sequence[int], masks: Sequence[np.ndarray]) -> Instances:
    """Instances with ``gt_classes`` (N,) int64 and ``gt_masks`` (N, H, W) BitMasks; N may be 0."""
    instances = Instances(image_shape)
    instances.gt_classes = torch.tensor(list(classes), dtype=torch.int64)
    if len(masks) == 0:
        instances.gt_masks = BitMasks(torch.zeros((0, image_shape[0], image_shape[1]), dtype=torch.bool))
    else:
        instances.gt_masks = BitMasks(torch.stack([torch.from_numpy(np.ascontiguousarray(m)) for m in masks]))
    return instances


class SegmentationMapperBase:
    """
    What both training mappers share: reading the image and its label map, the augmentation, the
    padding. Subclasses implement ``__call__``.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: list,
        image_format: str,
        ignore_label: int,
        size_divisibility: int,
        label_map: Optional[np.ndarray] = None,
    ):
        """
        Args:
            is_train: training mode (the mappers are for training; evaluation uses detectron2's).
            augmentations: detectron2 augmentations applied to image and label maps together.
            image_format: detectron2 image format, e.g. "RGB".
            ignore_label: label of void pixels in semantic maps (also used for padding).
            size_divisibility: pad to a multiple of this (<= 0: no padding).
            label_map: (K,) int64, the training label of each dataset class id, -1 for a class that
                is not a target (continual steps; see ``Scenario.label_map``). None: labels as is.
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.ignore_label = ignore_label
        self.size_divisibility = size_divisibility
        self.label_map = None if label_map is None else np.asarray(label_map, dtype=np.int64)
        if self.label_map is not None:
            # Lookup table for label maps: removed classes and unknown values become ignore.
            lut = np.full(max(256, len(self.label_map) + 1), ignore_label, dtype=np.int64)
            lut[: len(self.label_map)] = np.where(self.label_map >= 0, self.label_map, ignore_label)
            self._semantic_lut = lut

    def map_class(self, category_id: int) -> int:
        """Training label of a dataset class id; -1 when the class is not a target."""
        if self.label_map is None:
            return category_id
        if not 0 <= category_id < len(self.label_map):
            raise ValueError(
                f"class id {category_id} is outside the dataset's classes 0..{len(self.label_map) - 1}"
            )
        return int(self.label_map[category_id])

    def map_semantic(self, sem_seg: np.ndarray) -> np.ndarray:
        """Apply the label map to a semantic label map (ignore stays ignore)."""
        if self.label_map is None:
            return sem_seg
        return self._semantic_lut[sem_seg.astype(np.int64)]

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
        return {
            "is_train": is_train,
            "augmentations": build_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": meta.get("ignore_label", 255),
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
        }

    def read_image_and_label(self, dataset_dict: dict, label_key: str, label_format=None):
        """Read ``file_name`` and the label file under ``label_key`` (None if absent), checking sizes."""
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        label_file = dataset_dict.pop(label_key, None)
        if label_file is None:
            return image, None
        label = utils.read_image(label_file, label_format)
        if label.shape[:2] != image.shape[:2]:
            raise ValueError(
                f"annotation {label_file} is {label.shape[1]}x{label.shape[0]} but image "
                f"{dataset_dict['file_name']} is {image.shape[1]}x{image.shape[0]}"
            )
        return image, label

    def augment(self, image: np.ndarray, sem_seg: Optional[np.ndarray]):
        """Returns the augmented image, semantic map (or None) and the transforms applied."""
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        return aug_input.image, aug_input.sem_seg, transforms

    def to_tensors(self, image: np.ndarray, sem_seg: Optional[np.ndarray]):
        """(H, W, C) image and (H, W) label map -> padded (C, H, W) uint8 and (H, W) int64 tensors."""
        image_t = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        sem_t = None if sem_seg is None else torch.as_tensor(sem_seg.astype("long"))
        image_t, (sem_t,) = pad_to_divisibility(
            image_t, [sem_t], self.size_divisibility, self.ignore_label
        )
        return image_t, sem_t
