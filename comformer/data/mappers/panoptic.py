"""Panoptic training mapper: image + panoptic PNG -> one binary mask per (non-crowd) segment."""

from typing import Sequence

import numpy as np
from panopticapi.utils import rgb2id

from .build import MAPPER_REGISTRY, BadSampleError, SegmentationMapperBase, make_instances

__all__ = ["PanopticDatasetMapper", "check_segment_ids"]


def check_segment_ids(
    pan_ids: np.ndarray, segments_info: Sequence[dict], pan_seg_file: str
) -> None:
    """
    The segment ids painted in a panoptic PNG must be exactly those its ``segments_info`` lists:
    an unlisted id would silently turn its pixels into void (no-object), a listed id without pixels
    would be an empty target mask.

    Args:
        pan_ids: (H, W) segment ids of the PNG (0 is void).
        segments_info: the record's segments, each with ``id``.
        pan_seg_file: the PNG, named in the error.

    Raises:
        BadSampleError: naming the PNG and the ids on either side.
    """
    # Segments are regions: unique values over the starts of runs equal the unique values of the
    # whole map, at a fraction of the sorting work.
    flat = pan_ids.ravel()
    run_starts = flat[np.concatenate(([True], flat[1:] != flat[:-1]))]
    present = np.unique(run_starts)
    present = present[present != 0]
    listed = np.asarray([s["id"] for s in segments_info], dtype=np.int64)
    unlisted = np.setdiff1d(present, listed)
    empty = np.setdiff1d(listed, present)
    if unlisted.size or empty.size:
        faults = []
        if unlisted.size:
            faults.append(f"ids {unlisted[:10].tolist()} are painted but not in segments_info")
        if empty.size:
            faults.append(f"ids {empty[:10].tolist()} of segments_info have no pixel")
        raise BadSampleError(
            f"panoptic PNG {pan_seg_file} disagrees with its segments_info: {'; '.join(faults)} "
            f"(painted: {present[:20].tolist()}, listed: {listed[:20].tolist()})"
        )


@MAPPER_REGISTRY.register()
class PanopticDatasetMapper(SegmentationMapperBase):
    """
    Reads a record in Mask2Former's panoptic format (``file_name``, ``pan_seg_file_name``,
    ``segments_info`` with contiguous ``category_id``, optional ``sem_seg_file_name``) and returns
    ``image`` (C, H, W) uint8, ``sem_seg`` (H, W) int64 when a semantic file exists, and
    ``instances`` with ``gt_classes`` and ``gt_masks``. The PNG's segment ids are checked against
    ``segments_info`` both ways before augmentation (a crop may legitimately remove segments).
    """

    def map_record(self, dataset_dict: dict) -> dict:
        image, sem_seg = self.read_image_and_label(dataset_dict, "sem_seg_file_name")
        pan_seg_file = dataset_dict.pop("pan_seg_file_name", None)
        if pan_seg_file is None:
            raise KeyError(
                f"record for {dataset_dict['file_name']} has no 'pan_seg_file_name'; the panoptic "
                "mapper needs panoptic annotations"
            )
        pan_seg = self.read_file(pan_seg_file, "RGB", "panoptic PNG")
        self.check_same_size(pan_seg, pan_seg_file, image, dataset_dict["file_name"])
        check_segment_ids(rgb2id(pan_seg), dataset_dict["segments_info"], pan_seg_file)
        # Class ids are checked for every segment, crowd and removed classes included.
        labels = [self.map_class(s["category_id"]) for s in dataset_dict["segments_info"]]
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
        for segment, label in zip(dataset_dict["segments_info"], labels):
            if segment.get("iscrowd", 0) or label < 0:
                continue
            classes.append(label)
            masks.append(pan_padded == segment["id"])
        dataset_dict["instances"] = make_instances(padded_shape, classes, masks)
        return dataset_dict
