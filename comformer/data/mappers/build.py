"""Mapper registry and the helpers both mappers share (augmentation, padding, instance targets, and
the checks that turn a bad training sample into a clear error, or into a counted skip)."""

import copy
import logging
import multiprocessing
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
    "BadSampleError",
    "MAPPER_REGISTRY",
    "build_train_mapper",
    "build_augmentation",
    "pad_to_divisibility",
    "make_instances",
    "SegmentationMapperBase",
]

logger = logging.getLogger(__name__)


class BadSampleError(ValueError):
    """
    A training sample that cannot be used as it is: a file that cannot be read or decoded, or an
    annotation that contradicts its files (sizes, segment ids, class ids). The message names the
    file and the fault. Mappers raise it, or skip the sample when built with ``skip_bad_samples``.
    """


MAPPER_REGISTRY = Registry("MAPPER")
MAPPER_REGISTRY.__doc__ = """
Training dataset mappers. A member is a class built as ``Mapper(cfg, is_train=True)`` whose instances
turn one dataset dict into the model's input dict (``image``, ``sem_seg``, ``instances``), or into
None for a bad sample skipped under INPUT.SKIP_BAD_SAMPLES.
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
                (
                    MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("ignore_label", 255)
                    if cfg.DATASETS.TRAIN
                    else 255
                ),
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
    padded = [
        None if s is None else F.pad(s, pad, value=ignore_label).contiguous() for s in segmentations
    ]
    return image, padded


def make_instances(image_shape, classes: Sequence[int], masks: Sequence[np.ndarray]) -> Instances:
    """Instances with ``gt_classes`` (N,) int64 and ``gt_masks`` (N, H, W) BitMasks; N may be 0."""
    instances = Instances(image_shape)
    instances.gt_classes = torch.tensor(list(classes), dtype=torch.int64)
    if len(masks) == 0:
        instances.gt_masks = BitMasks(
            torch.zeros((0, image_shape[0], image_shape[1]), dtype=torch.bool)
        )
    else:
        instances.gt_masks = BitMasks(
            torch.stack([torch.from_numpy(np.ascontiguousarray(m)) for m in masks])
        )
    return instances


class SegmentationMapperBase:
    """
    What both training mappers share: reading the image and its label map with checks, the
    augmentation, the padding, and the handling of bad samples. Subclasses implement
    ``map_record(dataset_dict)`` on a private copy of the record; calling the mapper runs it.

    A bad sample (:class:`BadSampleError`) stops training with the error, or, with
    ``skip_bad_samples``, is logged as a warning, counted in :attr:`num_skipped` and mapped to None,
    which the training loader drops.
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
        num_classes: Optional[int] = None,
        skip_bad_samples: bool = False,
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
            num_classes: K, the dataset's classes: class ids and label-map values must be below
                it (or the ignore label). None: taken from ``label_map``, else not checked.
            skip_bad_samples: skip a bad sample (warning, counted) instead of raising.
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.ignore_label = ignore_label
        self.size_divisibility = size_divisibility
        self.label_map = None if label_map is None else np.asarray(label_map, dtype=np.int64)
        if num_classes is None and self.label_map is not None:
            num_classes = len(self.label_map)
        if self.label_map is not None and num_classes != len(self.label_map):
            raise ValueError(
                f"label_map has {len(self.label_map)} entries but the dataset has {num_classes} "
                "classes: the label map must give a training label to every class id"
            )
        self.num_classes = num_classes
        self.skip_bad_samples = skip_bad_samples
        # Shared memory, so that skips made in data-loader worker processes are counted here too.
        self._num_skipped = multiprocessing.Value("q", 0)
        if self.label_map is not None:
            # Lookup table for label maps: removed classes and unknown values become ignore.
            lut = np.full(max(256, len(self.label_map) + 1), ignore_label, dtype=np.int64)
            lut[: len(self.label_map)] = np.where(self.label_map >= 0, self.label_map, ignore_label)
            self._semantic_lut = lut

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
        classes = meta.get("stuff_classes", None)
        return {
            "is_train": is_train,
            "augmentations": build_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": meta.get("ignore_label", 255),
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "num_classes": None if classes is None else len(classes),
            "skip_bad_samples": cfg.INPUT.SKIP_BAD_SAMPLES,
        }

    # ------------------------------------------------------------------ bad samples
    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        try:
            return self.map_record(copy.deepcopy(dataset_dict))
        except BadSampleError as e:
            if not self.skip_bad_samples:
                raise
            with self._num_skipped.get_lock():
                self._num_skipped.value += 1
                count = self._num_skipped.value
            logger.warning(f"Skipped bad training sample (#{count}, INPUT.SKIP_BAD_SAMPLES): {e}")
            return None

    def map_record(self, dataset_dict: dict) -> dict:
        """Map one record (a copy the mapper may change); raise BadSampleError for a bad one."""
        raise NotImplementedError

    @property
    def num_skipped(self) -> int:
        """Bad samples skipped so far, by this mapper and its copies in data-loader workers."""
        return int(self._num_skipped.value)

    # ------------------------------------------------------------------ labels
    def map_class(self, category_id: int) -> int:
        """Training label of a dataset class id; -1 when the class is not a target."""
        if self.num_classes is not None and not 0 <= category_id < self.num_classes:
            raise BadSampleError(
                f"class id {category_id} is outside the dataset's classes 0..{self.num_classes - 1}"
            )
        if self.label_map is None:
            return category_id
        return int(self.label_map[category_id])

    def map_semantic(self, sem_seg: np.ndarray) -> np.ndarray:
        """Apply the label map to a semantic label map (ignore stays ignore)."""
        if self.label_map is None:
            return sem_seg
        return self._semantic_lut[sem_seg.astype(np.int64)]

    def check_semantic_labels(self, sem_seg: np.ndarray, label_file: str) -> None:
        """
        Raise BadSampleError unless ``sem_seg`` is a single-channel (H, W) map of class ids below
        ``num_classes`` or the ignore label: any other value would become a wrong target in silence.
        """
        if sem_seg.ndim != 2:
            raise BadSampleError(
                f"semantic label map {label_file} has shape {sem_seg.shape}; it must be a "
                "single-channel image of class ids"
            )
        if self.num_classes is None or int(sem_seg.max(initial=0)) < self.num_classes:
            return
        bad = np.unique(sem_seg[(sem_seg >= self.num_classes) & (sem_seg != self.ignore_label)])
        if bad.size:
            raise BadSampleError(
                f"semantic label map {label_file} holds values {bad[:10].tolist()} that are neither "
                f"class ids 0..{self.num_classes - 1} nor the ignore label {self.ignore_label}"
            )

    # ------------------------------------------------------------------ reading
    @staticmethod
    def read_file(path: str, image_format, what: str) -> np.ndarray:
        """``detectron2.data.detection_utils.read_image`` with errors that name ``what`` and ``path``."""
        try:
            return utils.read_image(path, format=image_format)
        except FileNotFoundError as e:
            raise BadSampleError(f"{what} {path} does not exist (anymore)") from e
        # PIL reports undecodable or truncated files as OSError (UnidentifiedImageError is one),
        # and some broken PNG chunks as SyntaxError.
        except (OSError, SyntaxError, ValueError) as e:
            raise BadSampleError(
                f"cannot decode {what} {path} (corrupt or truncated file?): {type(e).__name__}: {e}"
            ) from e

    def read_image_and_label(self, dataset_dict: dict, label_key: str, label_format=None):
        """
        Read ``file_name`` and the semantic label file under ``label_key`` (None if absent), and
        check them: readable, image size as the record says, label map of the image's size and of
        valid values.
        """
        image = self.read_file(dataset_dict["file_name"], self.image_format, "image")
        try:
            utils.check_image_size(dataset_dict, image)
        except utils.SizeMismatchError as e:
            raise BadSampleError(f"{e} (the size recorded in the annotation json)") from e
        label_file = dataset_dict.pop(label_key, None)
        if label_file is None:
            return image, None
        label = self.read_file(label_file, label_format, "semantic label map")
        self.check_same_size(label, label_file, image, dataset_dict["file_name"])
        self.check_semantic_labels(label, label_file)
        return image, label

    @staticmethod
    def check_same_size(label: np.ndarray, label_file: str, image: np.ndarray, image_file: str):
        if label.shape[:2] != image.shape[:2]:
            raise BadSampleError(
                f"annotation {label_file} is {label.shape[1]}x{label.shape[0]} but image "
                f"{image_file} is {image.shape[1]}x{image.shape[0]}"
            )

    # ------------------------------------------------------------------ augmentation
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
