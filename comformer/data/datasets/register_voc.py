"""
Pascal VOC 2012 semantic segmentation (21 classes, background = 0, 255 void) with the augmented
training set of Hariharan et al. (SBD), split as in MiB and most continual segmentation papers:

    VOC2012/
      JPEGImages/*.jpg
      SegmentationClassAug/*.png                 label maps for train_aug and val (0..20, 255)
      ImageSets/Segmentation/train_aug.txt       10582 training images
      ImageSets/Segmentation/val.txt             1449 validation images

Registered as ``voc_sem_seg_train`` (train_aug) and ``voc_sem_seg_val``. A list line is either an
image id (``2007_000032``: image JPEGImages/<id>.jpg, label SegmentationClassAug/<id>.png) or, as
in MiB's split files, two paths relative to VOC2012
(``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``).
"""

import os
from typing import List

from detectron2.data import DatasetCatalog

from .common import check_files_exist, data_root, resolve_data_root, set_sem_seg_metadata

__all__ = ["VOC_CLASSES", "voc_colormap", "load_voc_list", "register_all_voc"]

VOC_CLASSES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]

VOC_ROOT = "VOC2012"
VOC_SPLITS = {
    "train": "ImageSets/Segmentation/train_aug.txt",
    "val": "ImageSets/Segmentation/val.txt",
}

PREPARE_HINT = (
    "put the VOC2012 release under VOC2012/ and add SegmentationClassAug/ and "
    "ImageSets/Segmentation/train_aug.txt from the SBD-augmented set (see datasets/README.md, "
    "Pascal VOC)"
)


def voc_colormap(num_classes: int = len(VOC_CLASSES)) -> List[List[int]]:
    """
    The palette of VOC's label PNGs: the bits of the class index, taken three at a time, fill the
    R, G and B channels from their most significant bit down.
    """
    colors = []
    for index in range(num_classes):
        rgb = [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
        colors.append(rgb)
    return colors


def load_voc_list(
    list_file: str,
    voc_root: str,
    *,
    image_dir: str = "JPEGImages",
    gt_dir: str = "SegmentationClassAug",
    prepare_hint: str = PREPARE_HINT,
) -> List[dict]:
    """
    Args:
        list_file: the split's list file (one image id, or an image and a label path, per line).
        voc_root: the VOC2012 folder; paths in the list are relative to it.
        image_dir, gt_dir: folders (under ``voc_root``) of images and labels for id-only lines.
        prepare_hint: quoted in errors.

    Returns:
        list[dict]: ``file_name``, ``sem_seg_file_name``, ``image_id`` (the image's stem), in the
        order of the list file (continual splits index images by their position in it).

    Raises:
        FileNotFoundError: the list file or a listed image/label does not exist.
        ValueError: a line has more than two fields, or the list is empty.
    """
    if not os.path.isfile(list_file):
        raise FileNotFoundError(
            f"list file {list_file} does not exist; to prepare the data: {prepare_hint}"
        )
    records = []
    with open(list_file) as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) == 1:
                image = os.path.join(voc_root, image_dir, fields[0] + ".jpg")
                label = os.path.join(voc_root, gt_dir, fields[0] + ".png")
            elif len(fields) == 2:
                # MiB writes the paths with a leading "/", which os.path.join would treat as root
                image, label = (os.path.join(voc_root, p.lstrip("/")) for p in fields)
            else:
                raise ValueError(
                    f"{list_file}:{line_no}: expected an image id or 'image_path label_path', got "
                    f"{line.strip()!r}"
                )
            records.append(
                {
                    "file_name": image,
                    "sem_seg_file_name": label,
                    "image_id": os.path.splitext(os.path.basename(image))[0],
                }
            )
    if not records:
        raise ValueError(f"{list_file} lists no images")
    check_files_exist([r["file_name"] for r in records], "image", prepare_hint)
    check_files_exist([r["sem_seg_file_name"] for r in records], "label", prepare_hint)
    return records


def register_all_voc() -> None:
    """Register ``voc_sem_seg_train`` (train_aug) and ``voc_sem_seg_val``."""
    root = data_root()
    for split, list_file in VOC_SPLITS.items():
        name = f"voc_sem_seg_{split}"

        def load(list_file: str = list_file) -> List[dict]:
            voc_root = os.path.join(resolve_data_root(PREPARE_HINT), VOC_ROOT)
            return load_voc_list(os.path.join(voc_root, list_file), voc_root)

        DatasetCatalog.register(name, load)
        set_sem_seg_metadata(
            name,
            # background_class: continual scenarios keep it in every step and count the other 20
            # classes in task names ("15-5" = background + 15, then 5), as MiB does.
            metadata={
                "stuff_classes": list(VOC_CLASSES),
                "stuff_colors": voc_colormap(),
                "background_class": 0,
            },
            image_root=os.path.join(root, VOC_ROOT, "JPEGImages"),
            sem_seg_root=os.path.join(root, VOC_ROOT, "SegmentationClassAug"),
            evaluator_type="sem_seg",
        )


register_all_voc()
