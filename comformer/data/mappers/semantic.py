"""Semantic training mapper: image + label map -> one binary mask per class present."""

import numpy as np

from .build import MAPPER_REGISTRY, SegmentationMapperBase, make_instances

__all__ = ["SemanticDatasetMapper"]


@MAPPER_REGISTRY.register()
class SemanticDatasetMapper(SegmentationMapperBase):
    """
    Reads ``file_name`` and ``sem_seg_file_name`` and returns ``image`` (C, H, W) uint8,
    ``sem_seg`` (H, W) int64 and ``instances`` (one mask per class present, ignore label excluded).
    """

    def map_record(self, dataset_dict: dict) -> dict:
        image, sem_seg = self.read_image_and_label(dataset_dict, "sem_seg_file_name")
        if sem_seg is None:
            raise KeyError(
                f"record for {dataset_dict['file_name']} has no 'sem_seg_file_name'; the semantic "
                "mapper needs semantic annotations"
            )
        image, sem_seg, _ = self.augment(image, sem_seg.astype("double"))
        image_t, sem_t = self.to_tensors(image, self.map_semantic(sem_seg))
        dataset_dict["image"] = image_t
        dataset_dict["sem_seg"] = sem_t

        sem_np = sem_t.numpy()
        classes = [int(c) for c in np.unique(sem_np) if c != self.ignore_label]
        masks = [sem_np == c for c in classes]
        dataset_dict["instances"] = make_instances(tuple(sem_np.shape), classes, masks)
        return dataset_dict
