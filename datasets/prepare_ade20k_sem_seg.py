#!/usr/bin/env python
"""
Convert the ADE20K SceneParsing labels to detectron2's convention.

The release labels pixels 0..150 with 0 = "other" (not one of the 150 classes); detectron2 and
Mask2Former train on 0..149 with 255 = void, so every label is shifted down by one and 0 becomes
255. Reads and writes, under DATA_ROOT:

    ADEChallengeData2016/annotations/{training,validation}/ADE_*.png             input, 0..150
    ADEChallengeData2016/annotations_detectron2/{training,validation}/ADE_*.png  output, 0..149, 255

Usage:
    python datasets/prepare_ade20k_sem_seg.py [DATA_ROOT]

DATA_ROOT defaults to $DETECTRON2_DATASETS, else the folder of this script. Nothing is downloaded.
"""

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
from PIL import Image

ADE_FOLDER = "ADEChallengeData2016"
SPLIT_FOLDERS = ("training", "validation")
NUM_CLASSES = 150
IGNORE_LABEL = 255


def default_root() -> str:
    return os.environ.get("DETECTRON2_DATASETS") or str(Path(__file__).resolve().parent)


def read_label_png(path: str) -> np.ndarray:
    """A single-channel label PNG as an (H, W) uint8 array (palette PNGs give their indices)."""
    with Image.open(path) as img:
        if img.mode not in ("L", "P"):
            raise ValueError(
                f"{path}: expected a single-channel label PNG (mode L or P), got {img.mode}"
            )
        return np.array(img)


def convert_label(label: np.ndarray, source: str = "label") -> np.ndarray:
    """
    Args:
        label: (H, W) uint8 in the release's convention, 0 = other, 1..150 = classes.
        source: named in the error.
    Returns:
        (H, W) uint8, classes 0..149 and 255 where the input was 0.
    Raises:
        ValueError: a value above 150.
    """
    if label.size and int(label.max()) > NUM_CLASSES:
        raise ValueError(
            f"{source}: label value {int(label.max())} is not an ADE20K class (valid: 0 = other, "
            f"1..{NUM_CLASSES})"
        )
    return np.where(label == 0, IGNORE_LABEL, label.astype(np.int16) - 1).astype(np.uint8)


def convert_split(root: str, folder: str, log_every: int = 1000) -> int:
    """Convert one split folder; returns the number of files written."""
    src_dir = os.path.join(root, ADE_FOLDER, "annotations", folder)
    dst_dir = os.path.join(root, ADE_FOLDER, "annotations_detectron2", folder)
    if not os.path.isdir(src_dir):
        raise FileNotFoundError(
            f"{src_dir} does not exist: extract ADEChallengeData2016.zip (the SceneParsing "
            f"release) into {root}"
        )
    names = sorted(n for n in os.listdir(src_dir) if n.endswith(".png"))
    if not names:
        raise FileNotFoundError(f"no .png label maps in {src_dir}")
    os.makedirs(dst_dir, exist_ok=True)
    print(f"[{folder}] {len(names)} label maps: {src_dir} -> {dst_dir}", flush=True)
    for i, name in enumerate(names, start=1):
        src = os.path.join(src_dir, name)
        Image.fromarray(convert_label(read_label_png(src), src)).save(os.path.join(dst_dir, name))
        if i % log_every == 0 or i == len(names):
            print(f"[{folder}] {i}/{len(names)}", flush=True)
    return len(names)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "root", nargs="?", default=None, help="data root holding ADEChallengeData2016/"
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        default=list(SPLIT_FOLDERS),
        choices=SPLIT_FOLDERS,
        help="folders to convert",
    )
    args = parser.parse_args(argv)
    root = args.root or default_root()
    try:
        for folder in args.splits:
            convert_split(root, folder)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
