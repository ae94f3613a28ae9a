#!/usr/bin/env python
"""
Build ADE20K panoptic annotations (COCO panoptic format, 150 classes) from the SceneParsing release.

Inputs under DATA_ROOT/ADEChallengeData2016, per split folder (training, validation):

    images/<folder>/ADE_*.jpg
    annotations/<folder>/ADE_*.png            semantic labels, 0 = other, 1..150 = classes
    annotations_instance/<folder>/ADE_*.png   R = class in the "Instance100" numbering (1..100),
                                              G = instance id (0 = no instance)

Outputs (the layout comformer's ``ade20k_panoptic_{train,val}`` datasets read):

    ade20k_panoptic_{train,val}/ADE_*.png     segment id = R + 256 G + 256^2 B, 0 = void
    ade20k_panoptic_{train,val}.json          images, annotations, categories (ids 0..149)

How a panoptic map is made: every stuff class present in the semantic map becomes one segment; then
every (class, instance id) pair of the instance map becomes a thing segment, painted over the stuff
(the two annotations overlap a little, and the instance one is the more specific). Pixels of
"other", and pixels of a thing class that no instance covers, are void. Areas and boxes are
measured on the final map; a segment left with no pixel is dropped, and segment ids are 1..N in the
order stuff (by class), things (by Instance100 class, then instance id).

Instance100 ids map to the 150 SceneParsing classes through ade20k_instance_catid_mapping.txt,
and the category table (ids, names, isthing, colours) is ade20k_150_panoptic_categories.json; both
ship in comformer/data/datasets/ (the registration reads the same table).

Usage:
    python datasets/prepare_ade20k_pan_seg.py [DATA_ROOT] [--workers N]

DATA_ROOT defaults to $DETECTRON2_DATASETS, else the folder of this script. Nothing is downloaded.
"""

import argparse
import json
import os
import sys
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

ADE_FOLDER = "ADEChallengeData2016"
SPLITS = {"train": "training", "val": "validation"}
NUM_CLASSES = 150

HERE = Path(__file__).resolve().parent
_TABLES = HERE.parent / "comformer" / "data" / "datasets"
DEFAULT_MAPPING = _TABLES / "ade20k_instance_catid_mapping.txt"
DEFAULT_CATEGORIES = _TABLES / "ade20k_150_panoptic_categories.json"


def default_root() -> str:
    return os.environ.get("DETECTRON2_DATASETS") or str(HERE)


def load_categories(path: str) -> List[dict]:
    """The 150-class table: ``id`` 0..149 in order, ``name``, ``isthing``, ``color``."""
    with open(path) as f:
        categories = json.load(f)
    if [c.get("id") for c in categories] != list(range(NUM_CLASSES)):
        raise ValueError(
            f"{path}: expected {NUM_CLASSES} categories with ids 0..{NUM_CLASSES - 1} in order"
        )
    for c in categories:
        missing = [k for k in ("name", "isthing", "color") if k not in c]
        if missing:
            raise ValueError(f"{path}: category {c.get('id')} lacks {missing}")
    return categories


def load_instance_mapping(path: str, categories: Sequence[dict]) -> Dict[int, int]:
    """
    Read the Instance100 -> SceneParse150 table (a header line, then ``instance150 scene150 full``
    per line; one Instance100 id may have several rows, one per full-ADE20K id).

    Returns:
        dict: Instance100 id (1..100) -> contiguous class index (SceneParse150 id - 1, 0..149).
    Raises:
        ValueError: a malformed line, an Instance100 id mapped to two classes, or a disagreement
            with the category table about which classes are things.
    """
    mapping: Dict[int, int] = {}
    with open(path) as f:
        lines = f.read().splitlines()
    for line_no, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        try:
            instance_id, scene_id = int(fields[0]), int(fields[1])
        except (ValueError, IndexError):
            raise ValueError(
                f"{path}:{line_no}: expected 'instance_id scene150_id full_id', got {line!r}"
            )
        if not 1 <= scene_id <= NUM_CLASSES:
            raise ValueError(
                f"{path}:{line_no}: SceneParse150 id {scene_id} is not in 1..{NUM_CLASSES}"
            )
        if mapping.get(instance_id, scene_id - 1) != scene_id - 1:
            raise ValueError(
                f"{path}:{line_no}: Instance100 id {instance_id} maps to SceneParse150 ids "
                f"{mapping[instance_id] + 1} and {scene_id}"
            )
        mapping[instance_id] = scene_id - 1
    mapped = set(mapping.values())
    things = {c["id"] for c in categories if c["isthing"]}
    if mapped != things:
        raise ValueError(
            f"{path} and the category table disagree on the thing classes: mapped but not things "
            f"{sorted(mapped - things)}, things but not mapped {sorted(things - mapped)}"
        )
    return mapping


def read_png(path: str, modes: Tuple[str, ...], what: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    with Image.open(path) as img:
        if img.mode not in modes:
            raise ValueError(
                f"{path}: {what} must be a PNG of mode {'/'.join(modes)}, got {img.mode}"
            )
        return np.array(img.convert("RGB") if img.mode == "RGBA" else img)


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> (H, W, 3) uint8 in COCO's encoding id = R + 256 G + 256^2 B."""
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2 % 256], axis=-1).astype(np.uint8)


def make_panoptic(
    semantic: np.ndarray,
    instance: np.ndarray,
    isthing: Sequence[bool],
    instance_to_class: Dict[int, int],
    source: str = "",
) -> Tuple[np.ndarray, List[dict]]:
    """
    Args:
        semantic: (H, W) uint8, 0 = other, 1..150 = classes.
        instance: (H, W, 3) uint8, R = Instance100 class, G = instance id (0 = none).
        isthing: per contiguous class (150), whether it is a thing.
        instance_to_class: Instance100 id -> contiguous class.
        source: the instance file, named in errors.
    Returns:
        ids: (H, W) int32 segment ids, 0 = void.
        segments: ``id``, ``category_id`` (0..149), ``iscrowd`` 0, ``area``, ``bbox`` [x, y, w, h].
    """
    if semantic.max(initial=0) > NUM_CLASSES:
        raise ValueError(f"{source}: semantic label {int(semantic.max())} is above {NUM_CLASSES}")
    classes = semantic.astype(np.int32) - 1  # -1 = other
    provisional = np.zeros(semantic.shape, dtype=np.int32)
    provisional_class = [None]  # provisional id -> class; 0 is void
    for cls in np.unique(classes):
        if cls < 0 or isthing[cls]:
            continue
        provisional[classes == cls] = len(provisional_class)
        provisional_class.append(int(cls))
    red = instance[..., 0].astype(np.int32)
    green = instance[..., 1].astype(np.int32)
    for key in np.unique((red * 256 + green)[green > 0]):
        r, g = divmod(int(key), 256)
        if r not in instance_to_class:
            raise ValueError(
                f"{source}: instance {g} has class {r} in the red channel, which is not an "
                f"Instance100 id (valid: {min(instance_to_class)}..{max(instance_to_class)})"
            )
        provisional[(red == r) & (green == g)] = len(provisional_class)
        provisional_class.append(instance_to_class[r])

    ids = np.zeros_like(provisional)
    segments = []
    # Renumber what survived the painting 1..N, so the json lists exactly the ids in the PNG.
    for old in np.unique(provisional):
        if old == 0:
            continue
        mask = provisional == old
        new = len(segments) + 1
        ids[mask] = new
        ys, xs = np.nonzero(mask)
        x0, y0 = int(xs.min()), int(ys.min())
        segments.append(
            {
                "id": new,
                "category_id": provisional_class[old],
                "iscrowd": 0,
                "area": int(mask.sum()),
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
            }
        )
    return ids, segments


def convert_image(
    stem: str,
    *,
    image_dir: str,
    semantic_dir: str,
    instance_dir: str,
    out_dir: str,
    isthing: Sequence[bool],
    instance_to_class: Dict[int, int],
) -> Tuple[dict, dict]:
    """Write the panoptic PNG of one image; returns its json ``images`` and ``annotations``
    entries."""
    image_file = os.path.join(image_dir, stem + ".jpg")
    with Image.open(image_file) as img:
        width, height = img.size
    semantic_file = os.path.join(semantic_dir, stem + ".png")
    instance_file = os.path.join(instance_dir, stem + ".png")
    semantic = read_png(semantic_file, ("L", "P"), "semantic annotation")
    instance = read_png(instance_file, ("RGB", "RGBA"), "instance annotation")
    for path, array in ((semantic_file, semantic), (instance_file, instance)):
        if array.shape[:2] != (height, width):
            raise ValueError(
                f"{path} is {array.shape[1]}x{array.shape[0]}, but its image {image_file} is "
                f"{width}x{height}"
            )
    ids, segments = make_panoptic(semantic, instance, isthing, instance_to_class, instance_file)
    Image.fromarray(id_to_rgb(ids)).save(os.path.join(out_dir, stem + ".png"))
    image_entry = {"id": stem, "file_name": stem + ".jpg", "width": width, "height": height}
    annotation = {"image_id": stem, "file_name": stem + ".png", "segments_info": segments}
    return image_entry, annotation


def convert_split(
    root: str,
    split: str,
    categories: List[dict],
    instance_to_class: Dict[int, int],
    workers: int = 1,
    log_every: int = 1000,
) -> str:
    """Convert one split; returns the json path."""
    ade = os.path.join(root, ADE_FOLDER)
    folder = SPLITS[split]
    image_dir = os.path.join(ade, "images", folder)
    semantic_dir = os.path.join(ade, "annotations", folder)
    instance_dir = os.path.join(ade, "annotations_instance", folder)
    for path, what in (
        (image_dir, "ADEChallengeData2016.zip (the SceneParsing release)"),
        (semantic_dir, "ADEChallengeData2016.zip (the SceneParsing release)"),
        (
            instance_dir,
            "the instance annotations (annotations_instance.tar) of the SceneParsing benchmark",
        ),
    ):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path} does not exist: extract {what} into {root}")
    stems = sorted(n[: -len(".jpg")] for n in os.listdir(image_dir) if n.endswith(".jpg"))
    if not stems:
        raise FileNotFoundError(f"no .jpg images in {image_dir}")
    out_dir = os.path.join(ade, f"ade20k_panoptic_{split}")
    out_json = os.path.join(ade, f"ade20k_panoptic_{split}.json")
    os.makedirs(out_dir, exist_ok=True)
    print(f"[{split}] {len(stems)} images -> {out_dir}", flush=True)

    work = partial(
        convert_image,
        image_dir=image_dir,
        semantic_dir=semantic_dir,
        instance_dir=instance_dir,
        out_dir=out_dir,
        isthing=[bool(c["isthing"]) for c in categories],
        instance_to_class=instance_to_class,
    )
    images, annotations = [], []
    pool = Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(work, stems, chunksize=16) if pool else map(work, stems)
        for i, (image_entry, annotation) in enumerate(results, start=1):
            images.append(image_entry)
            annotations.append(annotation)
            if i % log_every == 0 or i == len(stems):
                print(f"[{split}] {i}/{len(stems)}", flush=True)
    finally:
        if pool:
            pool.close()
            pool.join()

    content = {
        "images": images,
        "annotations": annotations,
        "categories": [
            {
                "id": c["id"],
                "name": c["name"],
                "isthing": int(c["isthing"]),
                "color": list(c["color"]),
            }
            for c in categories
        ],
    }
    # Write then rename, so an interrupted run never leaves a truncated json behind.
    with open(out_json + ".tmp", "w") as f:
        json.dump(content, f)
    os.replace(out_json + ".tmp", out_json)
    n_segments = sum(len(a["segments_info"]) for a in annotations)
    print(f"[{split}] wrote {out_json} ({len(images)} images, {n_segments} segments)", flush=True)
    return out_json


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "root", nargs="?", default=None, help="data root holding ADEChallengeData2016/"
    )
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--workers", type=int, default=1, help="processes converting images")
    parser.add_argument(
        "--mapping", default=str(DEFAULT_MAPPING), help="Instance100 -> SceneParse150 table"
    )
    parser.add_argument(
        "--categories", default=str(DEFAULT_CATEGORIES), help="150-class table (json)"
    )
    args = parser.parse_args(argv)
    root = args.root or default_root()
    try:
        categories = load_categories(args.categories)
        instance_to_class = load_instance_mapping(args.mapping, categories)
        for split in args.splits:
            convert_split(root, split, categories, instance_to_class, workers=args.workers)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
