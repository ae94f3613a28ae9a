"""Panoptic training mapper: image + panoptic PNG -> one binary mask per (non-crowd) segment."""
import copy

import numpy as np
from panopticapi.utils import rgb2id

from detectron2.data import detection_utils as utils

from .build import MAPPER_REGISTRY, SegmentationMapperBase, make_instances

__all__ = ["PanopticDatasetMapper"]


@MAPPER_REGISTRY.register()
class PanopticDatasetMapper(SegmentationMapperBase):
    """
    Reads a record in Mask2Former's panoptic format (``file_name``, ``pan_seg_file_name``,
    ``segments_info`` with contiguous ``category_id``, optional ``sem_seg_file_name``) and returns
    ``image`` (C, H, W) uint8, ``sem_seg`` (H, W) int64 when a semantic file exists, and
    ``instances`` with ``gt_classes`` and ``gt_masks``.
    """

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image, sem_seg = self.read_image_and_label(dataset_dict, "sem_seg_file_name")
        pan_seg_file = dataset_dict.pop("pan_seg_file_name", None)
        if pan_seg_file is None:
            raise KeyError(
                f"record for {dataset_dict['file_name']} has no 'pan_seg_file_name'; the panoptic "
                "mapper needs panoptic annotations"
            )
        pan_seg = utils.read_image(pan_seg_file, "RGB")
        if pan_seg.shape[:2] != image.shape[:2]:
            raise ValueError(
                f"panoptic annotation {pan_seg_file} is {pan_seg.shape[1]}x{pan_seg.shape[0]} but "
                f"image {dataset_dict['file_name']} is {image.shape[1]}x{image.shape[0]}"
            )
        if sem_seg is not None:
            sem_seg = sem_seg.astype("double")

        image, sem_seg, transforms = self.augment(image, sem_seg)
        pan_seg = rgb2id(transforms.apply_segmentation(pan_seg))
        if sem_seg is not None:
            sem_seg = self.map_semantic(sem_seg)
        image_t, sem_t = self.to_tensors(image, sem_seg)
        dataset_dict["image"] = image_t
        if sem_t is not None:
            dataset_dict["sem_seg"] = sem_t

        padded_shape = tuple(image_t.shape[-2:])
        pan_padded = np.zeros(padded_shape, dtype=pan_seg.dtype)  # padding is void (id 0)
        pan_padded[: pan_seg.shape[0], : pan_seg.shape[1]] = pan_seg
        classes, masks = [], []
        for segment in dataset_dict["segments_info"]:
            label = self.map_class(segment["category_id"])
            if segment.get("iscrowd", 0) or label < 0:
                continue
            classes.append(label)
            masks.append(pan_padded == segment["id"])
        dataset_dict["instances"] = make_instances(padded_shape, classes, masks)
        return dataset_dict
